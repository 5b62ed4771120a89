"""What moves the teacher/student image-throughput ratio: the allocator, the batch size, bf16.

Each setting is timed the way ``python -m matcher eval`` times images (``time_interleaved``:
``Encoder.encode_images`` with preprocessing, teacher and student rounds interleaved in one
process), on the bundled test photos:

- allocator: glibc's defaults (``MATCHER_GLIBC_MALLOC_DEFAULTS=1``) against the setting ``matcher``
  applies on import (``matcher.runtime.keep_freed_memory``); every setting runs in its own process,
  ``--repeats`` times, because the defaults' cost differs from one process to the next;
- batch size: 1, 8 (what eval uses) and 16 (what gallery encoding uses);
- precision: float32 (what both matchers serve) and bfloat16 autocast, only where the CPU has native
  bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), to show whether lower precision would change the ratio.

    python bench/image_speed_options.py [--repeats 2] [--json assets/results/image-speed-options.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(batch_sizes: list[int], images: int, rounds: int) -> list[dict]:
    """In this process: teacher and student per batch size and precision, rounds interleaved."""
    import torch

    from matcher.eval.costs import time_interleaved
    from matcher.data.images import load_rgb
    from matcher.registry import load_encoder
    from matcher.paths import DEFAULT_GALLERY

    photos = [load_rgb(p) for p in sorted((Path(DEFAULT_GALLERY) / "images").iterdir())[:images]]
    encoders = {"teacher": load_encoder("offline-teacher"), "student": load_encoder("offline-student")}
    precisions = ["float32"] + (["bfloat16"] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    rows = []
    for precision in precisions:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
        for batch in batch_sizes:
            with autocast:
                speeds = time_interleaved(encoders, photos, rounds=rounds, queries=1, batch_size=batch)
            teacher, student = speeds["teacher"].images_per_s, speeds["student"].images_per_s
            rows.append({"precision": precision, "batch": batch, "teacher_images_per_s": round(teacher, 1),
                         "student_images_per_s": round(student, 1), "ratio": round(student / teacher, 2),
                         "teacher_range": [round(v, 1) for v in speeds["teacher"].images_per_s_range],
                         "student_range": [round(v, 1) for v in speeds["student"].images_per_s_range]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per allocator setting")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="assets/results/image-speed-options.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.child:  # one process, one allocator setting: rows as JSON on stdout
        print(json.dumps(measure(batch_sizes, args.images, args.rounds)))
        return

    from matcher.atomic import write_json
    from matcher.eval.costs import machine_description

    rows = []
    for repeat in range(args.repeats):
        for allocator in ("glibc defaults", "matcher.runtime"):
            env = {**os.environ, "MATCHER_GLIBC_MALLOC_DEFAULTS": "1" if allocator == "glibc defaults" else "0"}
            out = subprocess.run([sys.executable, __file__, "--child", "--batch-sizes", args.batch_sizes,
                                  "--images", str(args.images), "--rounds", str(args.rounds)],
                                 env=env, capture_output=True, text=True, check=True, cwd=ROOT)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                row = {"allocator": allocator, "process": repeat + 1, **row}
                rows.append(row)
                print(row, flush=True)
    write_json(args.json, {"command": "python bench/image_speed_options.py " + " ".join(sys.argv[1:]),
                           "machine": machine_description(),
                           "note": "time_interleaved (encode_images incl. preprocessing), teacher and student "
                                   f"interleaved, {args.images} bundled test photos, median of {args.rounds} rounds; "
                                   "ratio = student images/s / teacher images/s",
                           "records": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
