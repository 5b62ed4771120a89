"""Bring your own models: a preset file of open_clip models (tiny config here; the real architectures
in bench/), with a hashed tier for the student trained on a separate captioned gallery."""
import json
import shutil

import pytest

from matcher.cli.main import main
from matcher.data.gallery import open_gallery
from matcher.eval import report as report_module
from matcher.data.training import TRAIN_GALLERY_ENV
from matcher.hashing.auto import auto_hashers
from matcher.models.openclip import OpenClipEncoder, save_open_clip_checkpoint
from matcher.presets import PRESETS, load_preset_file
from matcher.registry import cached_encoder, needs_hub, parse_spec
from tests.helpers import BUNDLED, bundled_rows, measured_recall_fixed_costs

TINY = "open_clip:matcher-tiny-vit"


@pytest.fixture
def tiny_student(tmp_path):
    path = tmp_path / "tiny-seed1.pt"
    save_open_clip_checkpoint(OpenClipEncoder("matcher-tiny-vit", seed=1), path)
    return f"open_clip:matcher-tiny-vit@{path}"


def other_gallery(root, first: int, n: int):
    """A captioned gallery of bundled photos ``first .. first+n`` (none of the searched gallery's)."""
    rows = bundled_rows(first + n)[first:]
    root.mkdir(parents=True)
    for row in rows:
        shutil.copy(BUNDLED / "images" / row["image"], root / row["image"])
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_builtin_presets_are_files_and_clip_has_a_hashed_column():
    assert list(PRESETS)[0] == "offline"
    assert PRESETS["clip"]["hashed"] == "hashed:" + PRESETS["clip"]["student"]
    spec = parse_spec(PRESETS["clip"]["hashed"])
    assert spec.kind == "hashed" and spec.base == PRESETS["clip"]["student"] and needs_hub(spec.text)


def test_bad_preset_files_are_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "bad.json"
    for text, message in [("[1, 2]", "JSON object"), ("{not json", "not JSON"), ('{"teacher": 3}', "needs a spec"),
                          ('{"teacher": "nope:x"}', "unknown model"), ('{"_note": "only notes"}', "names no roles")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_preset_file(bad)
        assert "bad.json" in str(info.value)


@pytest.mark.slow
def test_preset_file_eval_has_teacher_student_and_a_trained_hashed_row(small_gallery, tmp_path, tiny_student, monkeypatch):
    monkeypatch.setattr(report_module, "measure_encoders", measured_recall_fixed_costs)
    monkeypatch.delenv(TRAIN_GALLERY_ENV, raising=False)
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"teacher": TINY, "student": tiny_student, "hashed": f"hashed:{tiny_student}"}))
    train = other_gallery(tmp_path / "train-gallery", 100, 40)
    out = tmp_path / "eval.json"
    main(["eval", "--preset-file", str(preset), "--gallery", str(small_gallery), "--split", "test",
          "--train-gallery", str(train), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["preset"] == "mine"
    rows = report["matchers"]
    assert {"teacher", "student", "hashed"} <= set(rows)
    hashed = rows["hashed"]
    assert hashed["method"] == "hei" and hashed["bytes_per_item"] == 8 and 0 < hashed["candidate_recall"] <= 1
    assert hashed["base"] == tiny_student and "bytes_per_item" not in rows["student"]


@pytest.mark.slow
def test_hash_heads_are_cached_and_itq_is_the_fallback(small_gallery, tmp_path, tiny_student, monkeypatch):
    gallery = open_gallery(small_gallery)
    encoder = cached_encoder(tiny_student)
    monkeypatch.setenv(TRAIN_GALLERY_ENV, str(other_gallery(tmp_path / "train", 100, 30)))
    first = auto_hashers(encoder, gallery)
    assert {h.method for h in first.values()} == {"hei"} and sorted(first) == [32, 64, 128, 256]
    again = auto_hashers(encoder, gallery)  # loaded from the cache: the same codes
    codes = encoder.encode_texts(["a dog"])
    assert all((first[b].encode(codes, "text") == again[b].encode(codes, "text")).all() for b in first)
    # the searched gallery must never train its own codes: ITQ on its embeddings instead
    monkeypatch.setenv(TRAIN_GALLERY_ENV, str(small_gallery))
    fallback = auto_hashers(encoder, gallery)
    assert fallback and {h.method for h in fallback.values()} == {"itq"}


def test_projection_heads_undo_a_linear_distortion_of_the_teacher():
    """Hand-made embeddings: the student sees the teacher's space through a skewed linear map, so
    heads distilled from the teacher's similarities recover recall the student had lost."""
    import numpy as np

    from matcher.data.embed import GalleryEmbeddings
    from matcher.train.heads import HeadRecipe, train_projection_heads

    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def split(n, offset):
        images = unit(rng.standard_normal((n, 16)))
        captions = unit(np.repeat(images, 2, axis=0) + 0.35 * rng.standard_normal((2 * n, 16)))
        names = [f"{offset + i}.jpg" for i in range(n)]
        return GalleryEmbeddings(names, images, [f"c{j}" for j in range(2 * n)], np.repeat(np.arange(n), 2), captions)

    skew = np.diag(np.r_[np.full(4, 6.0), np.full(12, 0.3)]).astype(np.float32)

    def through_student(emb):
        return GalleryEmbeddings(emb.names, unit(emb.images @ skew), emb.caption_texts, emb.caption_image,
                                 unit(emb.captions @ skew))

    teacher, val = split(400, 0), split(100, 1000)
    heads, record = train_projection_heads(through_student(teacher), teacher, through_student(val),
                                           HeadRecipe(epochs=60, batch_size=64, lr=3e-2), progress=False)
    assert record["val_rsum"] > record["val_rsum_before"] + 100   # 205 -> 508 here; the teacher has 512
    assert record["history"][0]["epoch"] == 0 and record["best_epoch"] > 0


@pytest.mark.slow
def test_distilled_student_is_evaluated_beside_the_student_it_came_from(small_gallery, tmp_path, tiny_student, monkeypatch):
    monkeypatch.setattr(report_module, "measure_encoders", measured_recall_fixed_costs)
    monkeypatch.setenv(TRAIN_GALLERY_ENV, str(other_gallery(tmp_path / "train", 100, 40)))
    distilled = f"distilled:{tiny_student} from {TINY}"
    report = report_module.build_report({"teacher": TINY, "student": tiny_student, "distilled": distilled},
                                        open_gallery(small_gallery))
    rows = report["matchers"]
    assert rows["distilled"]["spec"] == distilled and rows["student"]["spec"] == tiny_student
    assert cached_encoder(distilled).student is cached_encoder(tiny_student)   # the same towers, plus heads
    # the searched gallery never trains the heads that are evaluated on it
    monkeypatch.setenv(TRAIN_GALLERY_ENV, str(small_gallery))
    from matcher.registry import open_matcher

    with pytest.raises(ValueError, match="training gallery"):
        open_matcher(distilled, open_gallery(small_gallery))
