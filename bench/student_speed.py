"""Image throughput of the teacher and of the student's image tower at several input sizes, end to end.

The path ``python -m matcher eval`` times (``Encoder.encode_images``: preprocessing included, batch 8,
channels-last), with the committed student's weights run at each size, rounds interleaved
(teacher, 112, 128, ..., teacher, ...) so that load on the machine hits every entry alike. It answers
one question: which student input sizes keep the >= 5x image-throughput target against the teacher.

    python bench/student_speed.py [--sizes 112,128,144] [--threads 2] [--json assets/results/student-speed.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from matcher.atomic import write_json  # noqa: E402
from matcher.eval.costs import machine_description, time_interleaved  # noqa: E402
from matcher.data.images import load_rgb  # noqa: E402
from matcher.registry import load_encoder  # noqa: E402
from matcher.paths import DEFAULT_GALLERY  # noqa: E402
from matcher.models.towers import image_transform  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="112,128,144")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", default="assets/results/student-speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in (Path(DEFAULT_GALLERY) / "images").iterdir())[: args.images]
    images = [load_rgb(p) for p in paths]
    teacher = load_encoder("offline-teacher")
    students = {}
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        student = load_encoder("offline-student")
        student.module.image_tower.image_size = size
        student.preprocess = image_transform(size)
        students[size] = student
    entries = {"teacher": teacher, **{f"student@{s}": e for s, e in students.items()}}
    speeds = time_interleaved(entries, images, rounds=args.rounds)
    teacher_rate = speeds["teacher"].images_per_s
    rows = [{"model": name, "images_per_s": round(sp.images_per_s, 1),
             "min": round(sp.images_per_s_range[0], 1), "max": round(sp.images_per_s_range[1], 1),
             "speedup_vs_teacher": round(sp.images_per_s / teacher_rate, 2),
             "text_query_ms": round(sp.text_query_ms, 2)} for name, sp in speeds.items()]
    for row in rows:
        print(row)
    write_json(args.json, {"command": "python bench/student_speed.py " + " ".join(sys.argv[1:]),
                           "machine": {**machine_description(), "threads": args.threads},
                           "note": "matcher.eval.costs.time_interleaved: encode_images (preprocessing included), batch 8, channels-last, BN folded; "
                                   f"{len(images)} bundled test photos; median of {args.rounds} interleaved rounds",
                           "records": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
