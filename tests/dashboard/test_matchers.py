"""Side-by-side queries: preset resolution and fallback, ground-truth marks, broken roles, tiny real model."""
import json

import numpy as np
import pytest
from PIL import Image

from matcher.dashboard.matchers import MatcherSet, example_queries, normalise_caption
from matcher.presets import ordered_roles, resolve_preset
from matcher.data.gallery import open_gallery
from matcher.search.protocol import Hit, QueryError, SearchOptions, SearchResult

TINY = "open_clip:matcher-tiny-vit"


class FakeMatcher:
    """Returns the gallery in a fixed order; records the options it was given."""

    def __init__(self, spec, gallery):
        self.names, self.seen = list(gallery.names), []

    def _result(self, options):
        self.seen.append(options)
        hits = [Hit(i, n, 1.0 - i / 10) for i, n in enumerate(self.names[: options.k])]
        return SearchResult(hits, {"encode": 1.0, "search": 0.5})

    def search_text(self, text, options):
        return self._result(options)

    def search_image(self, image, options):
        return self._result(options)

    def more_like(self, name, options):
        return self._result(options)


def fake_opener(spec, gallery):
    if spec == "broken":
        raise FileNotFoundError("weights missing")
    return FakeMatcher(spec, gallery)


def test_roles_are_ordered_teacher_student_hashed_then_others():
    assert ordered_roles(["extra", "hashed", "teacher", "student"]) == ["teacher", "student", "hashed", "extra"]


def test_hub_preset_falls_back_to_offline_and_says_so():
    presets = {"offline": {"teacher": TINY}, "clip": {"teacher": "open_clip:ViT-L-14@dfn2b", "student": TINY}}
    active = resolve_preset("clip", presets, hub_ok=lambda: False)
    assert active.name == "offline" and active.roles == {"teacher": TINY}
    assert "not reachable" in active.describe() and "**offline**" in active.describe()
    assert resolve_preset("clip", presets, hub_ok=lambda: True).name == "clip"
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_preset("nope", presets)


def test_roles_with_missing_checkpoints_are_dropped_with_a_note(tmp_path):
    presets = {"p": {"teacher": TINY, "student": str(tmp_path / "student.pt"),
                     "hashed": f"open_clip:matcher-tiny-vit@{tmp_path / 'gone.pt'}"}}
    active = resolve_preset("p", presets, hub_ok=lambda: False)
    assert list(active.roles) == ["teacher"] and "gone.pt not found" in active.describe()
    (tmp_path / "gone.pt").write_bytes(b"")
    assert list(resolve_preset("p", presets, hub_ok=lambda: False).roles) == ["teacher", "hashed"]
    assert "student matcher is not available" in active.describe()


def test_ground_truth_marks_and_timings(small_gallery):
    gallery = open_gallery(small_gallery)
    mset = MatcherSet({"teacher": "a", "student": "b"}, gallery, fake_opener)
    caption = gallery.captions[gallery.names[0]][0]
    columns = mset.search_text("  " + caption.upper() + " ", SearchOptions(k=3))
    assert [c.role for c in columns] == ["teacher", "student"]
    first = columns[0].hits[0]
    assert first.match and first.name == gallery.names[0] and first.path == gallery.path(first.name)
    assert not any(h.match for h in columns[0].hits[1:])
    assert columns[0].timings_text() == "encode 1.0 ms · search 0.5 ms · total 1.5 ms"
    assert mset.ground_truth("no such caption") == set()


def test_a_broken_role_does_not_take_the_other_columns_down(small_gallery):
    gallery = open_gallery(small_gallery)
    mset = MatcherSet({"teacher": "a", "hashed": "broken"}, gallery, fake_opener)
    teacher, hashed = mset.search_text("a dog", SearchOptions(k=4))
    assert len(teacher.hits) == 4 and hashed.hits == []
    assert "could not be loaded" in hashed.error and "weights missing" in hashed.error


def test_options_reach_every_matcher_and_bad_queries_raise_once(small_gallery):
    gallery = open_gallery(small_gallery)
    mset = MatcherSet({"teacher": "a", "hashed": "b"}, gallery, fake_opener)
    opts = SearchOptions(k=2, bits=32, candidates=50, rerank=False)
    mset.more_like(gallery.names[3], opts)
    assert mset.matcher("hashed").seen == [opts]
    with pytest.raises(QueryError, match="Type a few words"):
        mset.search_text("   ")
    with pytest.raises(QueryError, match="not in this gallery"):
        mset.more_like("nope.jpg")


def test_example_queries_are_real_captions(small_gallery):
    gallery = open_gallery(small_gallery)
    examples = example_queries(gallery, 4)
    assert len(examples) == 4
    all_captions = {c for caps in gallery.captions.values() for c in caps}
    assert set(examples) <= all_captions


def test_normalise_caption():
    assert normalise_caption("  Two dogs  play in the snow . ") == "two dogs play in the snow"


def test_tiny_model_side_by_side(small_gallery, monkeypatch):
    from matcher.search.exact import ExactMatcher

    gallery = open_gallery(small_gallery)
    mset = MatcherSet({"teacher": TINY, "student": TINY}, gallery)
    warmed = []
    original = ExactMatcher.search_text
    monkeypatch.setattr(ExactMatcher, "search_text", lambda self, text, *a: warmed.append(text) or original(self, text, *a))
    assert mset.warm() == {"teacher": None, "student": None}
    assert len(warmed) == 2  # warm-up answers one throw-away query per matcher
    monkeypatch.undo()
    caption = gallery.captions[gallery.names[2]][0]
    columns = mset.search_text(caption, SearchOptions(k=12))
    for column in columns:
        assert len(column.hits) == 12 and set(column.timings_ms) == {"encode", "search"}
        assert sum(h.match for h in column.hits) == 1  # every image is in the top 12 of 12
        assert [h.rank for h in column.hits] == list(range(1, 13))
    image = Image.open(gallery.path(gallery.names[5]))
    by_image = mset.search_image(image, SearchOptions(k=1))
    assert by_image[0].hits[0].name == gallery.names[5]
    assert mset.more_like(gallery.names[5], SearchOptions(k=1))[0].hits[0].name == gallery.names[5]


@pytest.mark.slow
def test_bundled_offline_preset_finds_captions_in_a_small_gallery(small_gallery):
    from matcher.paths import MODELS_DIR

    if not (MODELS_DIR / "offline-teacher.pt").exists():
        pytest.skip("the offline teacher checkpoint is not in this checkout yet")
    active = resolve_preset("offline", hub_ok=lambda: False)
    gallery = open_gallery(small_gallery)
    mset = MatcherSet(active.roles, gallery)
    found = 0
    for name in gallery.names[:6]:
        columns = mset.search_text(gallery.captions[name][0], SearchOptions(k=5))
        assert all(c.error is None and len(c.hits) == 5 for c in columns)
        found += columns[0].hits[0].match or any(h.match for h in columns[0].hits)
    assert found >= 4  # the trained teacher puts the right photo in the top 5 of 12 for most captions


def test_code_lengths_come_from_the_hashed_heads_and_others_are_refused_in_that_column_only(small_gallery):
    """A real HashedMatcher with 32- and 64-bit LSH codes over the tiny model, next to an exact one."""
    from matcher.data.embed import embed_gallery
    from matcher.hashing.codes import LSHHasher
    from matcher.registry import load_encoder
    from matcher.search.exact import ExactMatcher
    from matcher.search.hashed import HashedMatcher

    gallery = open_gallery(small_gallery)
    encoder = load_encoder(TINY)
    emb = embed_gallery(encoder, gallery)

    def opener(spec, g):
        if spec == "hashed":
            return HashedMatcher(encoder, g, {b: LSHHasher(emb.images, emb.captions, b) for b in (32, 64)}, emb)
        return ExactMatcher(encoder, g, emb)

    mset = MatcherSet({"teacher": "exact", "hashed": "hashed"}, gallery, opener)
    assert mset.code_lengths() == [32, 64]
    teacher, hashed = mset.search_text("a dog", SearchOptions(k=4, bits=16))
    assert len(teacher.hits) == 4 and teacher.error is None
    assert hashed.hits == [] and "no 16-bit codes" in hashed.error and "[32, 64]" in hashed.error
    assert all(len(c.hits) == 4 for c in mset.search_text("a dog", SearchOptions(k=4, bits=32)))
    with pytest.raises(QueryError, match="K must be between"):     # what every column refuses: one message
        mset.search_text("a dog", SearchOptions(k=0))
    assert MatcherSet({"teacher": "exact"}, gallery, opener).code_lengths() == []


def test_the_page_offers_the_loaded_code_lengths(small_gallery):
    import app
    from matcher.dashboard.workspace import Workspace

    ws = Workspace(presets={"p": {"teacher": TINY, "hashed": "offline-hashed"}}, gallery=small_gallery,
                   hub_ok=lambda: False,
                   opener=lambda spec, g: HashedFake(spec, g) if spec == "offline-hashed" else FakeMatcher(spec, g))
    demo = app.build_app(ws)
    code_lengths = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "code_lengths")
    update = code_lengths("p", ws.default_gallery)
    assert update["choices"] == [128, 256]
    assert update["value"] == 128
    run_text = next(f.fn for f in demo.fns.values() if f.api_name == "search_text")
    out = run_text("a dog", "p", ws.default_gallery, 3, 16, 100, True)
    assert "⚠️ no 16-bit codes" in out[4] and len(out[3]) == 3 and out[5] == []   # teacher filled, hashed says why


class HashedFake(FakeMatcher):
    hashers = {128: None, 256: None}

    def _result(self, options):
        if options.bits not in self.hashers:
            raise QueryError(f"no {options.bits}-bit codes for this matcher; choose one of {sorted(self.hashers)}")
        return super()._result(options)


def test_a_matcher_still_loading_answers_at_once_instead_of_freezing_the_page(small_gallery):
    """While the warm-up opens a slow role (a hub model encoding the gallery), queries get a
    'still loading' note in that column at once and the ready columns answer."""
    import threading

    release, opening = threading.Event(), threading.Event()

    def slow_opener(spec, gallery):
        if spec == "slow":
            opening.set()
            release.wait(30)
        return FakeMatcher(spec, gallery)

    mset = MatcherSet({"teacher": "slow", "student": "fast"}, open_gallery(small_gallery), opener=slow_opener)
    mset.LOADING_GRACE_S = 0.2   # a query waits this long for an opening, then says "still loading"
    warm = threading.Thread(target=mset.warm)
    warm.start()
    assert opening.wait(10)
    columns = {c.role: c for c in mset.search_text("a dog", SearchOptions(k=3))}
    assert "still loading" in columns["teacher"].error and not columns["teacher"].hits
    assert columns["student"].error is None and len(columns["student"].hits) == 3
    release.set()
    warm.join(30)
    assert all(c.error is None for c in mset.search_text("a dog", SearchOptions(k=3)))
