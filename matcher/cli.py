"""``python -m matcher``: every stage of the pipeline from the command line.

Anything the app shows can be computed here too: encode a gallery, search it, evaluate
matchers, train the models.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from matcher.paths import DEFAULT_GALLERY

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "flickr8k"


def _roles(preset_name: str, only: str | None) -> dict[str, str]:
    from matcher.models import preset

    roles = preset(preset_name)
    if only:
        wanted = [r.strip() for r in only.split(",") if r.strip()]
        # ROLE=SPEC adds a matcher that is not in the preset (e.g. a freshly trained checkpoint), so a
        # candidate is measured next to the preset's matchers, speeds timed together.
        extra = {role.strip(): spec.strip() for role, spec in (w.split("=", 1) for w in wanted if "=" in w)}
        for role, spec in extra.items():
            _check_extra_matcher(role, spec)
        wanted = [w.split("=", 1)[0].strip() for w in wanted]
        unknown = [r for r in wanted if r not in roles and r not in extra]
        if unknown:
            raise SystemExit(f"error: preset {preset_name!r} has no matcher {unknown[0]!r} (has: {', '.join(roles)}; "
                             "or name one as ROLE=SPEC)")
        roles = {r: extra[r] if r in extra else roles[r] for r in wanted}
    return roles


def _check_extra_matcher(role: str, spec: str) -> None:
    """Refuse a ROLE=SPEC whose weights cannot be found, before any model is loaded."""
    from matcher.compare import missing_weights

    if not role or not spec:
        raise SystemExit(f"error: write an extra matcher as ROLE=SPEC, e.g. candidate=runs/student.pt (got {role}={spec})")
    reason = missing_weights(spec)
    if reason:
        raise SystemExit(f"error: matcher {role!r} cannot be loaded: {reason}")


def _open(gallery: str, split: str | None):
    from matcher.gallery import GalleryError, open_gallery

    try:
        return open_gallery(gallery).select(split)
    except GalleryError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_info(args: argparse.Namespace) -> None:
    from matcher.models import PRESETS, registered_models

    print("presets:")
    for name, roles in PRESETS.items():
        print(f"  {name}: " + ", ".join(f"{r}={s}" for r, s in roles.items()))
    print("registered models:")
    for name, cfg in registered_models().items():
        print(f"  {name}: {cfg.get('description', cfg.get('type'))}")


def cmd_encode(args: argparse.Namespace) -> None:
    from matcher.embed import embed_gallery
    from matcher.models import load_encoder

    gallery = _open(args.gallery, args.split)
    emb = embed_gallery(load_encoder(args.model), gallery)
    state = "from cache" if emb.from_cache else "encoded"
    print(f"{len(emb.names)} images, {len(emb.caption_texts)} captions {state}; {len(emb.skipped)} skipped")
    for name, reason in emb.skipped:
        print(f"  skipped {name}: {reason}")


def cmd_search(args: argparse.Namespace) -> None:
    from matcher.images import UnreadableImage, load_rgb
    from matcher.models import load_encoder
    from matcher.search import Matcher, QueryError, SearchOptions

    matcher = Matcher(load_encoder(args.model), _open(args.gallery, args.split))
    try:
        if args.image:
            result = matcher.search_image(load_rgb(args.image), SearchOptions(k=args.k))
        else:
            result = matcher.search_text(args.query, SearchOptions(k=args.k))
    except (QueryError, UnreadableImage) as exc:
        raise SystemExit(f"error: {exc}") from None
    for rank, hit in enumerate(result.hits, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.name}")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))


def format_table(matchers: dict[str, dict]) -> str:
    from matcher.texttable import text_table

    rows = [{"matcher": name, **m} for name, m in matchers.items()]
    return text_table(rows, [
        ("matcher", "matcher", "<14"),
        ("t2i R@1", lambda m: m["t2i"]["R@1"], "8.1f"), ("R@5", lambda m: m["t2i"]["R@5"], "7.1f"),
        ("R@10", lambda m: m["t2i"]["R@10"], "7.1f"),
        ("i2t R@1", lambda m: m["i2t"]["R@1"], "9.1f"), ("R@5", lambda m: m["i2t"]["R@5"], "7.1f"),
        ("R@10", lambda m: m["i2t"]["R@10"], "7.1f"), ("rsum", "rsum", "8.1f"),
        ("params", lambda m: f"{m['params'] / 1e6:.1f}M", ">9"), ("MB", "size_mb", "8.1f"),
        ("txt ms", "text_query_ms", "8.1f"), ("img/s", "images_per_s", "8.1f")])


def cmd_eval(args: argparse.Namespace) -> None:
    from matcher.atomic import write_json
    from matcher.evaluate import SPEED_PROBE_NOTE, evaluate_matchers, machine_description

    gallery = _open(args.gallery, args.split)
    report = {"gallery": str(args.gallery), "split": args.split, "preset": args.preset,
              "machine": machine_description(), "speed_probe": SPEED_PROBE_NOTE, "matchers": {}}
    from matcher.hashing.commands import add_hashed_entries, is_hashed
    from matcher.models import registered_models

    roles = _roles(args.preset, args.matchers)
    fine = {r for r, s in roles.items() if (registered_models().get(s) or {}).get("type") == "fine-rerank"}
    for role in fine:  # its recall needs the region-word scorer over every query: eval-fine measures it
        print(f"{role}: not measured here; `python -m matcher eval-fine` writes assets/results/finegrained.json")
        roles.pop(role)
    floats = {role: spec for role, spec in roles.items() if not is_hashed(spec)}
    entries = evaluate_matchers(list(floats.values()), gallery)
    for role, spec in floats.items():
        report["matchers"][role] = dict(entries[spec])
    for role, spec in roles.items():
        if is_hashed(spec):  # after the float matchers: reuses its base encoder's entry
            add_hashed_entries(report, role, spec, gallery)
    print(format_table(report["matchers"]))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matcher", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def gallery_args(p: argparse.ArgumentParser, split: str | None = None) -> None:
        p.add_argument("--gallery", default=str(DEFAULT_GALLERY), help="folder of images (+ captions.jsonl)")
        p.add_argument("--split", default=split, help="only images of this split (from captions.jsonl)")

    p = sub.add_parser("info", help="list presets and registered models")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode", help="encode a gallery into the embedding cache")
    gallery_args(p)
    p.add_argument("--model", default="offline-teacher")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("search", help="search a gallery by text or by image")
    gallery_args(p)
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--image", help="query image path instead of text")
    p.add_argument("--model", default="offline-teacher")
    p.add_argument("--k", type=int, default=10)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="Recall@K (both directions), rsum and costs of a preset's matchers")
    gallery_args(p, split="test")
    p.add_argument("--preset", default="offline")
    p.add_argument("--matchers", help="comma-separated roles (default: all of the preset); ROLE=SPEC adds a "
                   "matcher that is not in the preset, e.g. student-128=runs/student-128.pt")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_eval)

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
    gallery_args(p, split="test")
    p.add_argument("--losses", default="contrastive,mse,listnet,affinity,wsd",
                   help="comma-separated; NAME+embed adds embedding distillation, NAME:W sets the contrastive weight")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "matcher" / "ablation"),
                   help="where the per-loss checkpoints go")
    p.add_argument("--results", default="assets/results/ablation.json")
    p.add_argument("--install", help="copy the best-on-val checkpoint here (e.g. assets/models/offline-student.pt)")
    p.add_argument("--resume", action="store_true",
                   help="keep the variants an interrupted run of the same ablation already finished (--results, --work-dir)")
    p.set_defaults(func=cmd_ablate_student)

    from matcher.dashboard_cli import add_commands as add_dashboard_commands
    from matcher.finegrained.commands import add_commands as add_fine_commands
    from matcher.hashing.commands import add_commands as add_hashing_commands

    add_dashboard_commands(sub, gallery_args)
    add_hashing_commands(sub, str(DEFAULT_DATA))  # train-hash, bench
    add_fine_commands(sub, str(DEFAULT_DATA))  # train-fine, eval-fine
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
