"""First-query latency of ``python app.py``: the README's main command, measured end to end.

Starts the app (offline preset unless --preset), records how long until the page is served and
until the models + gallery embeddings are loaded (empty vs filled embedding cache), then sends
the first text query through the API (gradio_client) and times the answer in all columns.

    python bench/first_query.py [--cold] [--json assets/results/first_query.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import AppServer  # noqa: E402

QUERIES = ["two dogs play in the snow", "a man rides a bike on a dirt path", "children playing on the beach",
           "a woman in a red coat", "a group of people outside a building"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--roles", help="role=spec pairs instead of a preset (see app.py --roles)")
    parser.add_argument("--cold", action="store_true", help="use an empty embedding cache (a fresh clone's first start)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    env = {"HF_HUB_OFFLINE": "1"}
    if args.cold:
        env["MATCHER_CACHE_DIR"] = tempfile.mkdtemp(prefix="matcher-cold-")
    extra = ["--preset", args.preset] if args.preset else []
    if args.roles:
        extra = ["--roles", args.roles]
    server = AppServer(*extra, env=env)
    try:
        serving = server.wait_serving()
        warm = server.wait_warm()
        from gradio_client import Client

        client = Client(server.url, verbose=False, download_files=False)
        timings = []
        for q in QUERIES:
            started = time.perf_counter()
            out = client.predict(text=q, k=8, api_name="/search_text")
            timings.append((time.perf_counter() - started) * 1000)
        columns = sum(1 for item in out[2::2] if isinstance(item, list) and item)
        result = {
            "command": "python app.py", "preset": args.preset or "offline (default)", "cold_cache": args.cold,
            "serving_s": round(serving, 2), "warm_s": round(warm, 2),
            "first_query_ms": round(timings[0], 1), "next_queries_ms_median": round(statistics.median(timings[1:]), 1),
            "columns_with_results": columns, "machine": {"cpu": platform.processor() or platform.machine(),
                                                       "cores": os.cpu_count()},
            "note": "client-side wall time through gradio_client (HTTP + queue + all matchers), after warm-up",
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
