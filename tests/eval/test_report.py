"""The one evaluation report: the CLI and the page's re-run write the same rows; a hashed row is
measured on its own two-stage search (the page once showed the student's float row as 'hashed')."""
import json

import pytest

from matcher.cli.main import main
from matcher.dashboard.workspace import Workspace
from matcher.eval import report as report_module
from matcher.presets import PRESETS
from tests.helpers import measured_recall_fixed_costs

pytestmark = pytest.mark.slow


def test_cli_and_page_rerun_write_the_same_report_and_hashed_rows_are_their_own(small_gallery, tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "measure_encoders", measured_recall_fixed_costs)
    out = tmp_path / "cli.json"
    main(["eval", "--gallery", str(small_gallery), "--split", "test", "--json", str(out)])
    cli = json.loads(out.read_text())

    ws = Workspace(presets={"offline": PRESETS["offline"]}, gallery=small_gallery, live_results_dir=tmp_path / "live",
                   hub_ok=lambda: False)
    page = json.loads(ws.rerun_eval().read_text())

    assert list(cli["matchers"]) == list(page["matchers"])
    assert set(cli["matchers"]) >= {"teacher", "student", "hashed", "hashed-32", "hashed-64", "hashed-128", "hashed-256"}
    for name, row in cli["matchers"].items():
        other = page["matchers"][name]
        for key in ("t2i", "i2t", "rsum", "spec", "params", "bytes_per_item", "candidate_recall"):
            assert row.get(key) == other.get(key), (name, key)

    student, hashed = cli["matchers"]["student"], cli["matchers"]["hashed"]
    assert hashed is not student and hashed["spec"] == "offline-hashed" and hashed["base"] == "offline-student"
    assert hashed["bytes_per_item"] == 8 and 0 < hashed["candidate_recall"] <= 1
    assert "bytes_per_item" not in student and "candidate_recall" not in student
    assert cli["matchers"]["hashed-32"]["bytes_per_item"] == 4
    assert hashed["image_retrieval_recall@10"] == hashed["t2i"]["R@10"] / 100   # CLIP_benchmark's names too
    # encoding costs come from the base encoder, the head adds parameters
    assert hashed["text_query_ms"] == student["text_query_ms"] and hashed["params"] > student["params"]


def test_fine_row_is_the_reranked_search_and_every_tier_is_a_matcher(small_gallery, monkeypatch):
    from matcher.data.gallery import open_gallery
    from matcher.eval.report import build_report
    from matcher.registry import open_matcher
    from matcher.search.protocol import Matcher, SearchOptions

    gallery = open_gallery(small_gallery).select("test")
    for spec in ("offline-teacher", "offline-hashed", "offline-fine"):
        assert isinstance(open_matcher(spec, gallery), Matcher), spec
    report = build_report({"teacher": "offline-teacher", "fine": "offline-fine"}, gallery,
                          measure=measured_recall_fixed_costs)
    teacher, fine = report["matchers"]["teacher"], report["matchers"]["fine"]
    assert fine["spec"] == "offline-fine" and fine["base"] == "offline-teacher" and fine["candidates"] == 50
    assert fine["i2t"] == teacher["i2t"]  # image queries are answered by the dual teacher
    # t2i comes from the fine matcher's own answers: recompute R@1 from its searches
    fine_matcher = open_matcher("offline-fine", gallery)
    firsts = [fine_matcher.search_text(c, SearchOptions(k=1)).hits[0].name == n
              for n in gallery.names for c in gallery.captions[n]]
    assert fine["t2i"]["R@1"] == pytest.approx(100 * sum(firsts) / len(firsts))
    assert fine["rsum"] == pytest.approx(sum(fine["t2i"].values()) + sum(fine["i2t"].values()), abs=0.01)
