"""What open_clip architectures cost on a CPU Space: the `clip` preset's pair and smaller candidates.

Each architecture runs at random init in its own fresh process (weights do not change the cost;
hub weights cannot be downloaded here), with torch on 2 threads like a free 2-vCPU Space:
build time, parameters, peak memory, text-query latency (batch 1, tokenisation included, median
of 10), image throughput (batch 8, preprocessing included, on bundled photos), caption throughput
(batch 64). From those: the time to encode the bundled 1000 photos + 5000 captions, i.e. what a
cold start pays before the first query when no embedding cache exists (hub download not counted).

    python bench/space_costs.py --json assets/results/space-costs.json
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matcher.paths import DEFAULT_GALLERY  # noqa: E402

ARCHITECTURES = ["ViT-L-14", "MobileCLIP2-S0", "ViT-B-32", "ViT-B-16", "MobileCLIP2-S2"]
CLIP_PRESET = {"ViT-L-14": "teacher", "MobileCLIP2-S0": "student"}
QUERIES = ["two dogs play in the snow", "a man rides a bike on a dirt path", "children playing on the beach"]


def measure(model: str, images: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from matcher.data.images import load_rgb
    from matcher.eval.costs import peak_rss_mb
    from matcher.models.openclip import OpenClipEncoder

    started = time.perf_counter()
    encoder = OpenClipEncoder(model, None)
    build_s = time.perf_counter() - started
    photos = [load_rgb(p) for p in sorted((DEFAULT_GALLERY / "images").glob("*.jpg"))[:images]]
    encoder.encode_texts(QUERIES[:1]), encoder.encode_images(photos[:8], batch_size=8)  # warm-up
    latencies = []
    for i in range(10):
        t = time.perf_counter()
        encoder.encode_texts([QUERIES[i % len(QUERIES)]])
        latencies.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    encoder.encode_images(photos, batch_size=8)
    images_per_s = len(photos) / (time.perf_counter() - t)
    captions = [QUERIES[i % len(QUERIES)] + f" {i}" for i in range(64)]
    t = time.perf_counter()
    encoder.encode_texts(captions, batch_size=64)
    captions_per_s = len(captions) / (time.perf_counter() - t)
    return {"model": model, "role_in_clip_preset": CLIP_PRESET.get(model, "candidate"), "threads": threads,
            "build_s": round(build_s, 2), "params_M": round(encoder.num_params() / 1e6, 1),
            "size_mb": round(encoder.size_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 0),
            "text_query_ms": round(statistics.median(latencies), 1), "images_per_s": round(images_per_s, 2),
            "captions_per_s": round(captions_per_s, 1),
            "gallery_1000_encode_s": round(1000 / images_per_s + 5000 / captions_per_s, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=16, help="photos timed per model (batch 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write records here (and a .csv beside it)")
    args = parser.parse_args()
    records = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            record = pool.submit(measure, model, args.images, args.threads).result()
        print(json.dumps(record))
        records.append(record)
    by = {r["model"]: r for r in records}
    summary = {}
    if "ViT-L-14" in by and "MobileCLIP2-S0" in by:
        t, s = by["ViT-L-14"], by["MobileCLIP2-S0"]
        summary["clip_preset_cold_start_s"] = round(t["build_s"] + s["build_s"] + t["gallery_1000_encode_s"]
                                                    + s["gallery_1000_encode_s"], 0)
    result = {"command": "python bench/space_costs.py " + " ".join(sys.argv[1:]), "records": records, **summary,
              "load_average_before_last": [round(x, 2) for x in os.getloadavg()],
              "note": "random-init weights in a fresh process per model; hub download time not included; "
                      "cold start = build both models + encode the bundled 1000 photos and 5000 captions with each"}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        with open(path.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        print(f"wrote {path} and {path.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
