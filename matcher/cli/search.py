"""Commands on one gallery: ``info``, ``encode``, ``search`` and ``eval`` (the one report)."""
from __future__ import annotations

import argparse

from matcher.cli.common import add_gallery, add_roles, fail, open_gallery_arg, roles_arg


def cmd_info(args: argparse.Namespace) -> None:
    from matcher.presets import PRESETS
    from matcher.registry import registered_models

    print("presets:")
    for name, roles in PRESETS.items():
        print(f"  {name}: " + ", ".join(f"{r}={s}" for r, s in roles.items()))
    print("registered models:")
    for name, cfg in registered_models().items():
        print(f"  {name}: {cfg.get('description', cfg.get('type'))}")


def cmd_encode(args: argparse.Namespace) -> None:
    from matcher.data.embed import embed_gallery
    from matcher.registry import load_encoder

    gallery = open_gallery_arg(args)
    emb = embed_gallery(load_encoder(args.model), gallery)
    state = "from cache" if emb.from_cache else "encoded"
    print(f"{len(emb.names)} images, {len(emb.caption_texts)} captions {state}; {len(emb.skipped)} skipped")
    listed = set(gallery.problems)  # already printed as notes when the gallery was opened
    for name, reason in emb.skipped:
        if (name, reason) not in listed:
            print(f"  skipped {name}: {reason}")


def cmd_search(args: argparse.Namespace) -> None:
    from matcher.data.images import UnreadableImage, load_rgb
    from matcher.registry import open_matcher
    from matcher.search.protocol import QueryError, SearchOptions

    gallery = open_gallery_arg(args)
    try:
        matcher = open_matcher(args.model, gallery)
    except (ValueError, FileNotFoundError) as exc:   # an unknown spec, missing weights, a damaged or foreign index
        fail(exc)
    try:
        if args.image:
            result = matcher.search_image(load_rgb(args.image), SearchOptions(k=args.k))
        else:
            result = matcher.search_text(args.query, SearchOptions(k=args.k))
    except (QueryError, UnreadableImage) as exc:
        fail(exc)
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
        ("i2t R@1", lambda m: (m["i2t"] or {}).get("R@1"), "9.1f"),    # None: not measured (an index row)
        ("R@5", lambda m: (m["i2t"] or {}).get("R@5"), "7.1f"), ("R@10", lambda m: (m["i2t"] or {}).get("R@10"), "7.1f"),
        ("rsum", "rsum", "8.1f"),
        ("params", lambda m: f"{m['params'] / 1e6:.1f}M", ">9"), ("MB", "size_mb", "8.1f"),
        ("txt ms", "text_query_ms", "8.1f"), ("img/s", "images_per_s", "8.1f")])


def cmd_eval(args: argparse.Namespace) -> None:
    from matcher.atomic import write_json
    from matcher.eval.report import build_report

    from matcher.search.store import StoreError

    gallery = open_gallery_arg(args)
    try:
        report = build_report(roles_arg(args), gallery, gallery_label=str(args.gallery), split=args.split,
                              preset=args.preset, log=print)
    except StoreError as exc:   # an index:DIR role that is damaged, mismatched or not of this gallery
        fail(exc)
    print(format_table(report["matchers"]))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="list presets and registered models")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("encode", help="encode a gallery into the embedding cache")
    add_gallery(p)
    p.add_argument("--model", default="offline-teacher")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("search", help="search a gallery by text or by image with one matcher")
    add_gallery(p)
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--image", help="query image path instead of text")
    p.add_argument("--model", default="offline-teacher",
                   help="any spec: registered name, open_clip:..., .pt, hashed:..., index:DIR (an index of --gallery)")
    p.add_argument("--k", type=int, default=10)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="Recall@K (both directions), rsum and costs of a preset's matchers")
    add_gallery(p, split="test")
    add_roles(p)
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_eval)
