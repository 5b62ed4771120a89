"""The first bundled test photos written out in every manifest format ``matcher.data.readers`` reads,
each laid out the way that format's users keep it (tests/data/test_readers.py, docs/data.md)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd

from tests.helpers import BUNDLED, bundled_rows


def rows_with_splits(n: int, test: int) -> list[dict]:
    """The first ``n`` bundled rows, the first ``test`` of them in split 'test', the rest in 'val'."""
    rows = bundled_rows(n)
    for i, row in enumerate(rows):
        row["split"] = "test" if i < test else "val"
    return rows


def _copy(rows: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copy(BUNDLED / "images" / row["image"], folder / row["image"])


def write_jsonl(root: Path, rows: list[dict]) -> Path:
    _copy(rows, root / "images")
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_karpathy(root: Path, rows: list[dict]) -> Path:
    _copy(rows, root / "Flicker8k_Dataset")
    images = [{"filepath": "Flicker8k_Dataset", "filename": r["image"], "imgid": i, "split": r["split"],
               "sentences": [{"raw": c, "tokens": c.lower().split()} for c in r["captions"]]} for i, r in enumerate(rows)]
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def write_coco(root: Path, rows: list[dict]) -> Path:
    """``annotations/captions_val2014.json`` next to ``val2014/`` (COCO has no split field: one file per split)."""
    _copy(rows, root / "val2014")
    images = [{"id": 100 + i, "file_name": r["image"], "width": 224, "height": 224} for i, r in enumerate(rows)]
    annotations = [{"id": len(images) * j + i, "image_id": 100 + i, "caption": c}
                   for i, r in enumerate(rows) for j, c in enumerate(r["captions"])]
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "images": images, "licenses": [], "annotations": annotations}))
    return path


def write_csv(root: Path, rows: list[dict], sep: str = ",") -> Path:
    _copy(rows, root / "photos")
    table = pd.DataFrame([{"image": f"photos/{r['image']}", "caption": c, "split": r["split"]}
                          for r in rows for c in r["captions"]])
    path = root / ("pairs.tsv" if sep == "\t" else "pairs.csv")
    table.to_csv(path, sep=sep, index=False)
    return path


def write_imagefolder(root: Path, rows: list[dict]) -> Path:
    """``<split>/metadata.jsonl`` with ``text`` as a list (and ``validation/`` as metadata.csv, one caption)."""
    for split, folder in (("test", "test"), ("val", "validation")):
        part = [r for r in rows if r["split"] == split]
        _copy(part, root / folder)
        if folder == "test":
            (root / folder / "metadata.jsonl").write_text(
                "".join(json.dumps({"file_name": r["image"], "text": r["captions"]}) + "\n" for r in part))
        else:
            pd.DataFrame([{"file_name": r["image"], "text": r["captions"][0]} for r in part]).to_csv(
                root / folder / "metadata.csv", index=False)
    return root


def write_webdataset(root: Path, rows: list[dict], shards: int = 2) -> Path:
    """img2dataset-style shards: even samples carry captions in ``.txt`` (split in ``.json``), odd ones
    only a ``.json`` with ``captions`` and ``split``."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i, row in enumerate(rows[s * per:(s + 1) * per], s * per):
                key = f"{s:05d}{i:04d}"
                files = {"jpg": (BUNDLED / "images" / row["image"]).read_bytes()}
                if i % 2 == 0:
                    files["txt"] = "\n".join(row["captions"]).encode()
                    files["json"] = json.dumps({"key": key, "split": row["split"]}).encode()
                else:
                    files["json"] = json.dumps({"key": key, "captions": row["captions"], "split": row["split"]}).encode()
                for suffix, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root / ("{00000..%05d}.tar" % (shards - 1))
