"""``index:DIR``: an index directory is a spec like any other. Opened through the registry it answers
like the in-memory index; ``search``, ``compare`` (a preset file) and ``eval`` accept it; a damaged,
mismatched or foreign index is refused with one message, on the CLI as one ``error:`` line."""
import json

import numpy as np
import pytest

from matcher.cli.main import main
from matcher.data.embed import embed_gallery
from matcher.data.gallery import open_gallery
from matcher.eval import report as report_module
from matcher.hashing.codes import LSHHasher
from matcher.presets import load_preset_file, parse_roles
from matcher.registry import cached_encoder, load_encoder, missing_weights, open_matcher, parse_spec
from matcher.search.index import SignStage, TwoStageIndex
from matcher.search.protocol import Matcher, SearchOptions
from matcher.search.store import MANIFEST, VECTORS, StoreError, build_index
from tests.helpers import make_gallery, measured_recall_fixed_costs

TINY = "open_clip:matcher-tiny-vit"


def _stage(emb):
    return SignStage(LSHHasher(emb.images, emb.captions, 32, seed=0))


@pytest.fixture
def indexed(tmp_path, small_gallery):
    """A 12-photo gallery, its tiny-encoder embeddings and an index directory of them."""
    encoder = cached_encoder(TINY)
    gallery = open_gallery(small_gallery)
    emb = embed_gallery(encoder, gallery)
    meta = {"encoder": {"spec": TINY, "name": encoder.name, "fingerprint": encoder.fingerprint()},
            "gallery": {"root": str(gallery.root.resolve()), "split": None, "listed": len(gallery)},
            "item_modality": "image"}
    store = build_index(tmp_path / "idx", _stage(emb), [(emb.images[:5], emb.names[:5]), (emb.images[5:], emb.names[5:])],
                        encoder.dim, meta)
    return gallery, emb, store


def test_index_spec_opens_through_the_registry_and_answers_like_the_in_memory_index(indexed):
    gallery, emb, store = indexed
    spec = parse_spec(f"index:{store.path}")
    assert spec.kind == "index" and spec.base == TINY and spec.config["index"] == str(store.path)
    assert load_encoder(spec.text) is cached_encoder(TINY) and missing_weights(spec.text) is None
    matcher = open_matcher(spec.text, gallery)
    assert isinstance(matcher, Matcher) and matcher.name == spec.text and matcher.gallery is gallery
    stage = _stage(emb)
    stage.add(emb.images)
    memory = TwoStageIndex(stage, emb.images.astype(np.float16))
    for text in ("a dog runs on the grass", emb.caption_texts[7]):
        query = cached_encoder(TINY).encode_texts([text])
        for c in (4, 12):
            hits = matcher.search_text(text, SearchOptions(k=5, candidates=c)).hits
            assert [h.row for h in hits] == memory.search(query, 5, c)[1][0].tolist()
            assert [h.name for h in hits] == [emb.names[h.row] for h in hits]
    assert matcher.more_like(emb.names[3], SearchOptions(k=1)).hits[0].name == emb.names[3]


def test_a_missing_damaged_or_mismatched_index_is_refused_with_its_reason(indexed, tmp_path):
    gallery, emb, store = indexed
    text = f"index:{store.path}"
    assert "not found" in missing_weights(f"index:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="cannot be loaded: .*nowhere not found"):
        parse_roles(f"big=index:{tmp_path / 'nowhere'}", {})
    with pytest.raises(ValueError, match="index:DIR"):
        parse_spec("index:")

    with pytest.raises(StoreError, match="first missing"):          # a gallery that does not hold its items
        open_matcher(text, open_gallery(make_gallery(tmp_path / "fewer", 5)))
    manifest = json.loads((store.path / MANIFEST).read_text())
    (store.path / MANIFEST).write_text(json.dumps({**manifest, "encoder": {**manifest["encoder"], "fingerprint": "f00"}}))
    with pytest.raises(StoreError, match="fingerprint"):            # built by other weights than the spec loads now
        open_matcher(text, gallery)
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    data = (store.path / VECTORS).read_bytes()
    (store.path / VECTORS).write_bytes(data[:-64])
    with pytest.raises(StoreError, match=r"is damaged: vectors.f16 is truncated"):
        open_matcher(text, gallery)


def test_search_and_compare_on_an_index_print_its_hits_and_refuse_damage_in_one_line(indexed, tmp_path, capsys):
    gallery, emb, store = indexed
    text = f"index:{store.path}"
    expected = open_matcher(text, gallery).search_text("a dog", SearchOptions(k=3)).hits
    main(["search", "--gallery", str(gallery.root), "--model", text, "a dog", "--k", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines[:3]] == [h.name for h in expected]
    assert lines[3].startswith("timings (ms): encode")

    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"float": TINY, "big": text}))
    assert load_preset_file(preset) == {"float": TINY, "big": text}
    main(["compare", "--gallery", str(gallery.root), "--preset-file", str(preset), "a dog", "--k", "3"])
    printed = capsys.readouterr().out
    assert f"== big ({text})" in printed and expected[0].name in printed.split("== big")[1]

    with pytest.raises(SystemExit, match=r"^error: index .* holds 12 images of .*first missing"):
        main(["search", "--gallery", str(make_gallery(tmp_path / "fewer", 5)), "--model", text, "a dog"])
    (store.path / VECTORS).write_bytes((store.path / VECTORS).read_bytes()[:-64])
    with pytest.raises(SystemExit, match=r"^error: index .* is damaged: vectors.f16 is truncated"):
        main(["search", "--gallery", str(gallery.root), "--model", text, "a dog"])
    main(["compare", "--gallery", str(gallery.root), "--preset-file", str(preset), "a dog", "--k", "3"])
    printed = capsys.readouterr().out
    assert "the big matcher could not be loaded (StoreError: index" in printed and "== float" in printed


def test_eval_measures_the_index_on_the_gallery_it_indexes_and_refuses_another(indexed, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report_module, "measure_encoders", measured_recall_fixed_costs)
    gallery, emb, store = indexed
    text = f"index:{store.path}"
    report = report_module.build_report({"float": TINY, "big": text}, gallery)
    row, base = report["matchers"]["big"], report["matchers"]["float"]
    # C = all 12 items: the re-ranked top-10 is exact search over the float16 vectors
    vectors = emb.images.astype(np.float16).astype(np.float32)
    scores = emb.captions @ vectors.T
    own = scores[np.arange(len(scores)), emb.caption_image]
    ranks = (scores > own[:, None]).sum(axis=1)
    assert row["t2i"] == {f"R@{k}": pytest.approx(100 * np.mean(ranks < k)) for k in (1, 5, 10)}
    assert row["i2t"] is None and row["rsum"] is None and "text_retrieval_recall@1" not in row
    assert row["candidates"] == 12 and row["items"] == 12 and row["bytes_per_item"] == 4
    assert row["spec"] == text and row["base"] == TINY and row["exhaustive_t2i_R@10"] == base["t2i"]["R@10"]
    assert row["text_query_ms"] > 0 and row["images_per_s"] == base["images_per_s"]

    out = tmp_path / "eval.json"
    main(["eval", "--gallery", str(gallery.root), "--split", "test", "--roles", f"float={TINY},big={text}",
          "--json", str(out)])
    table = capsys.readouterr().out
    assert json.loads(out.read_text())["matchers"]["big"]["t2i"] == row["t2i"]
    assert any(line.startswith("big") and "—" in line for line in table.splitlines())   # i2t: not measured

    fewer = make_gallery(tmp_path / "fewer", 5)
    with pytest.raises(SystemExit, match=r"^error: index .* first missing"):
        main(["eval", "--gallery", str(fewer), "--split", "test", "--roles", f"big={text}"])
    more = make_gallery(tmp_path / "more", 14)                    # holds every item, and 2 the index lacks
    with pytest.raises(StoreError, match="2 of them not in the index"):
        report_module.build_report({"big": text}, open_gallery(more))
