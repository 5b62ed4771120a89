"""The cross-encoder tier (``vl-cross``) served as the fine column: ``offline-vl-cross`` / preset ``offline+cross``.

The checkpoint here is built in the test exactly as ``train-vl-cross`` starts one (the teacher's top
MiniLM layers, read-out at zero), so it must rank exactly as the teacher: the oracle. A read-out
perturbed by hand must only reorder the teacher's shortlist, and the served scores (image tokens
stored per photo, lower-layer states from the query's one tower run) must equal the model's own
``score_pairs`` on the raw region map.
"""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from matcher.data.cache import ArrayCache
from tests.helpers import make_gallery, measured_recall_fixed_costs

pytestmark = pytest.mark.slow

RECIPE = {"grid": 4, "residual": True, "candidates": 10, "teacher": "assets/models/offline-teacher.pt"}


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("vl-cross") / "gallery", 12)


@pytest.fixture(scope="module")
def gallery(gallery_dir):
    from matcher.data.gallery import open_gallery

    return open_gallery(gallery_dir)


@pytest.fixture(scope="module")
def base(gallery):
    from matcher.registry import cached_encoder
    from matcher.search.exact import ExactMatcher

    return ExactMatcher(cached_encoder("offline-teacher"), gallery)


@pytest.fixture(scope="module")
def untrained(base):
    """A vl-cross model as training starts it (seeded): read-out exactly zero."""
    from matcher.finegrained.checkpoints import teacher_heads
    from matcher.finegrained.vl_cross import build_vl_cross

    torch.manual_seed(0)
    image_head, text_head, scale = teacher_heads(base.encoder.module)
    model = build_vl_cross(base.encoder.module, image_head, text_head, scale, RECIPE["grid"]).eval()
    assert model.head[-1].weight.abs().sum() == 0 and model.head[-1].bias.abs().sum() == 0
    return model


@pytest.fixture(scope="module")
def checkpoint(untrained, tmp_path_factory):
    from matcher.finegrained.vl_cross import save_vl_cross

    path = tmp_path_factory.mktemp("vl-cross-ckpt") / "vl-cross.pt"
    save_vl_cross(path, untrained, "vl-cross", RECIPE, {"note": "untrained (test)"})
    return path


@pytest.fixture(scope="module")
def perturbed(untrained):
    """The read-out's last layer set by hand: scores differ from the teacher's, enough to reorder."""
    model = copy.deepcopy(untrained)
    rng = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.head[-1].weight.copy_(0.5 * torch.randn(model.head[-1].weight.shape, generator=rng))
    return model.eval()


@pytest.fixture
def register(tmp_path, monkeypatch):
    """Registered configs as shipped, plus ``offline-vl-cross`` pointing at a file of the test's."""
    import matcher.registry as registry

    configs = tmp_path / "configs"
    shutil.copytree(registry.CONFIG_DIR, configs)
    monkeypatch.setattr(registry, "CONFIG_DIR", configs)

    def write(scorer, fuse=None, candidates=10, name="offline-vl-cross"):
        shipped = json.loads((configs / "offline-vl-cross.json").read_text())
        shipped.update(scorer=str(scorer), fuse=fuse, candidates=candidates)
        (configs / f"{name}.json").write_text(json.dumps(shipped))
        return name

    return write


def _captions(gallery, n=6):
    return [gallery.captions[name][0] for name in gallery.names[:n]]


def _served(base, model, tmp_path, fuse=None, candidates=10):
    from matcher.search.fine import FineRerankMatcher

    return FineRerankMatcher(base, model, fuse, candidates, cache=ArrayCache(tmp_path / "arrays"), name="offline-vl-cross")


def _teacher_names(base, text, k):
    from matcher.search.protocol import SearchOptions

    return [h.name for h in base.search_text(text, SearchOptions(k=k)).hits]


def _raw_regions(base, rows) -> torch.Tensor:
    """[n, 49, 1280] the teacher's unpooled region map of gallery rows, recomputed independently."""
    from matcher.data.images import load_rgb

    module = base.encoder.module
    pixels = torch.stack([base.encoder.preprocess(load_rgb(base.gallery.path(base.embeddings.names[r]))) for r in rows])
    with torch.inference_mode():
        fmap = module.image_tower.forward_top_map(module.image_tower.forward_trunk(pixels))
    return fmap.flatten(2).transpose(1, 2)


# -- ranking --------------------------------------------------------------------------------------

def test_the_registered_config_and_the_preset_that_serves_it():
    from matcher.presets import PRESETS
    from matcher.registry import parse_spec, registered_models

    config = registered_models()["offline-vl-cross"]
    assert config["type"] == "fine-rerank" and config["base"] == "offline-teacher"
    assert config["scorer"] == "assets/models/fine/vl-cross.pt"
    assert config["fuse"] is None or isinstance(config["fuse"], (int, float))
    assert isinstance(config["candidates"], int) and config["candidates"] >= 1
    assert parse_spec("offline-vl-cross").kind == "fine-rerank"
    # offline+cross is offline+fine with its fine column switched to the cross-encoder, nothing else
    assert PRESETS["offline+cross"] == {**PRESETS["offline+fine"], "fine": "offline-vl-cross"}
    assert PRESETS["offline+fine"]["fine"] == "offline-tops"


def test_untrained_cross_encoder_ranks_exactly_as_the_teacher(base, untrained, gallery, tmp_path):
    from matcher.search.protocol import SearchOptions

    for fuse in (None, 0.5):
        served = _served(base, untrained, tmp_path, fuse=fuse, candidates=5)
        assert served.kind == "vl-cross" and tuple(served.regions.shape) == (12, 17, 384)
        for text in _captions(gallery):
            result = served.search_text(text, SearchOptions(k=5))
            assert set(result.timings_ms) == {"encode", "candidates", "rerank"}
            assert [h.name for h in result.hits] == _teacher_names(base, text, 5), (fuse, text)
    # a longer shortlist than k changes nothing either: the read-out adds exactly zero
    served = _served(base, untrained, tmp_path, candidates=10)
    text = _captions(gallery)[2]
    assert [h.name for h in served.search_text(text, SearchOptions(k=8)).hits] == _teacher_names(base, text, 8)
    # the query's dual embedding comes from the same tower run as the states the cross-encoder reads
    query, states, mask = served._encode_text(text)
    assert np.allclose(query, base.encoder.encode_texts([text])[0], atol=1e-5)
    assert states.shape[-1] == 384 and bool(mask.all())


def test_a_perturbed_readout_reorders_only_within_the_shortlist(base, perturbed, gallery, tmp_path):
    from matcher.search.protocol import SearchOptions

    served = _served(base, perturbed, tmp_path, candidates=6)
    reordered = dropped = 0
    for text in _captions(gallery, 12):
        teacher = _teacher_names(base, text, 6)
        got = [h.name for h in served.search_text(text, SearchOptions(k=6)).hits]
        assert sorted(got) == sorted(teacher)              # C = k: a permutation of the teacher's top k
        reordered += got != teacher
        top3 = [h.name for h in served.search_text(text, SearchOptions(k=3)).hits]
        assert set(top3) <= set(teacher)                   # k < C: still only the teacher's shortlist
        dropped += set(top3) != set(teacher[:3])
    assert reordered > 0 and dropped > 0                   # the perturbation does reorder


def test_served_scores_equal_the_models_own_score_pairs(base, perturbed, gallery, tmp_path):
    """Image tokens stored in float16 per photo + the query's lower-layer states == ``score_pairs`` on
    the raw region map, for pure and fused scores."""
    from matcher.search.protocol import SearchOptions

    text = _captions(gallery)[4]
    for fuse in (None, 0.25):
        served = _served(base, perturbed, tmp_path, fuse=fuse, candidates=8)
        hits = served.search_text(text, SearchOptions(k=8)).hits
        rows = [h.row for h in hits]
        _, states, mask = served._encode_text(text)
        cos = torch.from_numpy(base.embeddings.images[rows].astype(np.float32) @ base.encoder.encode_texts([text])[0])
        with torch.inference_mode():
            own = perturbed.score_pairs(_raw_regions(base, rows), states.expand(len(rows), -1, -1),
                                        mask.expand(len(rows), -1), cos).numpy()
        expected = own if fuse is None else cos.numpy() + fuse * own
        assert np.allclose([h.score for h in hits], expected, rtol=1e-4, atol=2e-3), fuse


def test_image_queries_are_answered_by_the_teacher(base, perturbed, gallery, tmp_path):
    from matcher.data.images import load_rgb
    from matcher.search.protocol import SearchOptions

    served = _served(base, perturbed, tmp_path)
    name = gallery.names[1]
    for ours, teachers in ((served.more_like(name), base.more_like(name)),
                           (served.search_image(load_rgb(gallery.path(name)), SearchOptions(k=5)),
                            base.search_image(load_rgb(gallery.path(name)), SearchOptions(k=5)))):
        assert [h.name for h in ours.hits] == [h.name for h in teachers.hits]
        assert "rerank" not in ours.timings_ms


# -- the gallery side: computed once per (teacher, checkpoint, gallery) ----------------------------

def test_gallery_tokens_come_from_the_cache_the_second_time(base, untrained, perturbed, tmp_path, monkeypatch):
    first = _served(base, untrained, tmp_path)
    key = first._cache_key()
    arrays, meta = ArrayCache(tmp_path / "arrays").get(key)
    assert arrays["regions"].dtype == np.float16 and arrays["regions"].shape == (12, 17, 384)
    assert meta["names"] == list(base.embeddings.names) and meta["kind"] == "vl-cross"

    calls = []
    real = base.encoder.module.image_tower.forward_top_map

    def counting(h):
        calls.append(len(h))
        return real(h)

    monkeypatch.setattr(base.encoder.module.image_tower, "forward_top_map", counting)
    again = _served(base, untrained, tmp_path)
    assert calls == [] and torch.equal(again.regions, first.regions)        # nothing re-encoded
    other = _served(base, perturbed, tmp_path)                              # other weights: own entry
    assert other._cache_key() != key and sum(calls) == 12
    # the alignment column's regions never share an entry with the cross-encoder's tokens
    assert key.startswith("fine-vl-cross-")


# -- missing or wrong checkpoints: one clear message, never a traceback -----------------------------

def test_a_missing_checkpoint_is_a_clear_message_everywhere(register, gallery, tmp_path):
    from matcher.dashboard.matchers import MatcherSet
    from matcher.presets import PRESETS, parse_roles, resolve_preset
    from matcher.registry import missing_weights

    absent = tmp_path / "not-trained-yet" / "vl-cross.pt"
    spec = register(absent)
    assert missing_weights(spec) == f"{absent} not found"
    # the page's preset: the fine role is dropped with a note naming the file
    active = resolve_preset("offline+cross", hub_ok=lambda: False)
    assert "fine" not in active.roles and "teacher" in active.roles
    assert f"The fine matcher is not available ({absent} not found)" in active.describe()
    # --roles on the CLI / app: refused with the reason
    with pytest.raises(ValueError, match="matcher 'fine' cannot be loaded: .*vl-cross.pt not found"):
        parse_roles("fine=offline-vl-cross", PRESETS["offline+fine"])
    # a column opened anyway (the file vanished after start-up): that column says why, the teacher answers
    columns = MatcherSet({"teacher": "offline-teacher", "fine": spec}, gallery, batch_texts=False).search_text(
        _captions(gallery)[0])
    teacher, fine = columns
    assert teacher.error is None and len(teacher.hits) > 0 and fine.hits == []
    assert "the fine matcher could not be loaded" in fine.error and "not found (not trained yet" in fine.error
    assert "Traceback" not in fine.error


def test_unreadable_or_other_kinds_of_checkpoint_are_refused_clearly(register, untrained, gallery, tmp_path):
    from matcher.dashboard.matchers import MatcherSet
    from matcher.finegrained.vl_cross import VLDecomposed, save_vl_cross

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    decomposed = tmp_path / "vl-decomposed.pt"
    save_vl_cross(decomposed, VLDecomposed(untrained), "vl-decomposed", {"cross_recipe": RECIPE}, {})
    for path, reason in ((garbage, "cannot be read"), (decomposed, "'vl-decomposed' checkpoint")):
        spec = register(path)
        fine = MatcherSet({"fine": spec}, gallery, batch_texts=False).search_text(_captions(gallery)[0])[0]
        assert fine.hits == [] and reason in fine.error and "Traceback" not in fine.error, fine.error


# -- the evaluation report measures the column as served ----------------------------------------

def test_eval_roles_fine_equals_offline_vl_cross_measures_the_served_column(register, checkpoint, gallery_dir,
                                                                           tmp_path, monkeypatch):
    """``python -m matcher eval --preset offline+fine --roles teacher,fine=offline-vl-cross``: the fine
    row is ``fine_rows`` over the served matcher; untrained, its t2i is the teacher's."""
    from matcher.cli.main import main
    from matcher.eval import report as report_module

    monkeypatch.setattr(report_module, "measure_encoders", measured_recall_fixed_costs)
    register(checkpoint, fuse=None, candidates=10)
    out = tmp_path / "eval.json"
    main(["eval", "--gallery", str(gallery_dir), "--split", "test", "--preset", "offline+fine",
          "--roles", "teacher,fine=offline-vl-cross", "--json", str(out)])
    rows = json.loads(out.read_text())["matchers"]
    teacher, fine = rows["teacher"], rows["fine"]
    assert fine["spec"] == "offline-vl-cross" and fine["base"] == "offline-teacher" and fine["scorer"] == "vl-cross"
    assert fine["candidates"] == 10 and fine["fuse"] is None and "cross-encoder" in fine["note"]
    assert fine["t2i"] == teacher["t2i"] and fine["i2t"] == teacher["i2t"]
    assert fine["params"] > teacher["params"] + 3_000_000    # the two MiniLM layers it holds are counted
