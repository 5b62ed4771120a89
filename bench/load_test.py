"""Load test: N concurrent gradio_client clients x M text queries against ``python app.py``.

Queries are real captions of the bundled test split (different per client). Every answer must
fill every matcher column; anything else counts as an error. Writes p50/p95/p99 latency,
throughput and the error count to ``assets/results/load.json``.

    python bench/load_test.py --clients 16 --queries 10          # starts its own server
    python bench/load_test.py --url http://127.0.0.1:7860/       # against a running one
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import REPO, AppServer, gallery_items  # noqa: E402


def captions(n: int) -> list[str]:
    rows = (REPO / "assets" / "gallery" / "flickr8k-test" / "captions.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(rows):
        out.append(json.loads(line)["captions"][i % 5])
        if len(out) == n:
            break
    return out


def run_client(url: str, queries: list[str], k: int, latencies: list, errors: list, expected_columns: int) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=False)
    except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
        errors.extend([f"connect: {exc}"] * len(queries))
        return
    for q in queries:
        started = time.perf_counter()
        try:
            out = client.predict(text=q, k=k, api_name="/search_text")
            elapsed = (time.perf_counter() - started) * 1000
            filled = [g for g in out[2::2] if len(gallery_items(g)) == k]
            if len(filled) < expected_columns:
                errors.append(f"only {len(filled)} of {expected_columns} columns filled for {q!r}: {out[0]}")
            else:
                latencies.append(elapsed)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start python app.py on a free port")
    parser.add_argument("--roles", help="role=spec pairs for the started app (see app.py --roles)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--columns", type=int, default=None, help="columns every answer must fill (default: all roles)")
    parser.add_argument("--json", default=str(REPO / "assets" / "results" / "load.json"))
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        server = AppServer(*(["--roles", args.roles] if args.roles else []), env={"HF_HUB_OFFLINE": "1"})
        server.wait_serving()
        server.wait_warm()
        url = server.url
    try:
        from gradio_client import Client

        probe = Client(url, verbose=False, download_files=False).predict(text="a dog", k=args.k, api_name="/search_text")  # warm path
        columns = args.columns or sum(1 for g in probe[2::2] if gallery_items(g))
        pool = captions(args.clients * args.queries)
        latencies, errors, threads = [], [], []
        started = time.perf_counter()
        for c in range(args.clients):
            qs = pool[c * args.queries:(c + 1) * args.queries]
            threads.append(threading.Thread(target=run_client, args=(url, qs, args.k, latencies, errors, columns)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        lat = np.asarray(latencies)
        result = {
            "command": f"python bench/load_test.py --clients {args.clients} --queries {args.queries}"
                       + (f" --roles {args.roles}" if args.roles else ""),
            "roles": args.roles or "the app's default preset",
            "clients": args.clients, "queries_per_client": args.queries, "k": args.k, "columns": columns,
            "requests": args.clients * args.queries, "ok": int(len(lat)), "errors": len(errors),
            "error_examples": errors[:5],
            "latency_ms": {p: round(float(np.percentile(lat, q)), 1) for p, q in
                           (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))} if len(lat) else {},
            "throughput_qps": round(len(lat) / wall, 2), "wall_s": round(wall, 1),
            "server": "python app.py (queue on; search concurrency 4)",
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_avg_1min_at_end": round(os.getloadavg()[0], 2)},
            "note": "client-side latency per text query through gradio_client, all matcher columns filled",
        }
        print(json.dumps(result, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
