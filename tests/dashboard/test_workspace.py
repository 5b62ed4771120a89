"""The app's shared state: preset fallback on the page, lazy matcher sets, live results, analyses."""
import json

from tests.helpers import FIXTURE_EVAL
from matcher.search.protocol import SearchOptions
from matcher.dashboard.workspace import Workspace

TINY = "open_clip:matcher-tiny-vit"
HUB_PRESETS = {"offline": {"teacher": TINY}, "clip": {"teacher": "open_clip:ViT-L-14@dfn2b", "student": TINY}}


def test_page_falls_back_to_offline_without_hub_and_says_so(small_gallery):
    import app

    ws = Workspace(presets=HUB_PRESETS, default_preset="clip", gallery=small_gallery, hub_ok=lambda: False)
    demo = app.build_app(ws)
    active = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "active-preset")
    assert "Active preset: **offline**" in active.value and "not reachable" in active.value
    assert ws.matchers("clip").roles == {"teacher": TINY}  # nothing was loaded while building the page
    assert ws._sets[("offline", str(small_gallery.resolve()))]._matchers == {}


def test_matcher_sets_are_shared_per_preset_and_gallery(small_gallery, tmp_path):
    ws = Workspace(presets={"p": {"teacher": TINY}}, gallery=small_gallery, hub_ok=lambda: False)
    assert ws.matchers() is ws.matchers("p", str(small_gallery))
    assert ws.gallery().names == ws.gallery(str(small_gallery)).names


def test_live_results_override_shipped_ones(small_gallery, tmp_path):
    shipped, live = tmp_path / "shipped", tmp_path / "live"
    shipped.mkdir()
    (shipped / "eval-test.json").write_text(json.dumps(FIXTURE_EVAL))
    ws = Workspace(presets={"p": {"teacher": TINY}}, gallery=small_gallery, results_dir=shipped, live_results_dir=live,
                   hub_ok=lambda: False)
    assert len(ws.results().table("eval")) == 3

    def fake_evaluate(specs, gallery):
        return {spec: {"t2i": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0}, "i2t": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0},
                       "rsum": 12.0, "text_query_ms": 1.0, "images_per_s": 5.0, "spec": spec} for spec in specs}

    path = ws.rerun_eval(measure=fake_evaluate)
    assert path == live / "eval-test.json"
    res = ws.results()
    assert res.table("eval")["name"].tolist() == ["teacher"]
    assert any("re-measured on this page" in n for n in res.notes)


def test_analysis_is_computed_once(small_gallery):
    ws = Workspace(presets={"p": {"teacher": TINY, "student": TINY}}, gallery=small_gallery, hub_ok=lambda: False)
    first = ws.analysis(None, None, 3, SearchOptions(k=3))
    assert ws.analysis(None, None, 3, SearchOptions(k=3)) is first
    assert len(first.per_query) == 60 and first.fast_roles == ["student"]
