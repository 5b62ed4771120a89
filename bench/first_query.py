"""First-query latency of ``python app.py`` (the README's main command), measured end to end.

Two starts of the app, offline, against the bundled 1000-photo gallery:
1. *cold*: an empty embedding cache, as on a fresh clone: the warm-up thread encodes the gallery;
2. *warm*: a second start with the cache the first one filled (every later start).
For each: seconds until the page is served, seconds until models + embeddings are loaded, then the
first text query's wall time through the API (gradio_client: HTTP + queue + every matcher column),
and the median of the next four.

    python bench/first_query.py [--roles ...] [--json assets/results/first_query.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import AppServer, gallery_items  # noqa: E402

QUERIES = ["two dogs play in the snow", "a man rides a bike on a dirt path", "children playing on the beach",
           "a woman in a red coat", "a group of people outside a building"]


def one_start(extra: list[str], cache: str) -> dict:
    server = AppServer(*extra, env={"HF_HUB_OFFLINE": "1", "MATCHER_CACHE_DIR": cache})
    try:
        serving = server.wait_serving()
        warm = server.wait_warm()
        from gradio_client import Client

        client = Client(server.url, verbose=False, download_files=False)
        timings, out = [], None
        for q in QUERIES:
            started = time.perf_counter()
            out = client.predict(text=q, k=8, api_name="/search_text")
            timings.append((time.perf_counter() - started) * 1000)
        columns = sum(1 for item in out[2:] if len(gallery_items(item)) == 8)
        stages = [line.split("warm: ", 1)[1] for line in server.lines if "warm: " in line]
        return {"serving_s": round(serving, 2), "warm_s": round(warm, 2), "first_query_ms": round(timings[0], 1),
                "next_queries_ms_median": round(statistics.median(timings[1:]), 1), "columns_filled": columns,
                "warm_log": stages[0] if stages else None, "first_query_status": out[0]}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--roles", help="role=spec pairs instead of a preset (see app.py --roles)")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--cache-dir", help="embedding cache to use and keep (emptied first); default: a temporary one")
    args = parser.parse_args()
    extra = ["--roles", args.roles] if args.roles else (["--preset", args.preset] if args.preset else [])
    cache = args.cache_dir or tempfile.mkdtemp(prefix="matcher-bench-cache-")
    shutil.rmtree(cache, ignore_errors=True)
    Path(cache).mkdir(parents=True)
    load_before = os.getloadavg()
    try:
        result = {
            "command": "python app.py " + " ".join(extra), "roles": args.roles or (args.preset or "offline preset"),
            "cold": one_start(extra, cache), "warm": one_start(extra, cache),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_average_before": [round(x, 2) for x in load_before]},
            "note": "client-side wall time of text queries through gradio_client after the warm-up thread finished",
        }
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
