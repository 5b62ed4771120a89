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

from matcher.cli.common import (add_gallery, add_roles, add_search_options, fail, open_gallery_arg, roles_arg,
                                 search_options_arg)


def cmd_compare(args: argparse.Namespace) -> None:
    from matcher.dashboard.matchers import MatcherSet
    from matcher.data.images import UnreadableImage, load_rgb
    from matcher.search.protocol import QueryError

    mset = MatcherSet(roles_arg(args), open_gallery_arg(args))
    try:
        if args.image:
            columns = mset.search_image(load_rgb(args.image), search_options_arg(args))
        elif args.like:
            columns = mset.more_like(args.like, search_options_arg(args))
        else:
            columns = mset.search_text(args.query, search_options_arg(args))
    except (QueryError, UnreadableImage) as exc:
        fail(exc)
    for column in columns:
        print(f"== {column.role} ({column.spec})")
        if column.error:
            print(f"   {column.error}")
            continue
        for h in column.hits:
            print(f"{h.rank:4d}  {h.score:.4f}  {h.name}{'  ✓ ground truth' if h.match else ''}")
        print(f"   timings: {column.timings_text()}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from matcher.eval.analysis import analyse
    from matcher.dashboard.matchers import MatcherSet

    mset = MatcherSet(roles_arg(args), open_gallery_arg(args))
    matchers = {role: mset.matcher(role) for role in mset.roles}
    result = analyse(matchers, mset.gallery, k=args.k, options=search_options_arg(args), limit=args.limit)
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
    from matcher.eval.results import load_results, metrics_table, tradeoff_figure, write_csv

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
    from matcher.dashboard.matchers import MatcherSet
    from matcher.data.gallery import GalleryError, open_gallery
    from matcher.data.uploads import UploadError, extract_zip

    try:
        extracted = extract_zip(args.zip)
        gallery = open_gallery(extracted.root)
    except (UploadError, GalleryError) as exc:
        fail(exc)
    print(f"extracted to {extracted.root}{' (cached)' if extracted.from_cache else ''}: {extracted.files} files")
    for name, reason in extracted.skipped:
        print(f"  not used: {name}: {reason}")
    status = MatcherSet(roles_arg(args), gallery).warm()
    for role, error in status.items():
        print(f"  {role}: {'indexed' if not error else error}")


def add_commands(sub) -> None:
    """Register the dashboard commands on ``python -m matcher``'s sub-parsers."""
    from matcher.eval.results import ACCURACY_METRICS, SPEED_METRICS
    from matcher.paths import RESULTS_DIR

    p = sub.add_parser("compare", help="one query on every matcher of a preset, side by side")
    add_gallery(p, split="test")
    p.add_argument("query", nargs="?", default="")
    p.add_argument("--image", help="query image path instead of text")
    p.add_argument("--like", help="a gallery image name: more like this")
    add_roles(p)
    add_search_options(p, k=5)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="error analysis: where fast matchers and the teacher disagree")
    add_gallery(p, split="test")
    add_roles(p)
    add_search_options(p)
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
    add_roles(p)
    p.set_defaults(func=cmd_gallery_zip)
