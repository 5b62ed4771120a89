"""Small real inputs shared by the tests: galleries made from bundled photos, fixture results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "assets" / "gallery" / "flickr8k-test"


def bundled_rows(n: int) -> list[dict]:
    lines = (BUNDLED / "captions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def make_gallery(root: Path, n: int) -> Path:
    """A gallery folder with the first ``n`` bundled test photos and their captions."""
    root.mkdir(parents=True, exist_ok=True)
    rows = bundled_rows(n)
    for row in rows:
        target = root / Path(row["image"]).name
        shutil.copy(BUNDLED / "images" / row["image"], target)
        row["image"] = target.name
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_flickr8k(root: Path, splits: dict[str, int]) -> Path:
    """A Flickr8k-layout folder (images/ + captions.jsonl with splits) from the bundled test photos."""
    rows = bundled_rows(sum(splits.values()))
    (root / "images").mkdir(parents=True)
    labels = [name for name, n in splits.items() for _ in range(n)]
    for row, split in zip(rows, labels):
        shutil.copy(BUNDLED / "images" / row["image"], root / "images" / row["image"])
        row["split"] = split
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


FIXTURE_EVAL = {
    "gallery": "fixture", "split": "test",
    "matchers": {
        "teacher": {"t2i": {"R@1": 30.0, "R@5": 60.0, "R@10": 72.0}, "i2t": {"R@1": 40.0, "R@5": 70.0, "R@10": 80.0},
                    "rsum": 352.0, "params": 25_000_000, "size_mb": 100.0, "text_query_ms": 9.0, "images_per_s": 40.0},
        "student": {"t2i": {"R@1": 25.0, "R@5": 55.0, "R@10": 68.0}, "i2t": {"R@1": 33.0, "R@5": 64.0, "R@10": 75.0},
                    "rsum": 320.0, "params": 5_000_000, "size_mb": 20.0, "text_query_ms": 3.0, "images_per_s": 150.0},
        "hashed-64": {"t2i": {"R@1": 22.0, "R@5": 50.0, "R@10": 63.0}, "i2t": {"R@1": 30.0, "R@5": 60.0, "R@10": 71.0},
                      "rsum": 296.0, "params": 5_000_000, "size_mb": 20.0, "text_query_ms": 3.1, "images_per_s": 150.0,
                      "bytes_per_item": 8, "candidate_recall": 0.97},
    },
}


def measured_recall_fixed_costs(specs, gallery):
    """A ``build_report`` measure: real recall of each encoder on the gallery, fixed costs (so two runs
    compare exactly and no child processes are spawned)."""
    from matcher.data.embed import embed_gallery
    from matcher.eval.costs import evaluate_embeddings
    from matcher.registry import cached_encoder

    rows = {}
    for i, spec in enumerate(specs):
        row = evaluate_embeddings(embed_gallery(cached_encoder(spec), gallery))
        row.update(spec=spec, params=1000 * (i + 1), size_mb=1.0 + i, peak_rss_mb=10.0, text_query_ms=2.0 + i,
                   images_per_s=100.0 / (i + 1), text_query_ms_range=[2.0, 3.0], images_per_s_range=[90.0, 110.0])
        rows[spec] = row
    return rows
