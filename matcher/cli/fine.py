"""Fine-grained tier commands: ``train-fine``, ``train-cross``, ``train-vl-cross``, ``train-vl-decomposed``,
``train-tops-alignment`` and ``eval-fine``."""
from __future__ import annotations

import argparse
from pathlib import Path

from matcher.atomic import write_json
from matcher.cli.common import DEFAULT_DATA, resume_file

DEFAULT_TEACHER = "assets/models/offline-teacher.pt"


def _threads(n: int) -> None:
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def cmd_train_fine(args: argparse.Namespace) -> None:
    import torch

    from matcher.cli.train import recipe_arg
    from matcher.finegrained.checkpoints import FineRecipe, build_scorer, load_scorer, save_scorer, teacher_heads
    from matcher.finegrained.distill import FUSED_PREFIX, fine_teacher
    from matcher.finegrained.features import dual_similarity, fine_features
    from matcher.finegrained.train import train_scorer
    from matcher.train.features import Flickr8k

    recipe = recipe_arg(FineRecipe, args)
    name = Path(args.recipe).name.removesuffix(".json").removesuffix(".train").removeprefix("fine-")
    out = Path(args.out or f"assets/models/fine/{name}.pt")
    _threads(args.threads)
    torch.manual_seed(recipe.seed)  # the code queries are drawn when the scorer is built
    data = Flickr8k.load(args.data)
    feats = fine_features(data, args.teacher)
    image_head, text_head, _ = teacher_heads(args.teacher)
    teacher = None
    if recipe.distill_from.startswith(FUSED_PREFIX):  # learn from a better tier's fused score, own start
        teacher = fine_teacher(recipe.distill_from, data, args.teacher, feats["train"], image_head, text_head)
        scorer = build_scorer(recipe, image_head, text_head)
    elif recipe.distill_from:  # shrink: start from the big scorer, learn from its in-batch scores
        from matcher.finegrained.scorers import CodeScorer

        teacher, big_recipe, _ = load_scorer(recipe.distill_from, image_head, text_head)
        scorer = (CodeScorer.shrunk_from(teacher, recipe.codes) if recipe.tier == "codes" == big_recipe.tier
                  else build_scorer(recipe, image_head, text_head))
    else:
        scorer = build_scorer(recipe, image_head, text_head)
    dual_val = dual_similarity(feats["val"], image_head, text_head)
    result = train_scorer(scorer, feats["train"], feats["val"], dual_val, recipe, teacher)
    distill_from = recipe.distill_from or None
    meta = {"teacher": args.teacher, "distill_from": distill_from, "best_epoch": result["best_epoch"],
            "val": result["val"], "data": "Flickr8k train (first view), selected on val"}
    save_scorer(out, scorer, recipe, meta)
    write_json(out.with_suffix(".train.json"), {**result, "distill_from": distill_from})
    print(f"saved {out} (best epoch {result['best_epoch']}, val rsum {result['val']['rsum']:.2f})")


def cmd_train_cross(args: argparse.Namespace) -> None:
    """Cross-encoder on dual hard negatives, then (``decompose``) its decomposition distilled from it."""
    from dataclasses import asdict

    import torch

    from matcher.cli.train import recipe_arg
    from matcher.finegrained.checkpoints import save_cross, teacher_heads
    from matcher.finegrained.cross import CrossEncoder, DecomposedEncoder
    from matcher.finegrained.cross_train import CrossRecipe, train_cross, train_decomposed
    from matcher.finegrained.features import dual_similarity, fine_features
    from matcher.train.features import Flickr8k

    recipe = recipe_arg(CrossRecipe, args)
    _threads(args.threads)
    torch.manual_seed(recipe.seed)  # the transformer's weights are drawn when it is built
    feats = fine_features(Flickr8k.load(args.data), args.teacher)
    image_head, text_head, teacher_scale = teacher_heads(args.teacher)
    duals = {s: dual_similarity(feats[s], image_head, text_head) for s in ("train", "val")}
    residual_scale = teacher_scale if recipe.residual else 0.0
    cross = CrossEncoder(image_head, text_head, recipe.dim, recipe.layers, recipe.heads, recipe.ffn, recipe.dropout,
                         residual_scale=residual_scale)
    out = Path(args.out_dir)
    cross_result = train_cross(cross, feats["train"], duals["train"], feats["val"], duals["val"], recipe)
    name = "cross-residual" if recipe.residual else "cross"
    save_cross(out / f"{name}.pt", "cross", cross, {**asdict(recipe), "residual_scale": residual_scale},
               {"val": cross_result["val"]})
    write_json(out / f"{name}.train.json", {"recipe": asdict(recipe), "cross": cross_result})
    if not recipe.decompose:
        print(f"saved {out / name}.pt")
        return
    decomposed = DecomposedEncoder(cross)
    decomp_result = train_decomposed(decomposed, cross, feats["train"], feats["val"], recipe)
    save_cross(out / f"{name}-decomposed.pt", "decomposed", decomposed,
               {**asdict(recipe), "residual_scale": residual_scale}, {"val": decomp_result["val"]})
    write_json(out / f"{name}-decomposed.train.json", {"recipe": asdict(recipe), "decomposed": decomp_result})
    print(f"saved {out / name}.pt and {out / name}-decomposed.pt")


def cmd_train_vl_cross(args: argparse.Namespace) -> None:
    """The cross-encoder on the teacher's top MiniLM layers, trained on dual hard negatives (resumable)."""
    from dataclasses import asdict

    import torch

    from matcher.cli.train import recipe_arg
    from matcher.finegrained.cross_train import VLCrossRecipe, train_vl_cross
    from matcher.finegrained.vl_cross import build_vl_cross, cross_splits, save_vl_cross

    recipe = recipe_arg(VLCrossRecipe, args)
    _threads(args.threads)
    module, image_head, text_head, scale, splits = cross_splits(args.data, args.teacher, ("train", "val"))
    torch.manual_seed(recipe.seed)
    model = build_vl_cross(module, image_head, text_head, scale if recipe.residual else 0.0, recipe.grid)
    out = Path(args.out)
    resume = resume_file(out)
    result = train_vl_cross(model, splits["train"], splits["val"], recipe, resume=resume,
                            log=lambda line: print(line, flush=True))
    save_vl_cross(out, model, "vl-cross", {**asdict(recipe), "teacher": args.teacher}, {"val": result["val"],
                                                                              "best_step": result["best_step"]})
    write_json(out.with_suffix(".train.json"), {"recipe": asdict(recipe), "vl_cross": result})
    resume.unlink(missing_ok=True)
    print(f"saved {out} (best step {result['best_step']}, val rsum {result['val']['rsum']:.2f})")


def cmd_train_vl_decomposed(args: argparse.Namespace) -> None:
    """VLDeformer-style decomposition of a trained vl-cross checkpoint (its correction over the dual cosine)."""
    from dataclasses import asdict

    import torch

    from matcher.cli.train import recipe_arg
    from matcher.finegrained.cross_train import VLDecompRecipe, train_vl_decomposed
    from matcher.finegrained.vl_cross import VLDecomposed, cross_splits, load_vl_cross, save_vl_cross

    recipe = recipe_arg(VLDecompRecipe, args)
    _threads(args.threads)
    module, _, _, _, splits = cross_splits(args.data, args.teacher, ("train", "val"))
    cross, cross_recipe, _ = load_vl_cross(args.cross, module)
    torch.manual_seed(recipe.seed)
    decomposed = VLDecomposed(cross)
    out = Path(args.out)
    resume = resume_file(out)
    result = train_vl_decomposed(decomposed, cross, splits["train"], splits["val"], recipe, resume=resume,
                                 log=lambda line: print(line, flush=True))
    save_vl_cross(out, decomposed, "vl-decomposed", {**asdict(recipe), "cross": args.cross, "cross_recipe": cross_recipe},
               {"val": result["val"], "best_step": result["best_step"]})
    write_json(out.with_suffix(".train.json"), {"recipe": asdict(recipe), "cross": args.cross, "vl_decomposed": result})
    resume.unlink(missing_ok=True)
    print(f"saved {out} (best step {result['best_step']}, val rsum {result['val']['rsum']:.2f})")


def cmd_train_tops_alignment(args: argparse.Namespace) -> None:
    """ALADIN's alignment loss back-propagated into copies of the teacher's tops (resumable)."""
    from dataclasses import asdict

    from matcher.cli.train import recipe_arg
    from matcher.finegrained.tops import TopsAlignment, cached_splits, dual_matrix, save_tops
    from matcher.finegrained.tops_train import TopsRecipe, train_tops
    from matcher.train.loop import seeded

    recipe = recipe_arg(TopsRecipe, args)
    _threads(args.threads)
    module, splits = cached_splits(args.data, args.teacher, ("train", "val"))
    dual_val = dual_matrix(module, splits["val"])
    rng = seeded(recipe.seed)
    model = TopsAlignment(module, recipe.reduce, recipe.dropout, recipe.drop_special)
    out = Path(args.out)
    resume = resume_file(out)
    result = train_tops(model, splits["train"], splits["val"], dual_val, recipe, rng, resume=resume,
                        log=lambda line: print(line, flush=True))
    save_tops(out, model, {**asdict(recipe), "teacher": args.teacher},
              {"val": result["val"], "best_epoch": result["best_epoch"], "fuse_lambda": result["fuse_lambda"]})
    write_json(out.with_suffix(".train.json"), result)
    resume.unlink(missing_ok=True)
    print(f"saved {out} (best epoch {result['best_epoch']}, val fused rsum {result['val']['rsum']:.2f})")


def cmd_eval_fine(args: argparse.Namespace) -> None:
    from matcher.finegrained.report import run_eval

    _threads(args.threads)
    run_eval(args)


def _parser(sub, name: str, default_data: str, help: str) -> argparse.ArgumentParser:
    """A fine-tier command: every one reads the Flickr8k folder and the teacher checkpoint."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--data", default=default_data)
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    return p


def add_commands(sub) -> None:
    default_data = str(DEFAULT_DATA)
    from matcher.cli.train import add_recipe_options

    p = _parser(sub, "train-fine", default_data, help="train a fine-grained tier (alignment re-ranker or code late interaction)")
    add_recipe_options(p, "fine-alignment-sum")
    p.add_argument("--out", help="default: assets/models/fine/NAME.pt for recipe [fine-]NAME.json (+ .train.json)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train_fine)

    p = _parser(sub, "train-cross", default_data, help="train the cross-encoder (dual hard negatives) and, with "
                                                       "decompose, its decomposition")
    add_recipe_options(p, "cross")
    p.add_argument("--out-dir", dest="out_dir", default="assets/models/fine")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train_cross)

    def long_run(name: str, recipe: str, func, help: str) -> argparse.ArgumentParser:
        """A resumable trainer of one checkpoint (assets/models/fine/RECIPE.pt by default)."""
        p = _parser(sub, name, default_data, help=help)
        add_recipe_options(p, recipe)
        p.add_argument("--out", default=f"assets/models/fine/{recipe}.pt")
        p.add_argument("--threads", type=int, default=2)
        p.set_defaults(func=func)
        return p

    long_run("train-vl-cross", "vl-cross", cmd_train_vl_cross,
             "train the cross-encoder on the teacher's top MiniLM layers (regions appended to the words)")
    long_run("train-vl-decomposed", "vl-decomposed", cmd_train_vl_decomposed,
             "decompose a trained vl-cross into a dual encoder (VLDeformer), distilled from its scores"
             ).add_argument("--cross", default="assets/models/fine/vl-cross.pt", help="the trained vl-cross checkpoint")
    long_run("train-tops-alignment", "tops-alignment", cmd_train_tops_alignment,
             "ALADIN's alignment re-ranker with copies of the teacher's top blocks/layers trained too")

    p = _parser(sub, "eval-fine", default_data, help="val/test recall and costs of every fine tier vs the dual teacher")
    p.add_argument("--models", default="assets/models/fine", help="folder of trained fine scorers")
    p.add_argument("--candidates", default="20,50", help="re-ranking shortlist sizes C")
    p.add_argument("--results", default="assets/results/finegrained", help="writes .json and .csv")
    p.add_argument("--pattern", help="only checkpoints matching this glob in --models (default *.pt)")
    p.add_argument("--append", action="store_true", help="merge into the existing results file instead of replacing it")
    p.add_argument("--students", help="comma-separated student checkpoints to tabulate (distillation comparison)")
    p.add_argument("--ensemble", metavar="A.pt,B.pt,...",
                   help="also one row fusing these fine checkpoints with the dual cosine on the first --candidates "
                        "shortlist (each weight chosen on val, 0 allowed)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_eval_fine)
