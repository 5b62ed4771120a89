"""Training commands: ``train-teacher``, ``train-student``, ``ablate-student``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matcher.cli.common import DEFAULT_DATA, add_gallery


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from matcher.atomic import write_json
    from matcher.train.teacher import TeacherRecipe, train_teacher

    overrides = {f.name: getattr(args, f.name) for f in fields(TeacherRecipe) if getattr(args, f.name, None) is not None}
    result = train_teacher(args.data, args.out, TeacherRecipe(**overrides))
    write_json(Path(args.out).with_suffix(".train.json"), result)
    best = result["best"]
    print(f"saved {args.out} (best: {best['phase']} epoch {best['epoch']}, val rsum {best['val']['rsum']:.1f})")


def _student_recipe(args: argparse.Namespace):
    from dataclasses import fields

    from matcher.train.student import StudentRecipe

    if args.threads:  # training threads only; cost probes run in fresh processes with torch's default
        import torch

        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in fields(StudentRecipe) if getattr(args, f.name, None) is not None}
    return StudentRecipe(**overrides)


def cmd_train_student(args: argparse.Namespace) -> None:
    from matcher.atomic import write_json
    from matcher.train.student import train_student

    result = train_student(args.data, args.out, _student_recipe(args))
    write_json(Path(args.out).with_suffix(".train.json"), result)
    print(f"saved {args.out} (best epoch {result['best_epoch']}, val rsum {result['val']['rsum']:.1f})")


def cmd_ablate_student(args: argparse.Namespace) -> None:
    import shutil

    from matcher.train.student import run_ablation

    variants = [v.strip() for v in args.losses.split(",") if v.strip()]
    command = "python -m matcher " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else ""
    result = run_ablation(args.data, args.work_dir, _student_recipe(args), variants, args.results,
                          args.gallery, args.split, command, resume=args.resume)
    print(f"wrote {args.results} and {Path(args.results).with_suffix('.csv')}; best on val: {result['best']['loss']}")
    if args.install:
        shutil.copy(result["best"]["checkpoint"], args.install)
        print(f"installed {result['best']['checkpoint']} as {args.install}")


def _student_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Flickr8k folder with captions.jsonl and images/")
    p.add_argument("--teacher", help="teacher checkpoint whose similarities are distilled")
    for name in ("epochs", "caption_passes", "batch_size", "finetune_blocks", "cached_blocks", "image_size", "text_dim", "text_layers",
                 "text_heads", "vocab_min_count", "seed", "embed_dim", "crop_views"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    for name in ("lr", "tower_lr", "weight_decay", "head_dropout", "text_dropout", "contrastive_weight",
                 "distill_weight", "embed_weight", "wsd_eps"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float)
    p.add_argument("--image-variant", dest="image_variant")
    p.add_argument("--skip-blocks", dest="skip_blocks",
                   help="residual image-tower blocks to leave out, e.g. 6,7,9,10,12,13 (then --cached-blocks and "
                        "--finetune-blocks count the remaining blocks)")
    p.add_argument("--teacher-scores", dest="teacher_scores",
                   help="'dual' (default) or a trained alignment scorer (assets/models/fine/...) to distil")
    p.add_argument("--threads", type=int, help="torch threads for training (e.g. 1 on a shared CPU)")



def add_commands(sub) -> None:
    p = sub.add_parser("train-teacher", help="train the offline teacher on Flickr8k train (select on val)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Flickr8k folder with captions.jsonl and images/")
    p.add_argument("--out", default="assets/models/offline-teacher.pt")
    for name in ("epochs", "probe_epochs", "batch_size", "finetune_blocks", "finetune_layers", "seed", "embed_dim"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    for name in ("lr", "probe_lr", "tower_lr", "weight_decay", "head_dropout"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float)
    p.add_argument("--image-variant", dest="image_variant")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("train-student", help="distil the offline student from the teacher (select on val)")
    _student_args(p)
    p.add_argument("--loss", help="wsd | listnet | affinity | mse | contrastive (default wsd)")
    p.add_argument("--out", default="assets/models/offline-student.pt")
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser("ablate-student", help="train one student per distillation loss (same budget and seed) "
                                              "and tabulate test recall, costs and ratios to the teacher")
    _student_args(p)
    add_gallery(p, split="test")
    p.add_argument("--losses", default="contrastive,mse,listnet,affinity,wsd",
                   help="comma-separated; NAME+embed adds embedding distillation, NAME:W sets the contrastive weight")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "matcher" / "ablation"),
                   help="where the per-loss checkpoints go")
    p.add_argument("--results", default="assets/results/ablation.json")
    p.add_argument("--install", help="copy the best-on-val checkpoint here (e.g. assets/models/offline-student.pt)")
    p.add_argument("--resume", action="store_true",
                   help="keep the variants an interrupted run of the same ablation already finished (--results, --work-dir)")
    p.set_defaults(func=cmd_ablate_student)

