"""The dashboard's computations on the command line (registered into ``python -m matcher``):

    python -m matcher compare "two dogs in the snow"          # every matcher of the preset, side by side
    python -m matcher analyze --k 10 --json out/errors.json   # teacher vs fast matchers on the test captions
    python -m matcher results --csv out/metrics.csv --html out/tradeoffs.html
    python -m matcher gallery-zip photos.zip                   # safe extraction + indexing of an own gallery
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _roles(args) -> dict[str, str]:
    """``--roles teacher=SPEC,student=SPEC`` overrides the preset (handy with tiny test models)."""
    from matcher.compare import resolve_preset

    if getattr(args, "roles", None):
        pairs = [p.split("=", 1) for p in args.roles.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit("error: --roles takes role=spec pairs separated by commas")
        return {r.strip(): s.strip() for r, s in pairs}
    active = resolve_preset(args.preset)
    for note in active.notes:
        print(f"note: {note}")
    return active.roles


def _gallery(args):
    from matcher.gallery import GalleryError, open_gallery

    try:
        return open_gallery(args.gallery).select(args.split)
    except GalleryError as exc:
        raise SystemExit(f"error: {exc}") from None


def _options(args):
    from matcher.search import SearchOptions

    return SearchOptions(k=args.k, bits=args.bits, candidates=args.candidates, rerank=not args.no_rerank)


def cmd_compare(args: argparse.Namespace) -> None:
    from matcher.compare import MatcherSet
    from matcher.images import UnreadableImage, load_rgb
    from matcher.search import QueryError

    mset = MatcherSet(_roles(args), _gallery(args))
    try:
        if args.image:
            columns = mset.search_image(load_rgb(args.image), _options(args))
        elif args.like:
            columns = mset.more_like(args.like, _options(args))
        else:
            columns = mset.search_text(args.query, _options(args))
    except (QueryError, UnreadableImage) as exc:
        raise SystemExit(f"error: {exc}") from None
    for column in columns:
        print(f"== {column.role} ({column.spec})")
        if column.error:
            print(f"   {column.error}")
            continue
        for h in column.hits:
            print(f"{h.rank:4d}  {h.score:.4f}  {h.name}{'  ✓ ground truth' if h.match else ''}")
        print(f"   timings: {column.timings_text()}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from matcher.analysis import analyse
    from matcher.compare import MatcherSet

    mset = MatcherSet(_roles(args), _gallery(args))
    matchers = {role: mset.matcher(role) for role in mset.roles}
    result = analyse(matchers, mset.gallery, k=args.k, options=_options(args), limit=args.limit)
    print(result.summary().to_string(index=False))
    report = {"k": result.k, "reference": result.reference, "queries": len(result.per_query),
              "summary": result.summary().to_dict(orient="records"), "cases": {}}
    for role in result.fast_roles:
        for direction in ("teacher-only", "fast-only"):
            cases = result.cases(role, direction)
            report["cases"][f"{role}/{direction}"] = cases.head(args.cases).to_dict(orient="records")
            print(f"\n{role}, {direction}: {len(cases)} queries; worst {min(args.cases, len(cases))}:")
            for _, row in cases.head(args.cases).iterrows():
                print(f"  teacher rank {int(row[f'rank_{result.reference}']) + 1:4d}  {role} rank "
                      f"{int(row[f'rank_{role}']) + 1:4d}  {row['caption']}")
    if args.json:
        from matcher.atomic import write_json

        write_json(args.json, json.loads(json.dumps(report, default=float)))
        print(f"wrote {args.json}")


def cmd_results(args: argparse.Namespace) -> None:
    from matcher.results import load_results, metrics_table, tradeoff_figure, write_csv

    results = load_results(args.results_dir)
    table = metrics_table(results)
    print(table.to_string(index=False) if not table.empty else "no eval results yet")
    for note in results.notes:
        print(f"note: {note}")
    if args.csv:
        print(f"wrote {write_csv(table, args.csv)}")
    if args.html:
        fig, tp = tradeoff_figure(results, args.speed, args.accuracy)
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(args.html, include_plotlyjs="cdn")
        print(f"wrote {args.html} ({len(tp.points)} measured points)")


def cmd_gallery_zip(args: argparse.Namespace) -> None:
    from matcher.compare import MatcherSet
    from matcher.gallery import GalleryError, open_gallery
    from matcher.uploads import UploadError, extract_zip

    try:
        extracted = extract_zip(args.zip)
        gallery = open_gallery(extracted.root)
    except (UploadError, GalleryError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"extracted to {extracted.root}{' (cached)' if extracted.from_cache else ''}: {extracted.files} files")
    for name, reason in extracted.skipped:
        print(f"  not used: {name}: {reason}")
    status = MatcherSet(_roles(args), gallery).warm()
    for role, error in status.items():
        print(f"  {role}: {'indexed' if not error else error}")


def add_commands(sub, gallery_args) -> None:
    """Register the dashboard commands on ``python -m matcher``'s sub-parsers."""
    from matcher.paths import RESULTS_DIR
    from matcher.results import ACCURACY_METRICS, SPEED_METRICS

    def matcher_args(p, k=10):
        p.add_argument("--preset", default="offline")
        p.add_argument("--roles", help="role=spec pairs instead of a preset, e.g. teacher=offline-teacher")
        p.add_argument("--k", type=int, default=k)
        p.add_argument("--bits", type=int, default=64, help="hashed matchers: code length")
        p.add_argument("--candidates", type=int, default=100, help="hashed matchers: candidate pool C")
        p.add_argument("--no-rerank", action="store_true", help="hashed matchers: skip the float re-rank")

    p = sub.add_parser("compare", help="one query on every matcher of a preset, side by side")
    gallery_args(p, split="test")
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--image", help="query image path instead of text")
    p.add_argument("--like", help="a gallery image name: more like this")
    matcher_args(p, k=5)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="error analysis: where fast matchers and the teacher disagree")
    gallery_args(p, split="test")
    matcher_args(p)
    p.add_argument("--limit", type=int, help="analyse this many captions (evenly spaced), default all")
    p.add_argument("--cases", type=int, default=5, help="examples printed per matcher and direction")
    p.add_argument("--json", help="write summary and cases here")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("results", help="measured results as a table (CSV) and trade-off chart (HTML)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--csv")
    p.add_argument("--html")
    p.add_argument("--speed", choices=list(SPEED_METRICS), default="text-query latency (ms)")
    p.add_argument("--accuracy", choices=list(ACCURACY_METRICS), default="rsum")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("gallery-zip", help="safely extract a zip of images and index it with a preset")
    p.add_argument("zip")
    matcher_args(p)
    p.set_defaults(func=cmd_gallery_zip)
