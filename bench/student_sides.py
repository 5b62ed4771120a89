"""Which student tower limits the student: each one trained alone against the teacher's other tower.

Three runs of the committed student's recipe (``assets/models/offline-student.train.json``) with the
same, shorter budget and seed:

- ``none``:  the student as usual (both of its towers);
- ``text``:  the student's *image* tower trained and scored against the teacher's fixed caption embeddings;
- ``image``: the student's *text* tower trained and scored against the teacher's fixed image embeddings.

The gap between ``text``/``image`` and the teacher's own val rsum is what each student tower loses
on its own; the gap between them and ``none`` is what the other tower adds on top.

    python bench/student_sides.py [--epochs 8] [--sides none,text,image] [--json assets/results/student-sides.json]

Each side is one ``train-student`` run (``StudentRecipe.teacher_side``); sides can be run in
separate processes (``--sides text --threads 1``) and are merged into the same JSON file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from matcher.atomic import write_json  # noqa: E402
from matcher.cli.common import DEFAULT_DATA  # noqa: E402
from matcher.eval.costs import machine_description  # noqa: E402
from matcher.train.student import StudentRecipe, train_student  # noqa: E402

COMMITTED = Path("assets/models/offline-student.train.json")
TEACHER_VAL_RSUM = "assets/models/offline-teacher.train.json"


def teacher_val_rsum() -> float:
    meta = json.loads(Path(TEACHER_VAL_RSUM).read_text())
    return float(meta["best"]["val"]["rsum"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sides", default="none,text,image")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", default="assets/results/student-sides.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = json.loads(COMMITTED.read_text())["recipe"]
    out = Path(args.json)
    header = {"recipe": {**base, "epochs": args.epochs}, "teacher_val_rsum": teacher_val_rsum(),
              "command": f"python bench/student_sides.py --epochs {args.epochs}"}
    for side in args.sides.split(","):
        recipe = StudentRecipe(**{**base, "epochs": args.epochs, "teacher_side": side})
        with tempfile.TemporaryDirectory() as tmp:
            trained = train_student(args.data, Path(tmp) / "student.pt", recipe)
        # Re-read before writing: another process may have added its side meanwhile.
        report = json.loads(out.read_text()) if out.exists() else {}
        if report.get("recipe") != header["recipe"]:
            report = {"runs": {}}
        report.update(header)
        report.setdefault("runs", {})[side] = {
            "best_epoch": trained["best_epoch"], "val": trained["val"],
            "val_rsum_by_epoch": [round(h["val_rsum"], 2) for h in trained["history"]],
            "machine": machine_description()}
        write_json(out, report)
        print(f"{side}: val rsum {trained['val']['rsum']:.1f} (teacher {header['teacher_val_rsum']:.1f})", flush=True)

if __name__ == "__main__":
    main()
