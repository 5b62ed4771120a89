"""Index directories: a streamed build that a new process reopens by mmap without re-encoding, the
same answers as the in-memory index, and damaged or mismatched indexes refused with a message."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from matcher.hashing.codes import LSHHasher
from matcher.search.index import HammingStage, QuantizerStage, SignStage, TwoStageIndex
from matcher.search.protocol import QueryError, SearchOptions
from matcher.search.store import (MANIFEST, NAMES, VECTORS, IndexedMatcher, IndexStore, IndexWriter, StoreError,
                                  build_index)
from tests.helpers import REPO
from tests.search.test_hashing import _FixedEncoder, synthetic


class _Named(_FixedEncoder):
    def __init__(self, emb, fingerprint="fp-1"):
        super().__init__(emb)
        self._fp = fingerprint

    def fingerprint(self):
        return self._fp


def _batches(x, names, size=37):
    return ((x[s:s + size], names[s:s + size]) for s in range(0, len(x), size))


@pytest.fixture
def built(tmp_path):
    emb = synthetic(300)
    hasher = LSHHasher(emb.images, emb.captions, 64)
    meta = {"encoder": {"name": "fixed", "fingerprint": "fp-1", "spec": "fixed"}}
    store = build_index(tmp_path / "idx", SignStage(hasher), _batches(emb.images, emb.names), 32, meta)
    return emb, hasher, store


def test_built_index_answers_like_the_in_memory_index_and_keeps_names(built):
    emb, hasher, store = built
    stage = SignStage(hasher)
    stage.add(emb.images)
    memory = TwoStageIndex(stage, emb.images.astype(np.float16))
    for c in (20, 300):
        assert np.array_equal(store.search(emb.captions[:50], 10, c)[1], memory.search(emb.captions[:50], 10, c)[1])
    assert store.count == 300 and store.dim == 32 and len(store.names) == 300
    assert store.names[7] == "7.jpg" and store.names[-1] == "299.jpg" and list(store.names)[:2] == ["0.jpg", "1.jpg"]
    assert store.names.index("42.jpg") == 42
    assert isinstance(store.vectors, np.memmap) and store.vectors.dtype == np.float16
    m = store.manifest
    assert m["format"] == "matcher-index" and m["version"] == 1 and m["stage"]["name"] == "lsh64-asym"
    assert m["code_bytes_per_item"] == 8 and m["rerank_bytes_per_item"] == 64
    assert store.verify() == []


def test_a_new_process_reopens_the_index_without_the_encoder_or_the_gallery(built, tmp_path):
    emb, _, store = built
    code = ("import json, sys, time, numpy as np; t = time.perf_counter(); "
            "from matcher.search.store import IndexStore; s = IndexStore.open(sys.argv[1]); "
            "loaded = sorted(m for m in sys.modules if m.startswith(('torch', 'matcher.models', 'matcher.data'))); "
            "q = np.load(sys.argv[2]); ids = s.search(q, 5, 50)[1]; "
            "print(json.dumps({'ids': ids.tolist(), 'loaded_to_open': loaded}))")
    np.save(tmp_path / "q.npy", emb.captions[:5])
    out = subprocess.run([sys.executable, "-c", code, str(store.path), str(tmp_path / "q.npy")], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["ids"] == store.search(emb.captions[:5], 5, 50)[1].tolist()
    assert answer["loaded_to_open"] == []   # no model, no torch, no gallery: nothing re-encoded or re-hashed


def test_truncated_corrupted_foreign_and_mismatched_indexes_are_refused(built, tmp_path):
    emb, _, store = built
    path = store.path
    with pytest.raises(StoreError, match="fingerprint"):
        IndexStore.open(path, encoder=_Named(emb, "fp-2"))
    IndexStore.open(path, encoder=_Named(emb, "fp-1"))

    data = (path / VECTORS).read_bytes()
    (path / VECTORS).write_bytes(data[:-100])
    with pytest.raises(StoreError, match=r"vectors.f16 is truncated \(19100 bytes, the manifest says 19200\)"):
        IndexStore.open(path)
    corrupt = bytearray(data)
    corrupt[5000] ^= 0xFF
    (path / VECTORS).write_bytes(bytes(corrupt))
    with pytest.raises(StoreError, match="vectors.f16 does not match its checksum"):
        IndexStore.open(path)
    (path / VECTORS).write_bytes(data)
    (path / "codes.faiss").unlink()
    with pytest.raises(StoreError, match="codes.faiss is missing"):
        IndexStore.open(path)

    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(StoreError, match="version 99, this code reads version 1"):
        IndexStore.open(path)
    (path / MANIFEST).unlink()
    with pytest.raises(StoreError, match="not an index directory"):
        IndexStore.open(path)
    with pytest.raises(StoreError, match="no index at"):
        IndexStore.open(tmp_path / "nowhere")


def test_large_files_get_a_sampled_check_on_open_and_a_full_one_on_verify(tmp_path, monkeypatch):
    import matcher.search.store as store_module

    monkeypatch.setattr(store_module, "FULL_CHECK_BYTES", 1000)         # vectors.f16 (19200 B) counts as large
    monkeypatch.setattr(store_module, "SAMPLE_BLOCK", 64)                # 64 blocks of 64 B: 4096 of its bytes
    emb = synthetic(300)
    store = build_index(tmp_path / "idx", HammingStage(LSHHasher(emb.images, emb.captions, 16)),
                        _batches(emb.images, emb.names), 32)
    data = bytearray((store.path / VECTORS).read_bytes())
    data[1001] ^= 0x01                                                    # between two sampled blocks
    (store.path / VECTORS).write_bytes(bytes(data))
    reopened = IndexStore.open(store.path)                                # the quick check misses it ...
    assert any("vectors.f16 does not match its checksum" in p for p in reopened.verify())   # ... verify does not
    with pytest.raises(StoreError, match="corrupted"):
        IndexStore.open(store.path, full_check=True)
    data[0] ^= 0x01                                                       # a sampled block: caught on open
    (store.path / VECTORS).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sampled checksum"):
        IndexStore.open(store.path)


def test_an_interrupted_build_leaves_nothing_and_an_existing_index_is_kept(tmp_path):
    emb = synthetic(50)
    stage = HammingStage(LSHHasher(emb.images, emb.captions, 16))
    with pytest.raises(RuntimeError, match="stop"):
        with IndexWriter(tmp_path / "idx", stage, 32) as writer:
            writer.add(emb.images[:20], emb.names[:20])
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    stage = HammingStage(stage.hasher)   # the aborted writer had added rows to the old one
    build_index(tmp_path / "idx", stage, _batches(emb.images, emb.names), 32)
    with pytest.raises(StoreError, match="already exists"):
        IndexWriter(tmp_path / "idx", stage, 32)
    with pytest.raises(StoreError, match="no items"):
        IndexWriter(tmp_path / "empty", HammingStage(stage.hasher), 32).close()
    with pytest.raises(ValueError, match=r"shape \[n, 32\]"):
        with IndexWriter(tmp_path / "bad", HammingStage(stage.hasher), 32) as writer:
            writer.add(emb.images[:, :8], emb.names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_quantiser_index_trains_on_the_first_rows_streamed(tmp_path):
    emb = synthetic(400)
    store = build_index(tmp_path / "pq", QuantizerStage("PQ8x4fs", 32), _batches(emb.images, emb.names, 50), 32,
                        train_size=120)
    assert store.manifest["stage"] == {"kind": "quantizer", "factory": "PQ8x4fs", "name": "PQ8x4fs"}
    _, ids = store.search(emb.images[:30], 1, 50, modality="image")
    assert np.mean(ids[:, 0] == np.arange(30)) == 1.0                   # exact re-rank finds each item itself


def test_indexed_matcher_serves_the_matcher_protocol_from_the_index(built):
    emb, _, store = built
    matcher = IndexedMatcher(store, _Named(emb), default_candidates=300)
    result = matcher.search_text("caption 7", SearchOptions(k=5))
    expected = np.argsort(-(emb.images.astype(np.float16).astype(np.float32) @ emb.captions[7]), kind="stable")[:5]
    assert [h.row for h in result.hits] == expected.tolist() and result.hits[0].name == f"{expected[0]}.jpg"
    assert set(result.timings_ms) == {"encode", "candidates", "rerank"}
    assert matcher.more_like("3.jpg", SearchOptions(k=1)).hits[0].name == "3.jpg"
    assert matcher.search_image(4, SearchOptions(k=1)).hits[0].row == 4
    ranking = matcher.rank_captions(emb.caption_texts[:20], [emb.names[i] for i in emb.caption_image[:20]], 5)
    assert ranking.cap == 300 and len(ranking.topk) == 20 and ranking.gt_rank.max() < 300
    with pytest.raises(QueryError, match="images only"):
        matcher.captions_for_image(1)
    with pytest.raises(QueryError, match="not in this index"):
        matcher.more_like("nope.jpg")
    with pytest.raises(StoreError, match="fingerprint"):
        IndexedMatcher(store, _Named(emb, "other"))
    assert len(matcher.embeddings.images) == 300 and matcher.embeddings.images.dtype == np.float32


def test_names_file_holds_unicode_paths(tmp_path):
    emb = synthetic(10)
    names = [f"dossier é/{i} ünï.jpg" for i in range(10)]
    store = build_index(tmp_path / "u", HammingStage(LSHHasher(emb.images, emb.captions, 8)), [(emb.images, names)], 32)
    assert list(IndexStore.open(store.path).names) == names and (store.path / NAMES).stat().st_size > 0


def test_inverted_list_codes_are_trained_while_streaming_and_reopen_with_their_lists(tmp_path):
    emb = synthetic(600)
    hasher = LSHHasher(emb.images, emb.captions, 32)
    store = build_index(tmp_path / "ivf", SignStage(hasher, nlist=8, probe=0.5), _batches(emb.images, emb.names, 100),
                        32, train_size=300)
    assert store.manifest["stage"]["nlist"] == 8 and store.manifest["stage"]["nprobe"] == 4
    assert store.manifest["code_bytes_per_item"] == 4 + 8
    reopened = IndexStore.open(store.path)
    assert reopened.index.stage.index.index.nprobe == 4
    assert np.array_equal(reopened.search(emb.captions[:40], 10, 100)[1], store.search(emb.captions[:40], 10, 100)[1])
    _, ids = reopened.search(emb.images[:20], 1, 600, modality="image")
    assert ids[:, 0].tolist() == list(range(20))


def test_index_cli_builds_from_a_gallery_then_searches_info_and_refuses_damage(tmp_path, monkeypatch, small_gallery,
                                                                              capsys):
    import matcher.registry as registry
    from matcher.cli.main import main
    from matcher.hashing.heads import HashHeads, base_probe, save_heads

    encoder = registry.cached_encoder("open_clip:matcher-tiny-vit")
    save_heads(tmp_path / "heads.pt", {32: HashHeads(32, 32)}, {"base_probe": base_probe(encoder)})
    configs = tmp_path / "configs"
    configs.mkdir()
    for registered in registry.CONFIG_DIR.glob("*.json"):            # the shipped names stay (the presets use them)
        (configs / registered.name).write_text(registered.read_text())
    (configs / "tiny-hashed.json").write_text(json.dumps(
        {"type": "hashed", "base": "open_clip:matcher-tiny-vit", "heads": str(tmp_path / "heads.pt")}))
    monkeypatch.setattr(registry, "CONFIG_DIR", configs)
    out = tmp_path / "idx"
    main(["index", "build", "--gallery", str(small_gallery), "--model", "tiny-hashed", "--bits", "24", "--out", str(out),
          "--batch", "5"])
    assert "wrote" in capsys.readouterr().out
    store = IndexStore.open(out, encoder=encoder)
    assert store.count == 12 and store.manifest["stage"]["name"] == "hei24-asym"     # 12 items: no lists
    assert store.manifest["encoder"]["spec"] == "open_clip:matcher-tiny-vit"
    from matcher.data.gallery import open_gallery
    from matcher.search.exact import ExactMatcher

    exact = ExactMatcher(encoder, open_gallery(small_gallery)).search_text("a dog", SearchOptions(k=3))
    main(["index", "search", str(out), "a dog", "--k", "3", "--candidates", "12"])
    printed = capsys.readouterr().out
    assert [line.split()[-1] for line in printed.splitlines()[1:4]] == [h.name for h in exact.hits]
    with pytest.raises(SystemExit, match="already exists"):
        main(["index", "build", "--gallery", str(small_gallery), "--model", "tiny-hashed", "--out", str(out)])
    (out / "codes.faiss").write_bytes((out / "codes.faiss").read_bytes()[:100])
    with pytest.raises(SystemExit, match="error: index .* is damaged: codes.faiss is truncated"):
        main(["index", "info", str(out)])
