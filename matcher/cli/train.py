"""Training commands: ``train-teacher``, ``train-student``, ``ablate-student``; and the recipe options
every train command shares (``train-hash``, ``train-fine`` and ``train-cross`` use them too).

``--recipe FILE`` (default: the shipped recipe in ``matcher/train/recipes/``, so a command without
options retrains the shipped artefact) and repeatable ``--set key=value`` overrides, resolved by
``matcher.train.recipes.load_recipe``; the resolved recipe is recorded next to the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matcher.cli.common import add_data, add_gallery, fail, resume_file


def add_recipe_options(p: argparse.ArgumentParser, shipped: str) -> None:
    """``--recipe`` (default ``matcher/train/recipes/<shipped>.json``) and ``--set KEY=VALUE``."""
    from matcher.train.recipes import RECIPES_DIR

    p.add_argument("--recipe", default=str(RECIPES_DIR / f"{shipped}.json"), metavar="FILE",
                   help=f"recipe JSON, or the name of one in matcher/train/recipes/ "
                        f"(default: {shipped}, the shipped one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field (repeatable); an unknown key lists the valid ones")


def recipe_arg(cls, args: argparse.Namespace):
    """The recipe ``--recipe`` and ``--set`` describe, or the one-line ``error: ...`` exit."""
    from matcher.train.recipes import RecipeError, load_recipe

    try:
        return load_recipe(cls, args.recipe, args.overrides)
    except RecipeError as exc:
        fail(exc)


def _threads(n: int | None) -> None:
    """Training threads only; cost probes run in fresh processes with torch's default."""
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from matcher.atomic import write_json
    from matcher.train.teacher import TeacherRecipe, train_teacher

    result = train_teacher(args.data, args.out, recipe_arg(TeacherRecipe, args))
    write_json(Path(args.out).with_suffix(".train.json"), result)
    best = result["best"]
    print(f"saved {args.out} (best: {best['phase']} epoch {best['epoch']}, val rsum {best['val']['rsum']:.1f})")


def cmd_train_student(args: argparse.Namespace) -> None:
    from matcher.atomic import write_json
    from matcher.train.student import StudentRecipe, train_student

    recipe = recipe_arg(StudentRecipe, args)
    _threads(args.threads)
    resume = resume_file(Path(args.out))  # rerunning a killed command continues it
    result = train_student(args.data, args.out, recipe, resume=resume)
    write_json(Path(args.out).with_suffix(".train.json"), result)
    resume.unlink(missing_ok=True)
    print(f"saved {args.out} (best epoch {result['best_epoch']}, val rsum {result['val']['rsum']:.1f})")


def cmd_ablate_student(args: argparse.Namespace) -> None:
    from matcher.train.student import StudentRecipe, run_ablation

    recipe = recipe_arg(StudentRecipe, args)
    _threads(args.threads)
    variants = [v.strip() for v in args.losses.split(",") if v.strip()]
    command = "python -m matcher " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else ""
    seeds = None
    if args.seeds:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            fail(f"--seeds takes comma-separated integers such as 0,1,2, not {args.seeds!r}")
    result = run_ablation(args.data, args.work_dir, recipe, variants, args.results,
                          args.gallery, args.split, command, resume=args.resume, seeds=seeds)
    print(f"wrote {args.results} and {Path(args.results).with_suffix('.csv')}; best on val: {result['best']['loss']}, "
          f"checkpoint {result['best']['checkpoint']} (to ship it, copy it to assets/models/offline-student.pt)")


def _student_args(p: argparse.ArgumentParser) -> None:
    add_recipe_options(p, "student")
    add_data(p)
    p.add_argument("--threads", type=int, help="torch threads for training (e.g. 1 on a shared CPU)")


def add_commands(sub) -> None:
    p = sub.add_parser("train-teacher", help="train the offline teacher on Flickr8k train (select on val)")
    add_recipe_options(p, "teacher")
    add_data(p)
    p.add_argument("--out", default="assets/models/offline-teacher.pt")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("train-student", help="distil the offline student from the teacher (select on val)")
    _student_args(p)
    p.add_argument("--out", default="assets/models/offline-student.pt")
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser("ablate-student", help="train one student per distillation loss (same budget and seed) "
                                              "and tabulate test recall, costs and ratios to the teacher")
    _student_args(p)
    add_gallery(p, split="test", readers=False)
    p.add_argument("--losses", default="contrastive,mse,listnet,affinity,wsd",
                   help="comma-separated; NAME+embed adds embedding distillation, NAME:W sets the contrastive weight")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "matcher" / "ablation"),
                   help="where the per-loss checkpoints go")
    p.add_argument("--results", default="assets/results/ablation.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the variants an interrupted run of the same ablation already finished (--results, --work-dir)")
    p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): every loss once per seed, with the per-loss "
                                   "mean, min..max and std of val and test rsum; best loss = best mean val rsum; "
                                   "processes given other --losses/--seeds may share --work-dir")
    p.set_defaults(func=cmd_ablate_student)
