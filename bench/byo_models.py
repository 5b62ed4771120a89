"""Bring your own models, end to end on real open_clip architectures (random init: no hub weights here).

A preset file names teacher ``open_clip:ViT-B-32``, student ``open_clip:MobileCLIP2-S0``, the
student's hashed tier (``hashed:...``) and its distilled variant (``distilled:... from ...``); the
hash and distilled heads train on a separate captioned gallery of bundled photos, and
``python -m matcher eval --preset-file`` evaluates a 100-photo gallery. Random weights give
chance-level recall: this checks the ladder runs and what it costs, not what it finds.

    python bench/byo_models.py --json assets/results/byo-models.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "assets" / "gallery" / "flickr8k-test"
PRESET = {"teacher": "open_clip:ViT-B-32", "student": "open_clip:MobileCLIP2-S0",
          "hashed": "hashed:open_clip:MobileCLIP2-S0",
          "distilled": "distilled:open_clip:MobileCLIP2-S0 from open_clip:ViT-B-32"}


def write_gallery(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True)
    for row in rows:
        shutil.copy(BUNDLED / "images" / row["image"], root / row["image"])
    (root / "captions.jsonl").write_text("".join(json.dumps({**row, "split": "test"}) + "\n" for row in rows))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=100)
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--json", default="assets/results/byo-models.json")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (BUNDLED / "captions.jsonl").read_text().splitlines()]
    work = Path(tempfile.mkdtemp(prefix="matcher-byo-"))
    try:
        gallery = write_gallery(work / "gallery", rows[:args.gallery_size])
        train = write_gallery(work / "train", rows[args.gallery_size:args.gallery_size + args.train_size])
        preset = work / "byo.json"
        preset.write_text(json.dumps(PRESET, indent=2))
        out = work / "eval.json"
        command = [sys.executable, "-m", "matcher", "eval", "--preset-file", str(preset), "--gallery", str(gallery),
                   "--split", "test", "--train-gallery", str(train), "--json", str(out)]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env={**__import__("os").environ, "MATCHER_CACHE_DIR": str(work / "cache"),
                                                       "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        report = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python bench/byo_models.py " + " ".join(sys.argv[1:]),
              "eval_command": "python -m matcher eval --preset-file byo.json --gallery G --split test "
                              "--train-gallery G2 --json out.json",
              "preset": PRESET, "gallery_images": args.gallery_size, "train_images": args.train_size,
              "wall_s_cold_cache": round(seconds, 1), "report": report,
              "note": "random-init architectures: recall is at chance; the run shows every tier opens, trains its "
                      "heads on the training gallery and is evaluated"}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(proc.stdout[-2500:])
    print(f"wrote {args.json} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
