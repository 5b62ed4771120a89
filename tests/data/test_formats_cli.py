"""The bundled teacher through ``python -m matcher eval`` on a gallery in another format: exactly the
recall of the same photos read from captions.jsonl, plus CLIP_benchmark's names and the note lines."""
import json
import os
import subprocess
import sys

import pytest

from matcher.data.cache import ArrayCache
from matcher.data.embed import embed_gallery
from matcher.data.gallery import open_gallery
from matcher.eval.costs import evaluate_embeddings
from matcher.registry import cached_encoder
from tests.data import formats
from tests.helpers import REPO

pytestmark = pytest.mark.slow
RECALLS = ("t2i", "i2t", "rsum", *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)))


def test_cli_eval_on_every_format_matches_captions_jsonl(tmp_path):
    rows = formats.rows_with_splits(20, 16)
    teacher, cache = cached_encoder("offline-teacher"), ArrayCache(tmp_path / "cache")

    def recall(path, split="test"):
        metrics = evaluate_embeddings(embed_gallery(teacher, open_gallery(path).select(split), cache))
        return {k: metrics[k] for k in RECALLS}

    reference = recall(formats.write_jsonl(tmp_path / "jsonl", rows))
    paths = {"karpathy": formats.write_karpathy(tmp_path / "karpathy", rows),
             "csv": formats.write_csv(tmp_path / "csv", rows),
             "imagefolder": formats.write_imagefolder(tmp_path / "imagefolder", rows),
             "webdataset": formats.write_webdataset(tmp_path / "webdataset", rows)}
    for fmt, path in paths.items():
        assert recall(path) == reference, fmt

    # one of them through the command line: COCO (one split, so --split test comes with a note)
    coco = formats.write_coco(tmp_path / "coco", rows[:16])
    data = json.loads(coco.read_text())
    data["annotations"].append({"image_id": 12345, "caption": "names no image"})
    coco.write_text(json.dumps(data))
    out = tmp_path / "eval.json"
    env = {**os.environ, "MATCHER_CACHE_DIR": str(tmp_path / "cli-cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "matcher", "eval", "--gallery", str(coco.parent.parent), "--split", "test",
                           "--roles", "teacher=offline-teacher", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: captions_val2014.json: annotations[80]: needs an 'image_id' of a listed image and a "
                     "'caption' string; skipped",
                     "note: the coco gallery has no split field: split 'test' is all 16 images"]
    row = json.loads(out.read_text())["matchers"]["teacher"]
    assert {k: row[k] for k in RECALLS} == {**reference, "rsum": pytest.approx(reference["rsum"])}
    assert row["images"] == 16 and row["captions"] == 80
