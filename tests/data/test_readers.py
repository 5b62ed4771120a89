"""Every manifest format reads the same gallery and gives exactly the same recall; bad manifests are
reported, never fatal; the CLIP_benchmark names; the CLI's --format/--images and note lines."""
import argparse
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from matcher.cli.common import add_gallery, open_gallery_arg
from matcher.data.cache import ArrayCache
from matcher.data.embed import embed_gallery
from matcher.data.gallery import GalleryError, open_gallery
from matcher.data.readers import FORMATS, detect
from matcher.eval.metrics import retrieval_metrics
from matcher.registry import load_encoder
from tests.data import formats
from tests.helpers import make_gallery

N, TEST = 20, 16   # the first 20 bundled photos, the first 16 of them in split 'test'
WRITERS = {
    "karpathy": formats.write_karpathy, "csv": formats.write_csv,
    "tsv": lambda root, rows: formats.write_csv(root, rows, sep="\t"),
    "imagefolder": formats.write_imagefolder, "webdataset": formats.write_webdataset,
    "coco": lambda root, rows: formats.write_coco(root, rows[:TEST]),   # no split field: the test split's own file
}


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("open_clip:matcher-tiny-vit")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, encoder):
    """The captions.jsonl gallery's test split: its content and its recall."""
    root = formats.write_jsonl(tmp_path_factory.mktemp("jsonl"), formats.rows_with_splits(N, TEST))
    gallery = open_gallery(root).select("test")
    emb = embed_gallery(encoder, gallery, ArrayCache(tmp_path_factory.mktemp("cache")))
    return _content(gallery), retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image)


def _content(gallery) -> dict[str, list[str]]:
    """{photo bytes' identity: captions}: the same photos and captions whatever the names."""
    return {gallery.path(n).read_bytes()[-64:].hex(): gallery.captions[n] for n in gallery.names}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_gives_exactly_the_recall_of_captions_jsonl(fmt, tmp_path, encoder, reference):
    path = WRITERS[fmt](tmp_path / fmt, formats.rows_with_splits(N, TEST))
    name = "csv" if fmt == "tsv" else fmt
    assert detect(path) == name
    gallery = open_gallery(path)
    assert gallery.format == name and not gallery.problems
    test = gallery.select("test")
    assert len(test) == TEST and _content(test) == reference[0]
    if fmt == "coco":
        assert test.notes == [f"the coco gallery has no split field: split 'test' is all {TEST} images"]
    else:
        assert len(gallery) == N and len(gallery.select("validation" if fmt == "imagefolder" else "val")) == N - TEST
    emb = embed_gallery(encoder, test, ArrayCache(tmp_path / "cache"))
    assert retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image) == reference[1]


def test_detection_from_folders_files_and_patterns(tmp_path):
    rows = formats.rows_with_splits(4, 2)
    karpathy = formats.write_karpathy(tmp_path / "k", rows)
    coco = formats.write_coco(tmp_path / "c", rows)
    shards = formats.write_webdataset(tmp_path / "w", rows)
    assert [detect(p) for p in (karpathy, karpathy.parent, coco, coco.parent.parent, shards, tmp_path / "w" / "*.tar",
                                tmp_path / "w" / "00001.tar")] == ["karpathy"] * 2 + ["coco"] * 2 + ["webdataset"] * 3
    assert len(open_gallery(tmp_path / "w" / "00001.tar")) == 2
    # a plain folder of images is the folder format without captions
    assert detect(tmp_path / "c" / "val2014") == "jsonl" and not open_gallery(tmp_path / "c" / "val2014").captions
    # --format overrides detection; --images moves the image root
    assert open_gallery(coco, format="coco").format == "coco"
    assert len(open_gallery(coco, images=tmp_path / "c" / "val2014")) == 4
    with pytest.raises(GalleryError, match="unknown gallery format 'parquet'"):
        open_gallery(coco, format="parquet")
    with pytest.raises(GalleryError, match="no images found .*looked under .*k; first problem: captions_val2014.json: "
                                           r"images\[0\]: .*jpg: no such file"):
        open_gallery(coco, images=tmp_path / "k")
    (tmp_path / "lonely.json").write_text(coco.read_text())
    with pytest.raises(GalleryError, match="if the images live elsewhere, pass --images DIR"):
        open_gallery(tmp_path / "lonely.json")
    (tmp_path / "k" / "dataset_other.json").write_text(karpathy.read_text())
    with pytest.raises(GalleryError, match="several Karpathy split files"):
        open_gallery(tmp_path / "k")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GalleryError, match="cannot tell the format"):
        open_gallery(tmp_path / "notes.txt")
    assert set(FORMATS) == {"jsonl", "karpathy", "coco", "csv", "imagefolder", "webdataset"}


def test_webdataset_shards_are_extracted_once(tmp_path, monkeypatch):
    from matcher.data.readers import webdataset

    shards = formats.write_webdataset(tmp_path / "w", formats.rows_with_splits(4, 2))
    first = open_gallery(shards)
    monkeypatch.setattr(webdataset, "_extract", lambda *a: pytest.fail("extracted twice"))
    again = open_gallery(shards)
    assert again.root == first.root and again.names == first.names and again.captions == first.captions


def test_bad_manifest_lines_are_skipped_and_each_reported_once(tmp_path, encoder):
    root = make_gallery(tmp_path / "g", 6)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    lines = [json.dumps(rows[0]), "{not json", json.dumps(rows[1]), json.dumps({**rows[2], "image": "gone.jpg"}),
             json.dumps(rows[0]), json.dumps({**rows[3], "captions": []}), json.dumps({"image": 5}),
             json.dumps(rows[4]), json.dumps({**rows[5], "image": "../../etc/passwd"}), json.dumps(rows[5])]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    gallery = open_gallery(root)
    assert gallery.problems == [
        ("captions.jsonl:2", gallery.problems[0][1]),
        ("captions.jsonl:7", "bad line (needs an 'image' string); skipped"),
        ("captions.jsonl:4", "gone.jpg: no such file; skipped"),
        ("captions.jsonl:5", f"{rows[0]['image']}: listed again (first at captions.jsonl:1); skipped"),
        ("captions.jsonl:6", f"{rows[3]['image']}: no captions; skipped (the image stays searchable)"),
        ("captions.jsonl:9", "../../etc/passwd: outside the gallery folder; skipped"),
    ]
    assert gallery.problems[0][1].startswith("bad line (not JSON")
    # the rest evaluates: 4 captioned photos + the two listed wrongly, searchable and uncaptioned
    assert [n for n in gallery.names if gallery.captions.get(n)] == [rows[i]["image"] for i in (0, 1, 4, 5)]
    assert len(gallery) == 6
    emb = embed_gallery(encoder, gallery.select("test"), ArrayCache(tmp_path / "cache"))
    assert len(emb.caption_texts) == 20 and retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image)["rsum"] > 0


def test_bad_entries_in_other_formats(tmp_path):
    rows = formats.rows_with_splits(4, 4)
    table = formats.write_csv(tmp_path / "v", rows)
    text = table.read_text().splitlines()
    text.insert(3, 'photos/x.jpg,"a caption",test,surplus')   # line 4: one field too many
    text.append(",orphan caption,test")                      # no image name
    table.write_text("\n".join(text) + "\n")
    gallery = open_gallery(table)
    assert gallery.problems == [("pairs.csv:4", "bad line (expected 3 fields, saw 4); skipped"),
                                (f"pairs.csv:{len(text)}", "no image name; skipped")]
    assert len(gallery) == 4 and all(len(c) == 5 for c in gallery.captions.values())

    coco = formats.write_coco(tmp_path / "c", rows)
    data = json.loads(coco.read_text())
    data["images"].append({"id": 100, "file_name": "again.jpg"})
    data["annotations"].append({"image_id": 999, "caption": "of no image"})
    coco.write_text(json.dumps(data))
    assert open_gallery(coco).problems == [
        ("captions_val2014.json: images[4]", "image id 100 listed again; skipped"),
        ("captions_val2014.json: annotations[20]", "needs an 'image_id' of a listed image and a 'caption' string; skipped")]

    formats.write_webdataset(tmp_path / "w", rows)   # samples 0, 1 in shard 0; 2, 3 in shard 1
    second = tmp_path / "w" / "00001.tar"
    second.write_bytes(second.read_bytes()[:3000])              # cut inside sample 2's photo
    with tarfile.open(tmp_path / "w" / "00002.tar", "w") as tar:
        info = tarfile.TarInfo("lonely.txt")
        tar.addfile(info, io.BytesIO(b""))
    gallery = open_gallery(tmp_path / "w")
    assert len(gallery) == 2 and [p[0] for p in gallery.problems] == ["00001.tar", "00001.tar:000010002.jpg",
                                                                      "00002.tar:lonely.txt"]
    assert "unexpected end of data" in gallery.problems[0][1] and "no .jpg/.png/.webp image" in gallery.problems[2][1]

    karpathy = formats.write_karpathy(tmp_path / "k", rows)
    data = json.loads(karpathy.read_text())
    data["images"][1]["sentences"] = []
    data["images"][2].pop("filename")
    karpathy.write_text(json.dumps(data))
    assert open_gallery(karpathy).problems == [
        ("dataset_flickr8k.json: images[2]", "needs a 'filename' string; skipped"),
        ("dataset_flickr8k.json: images[1]", f"Flicker8k_Dataset/{rows[1]['image']}: no captions; skipped")]


def test_images_with_other_than_five_captions(tmp_path, encoder):
    """COCO has 6 or 7 captions on some images: every caption is a query, an image hit counts any of them."""
    rows = formats.rows_with_splits(5, 5)
    rows[0]["captions"] += ["one more caption", "and a seventh"]
    rows[1]["captions"] = rows[1]["captions"][:1]
    gallery = open_gallery(formats.write_coco(tmp_path, rows))
    emb = embed_gallery(encoder, gallery, ArrayCache(tmp_path / "cache"))
    assert len(emb.caption_texts) == 7 + 1 + 15 and np.bincount(emb.caption_image).tolist() == [7, 1, 5, 5, 5]
    metrics = retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image)
    for k in (1, 5, 10):   # CLIP_benchmark's names: the same recalls as fractions
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(metrics["t2i"][f"R@{k}"] / 100)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(metrics["i2t"][f"R@{k}"] / 100)
    assert metrics["image_retrieval_recall@5"] == 1.0   # 5 images: each caption finds its own in the top 5


def test_cli_gallery_arguments_print_problems_as_notes(tmp_path, capsys):
    coco = formats.write_coco(tmp_path, formats.rows_with_splits(3, 3))
    data = json.loads(coco.read_text())
    data["images"].append({"id": 7, "file_name": "gone.jpg"})
    coco.write_text(json.dumps(data))
    parser = argparse.ArgumentParser()
    add_gallery(parser, split="test")
    args = parser.parse_args(["--gallery", str(coco), "--format", "coco", "--images", str(tmp_path / "val2014")])
    assert len(open_gallery_arg(args)) == 3
    assert capsys.readouterr().out.splitlines() == [
        "note: captions_val2014.json: images[3]: gone.jpg: no such file; skipped",
        "note: the coco gallery has no split field: split 'test' is all 3 images"]
    with pytest.raises(SystemExit, match="error: images folder not found"):
        open_gallery_arg(parser.parse_args(["--gallery", str(coco), "--images", str(tmp_path / "nowhere")]))


def test_results_tables_read_reports_with_clip_benchmark_names(tmp_path):
    from matcher.eval.results import load_results

    sim = np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.7, 0.2, 0.6], [0.1, 0.9, 0.3]])
    row = {**retrieval_metrics(sim, np.array([0, 1, 2, 2])), "params": 1, "size_mb": 1.0,
           "text_query_ms": 1.0, "images_per_s": 1.0}
    (tmp_path / "eval-test.json").write_text(json.dumps({"gallery": "g", "split": "test", "matchers": {"m": row}}))
    table = load_results(tmp_path).table("eval")
    assert table.loc[0, "t2i.R@1"] == 50.0 and table.loc[0, "image_retrieval_recall@1"] == 0.5   # captions 2, 3 miss
    assert table.loc[0, "i2t.R@1"] == pytest.approx(200 / 3) and table.loc[0, "text_retrieval_recall@1"] == pytest.approx(2 / 3)
