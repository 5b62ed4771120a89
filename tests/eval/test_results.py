"""Results loading: fixture JSONs, missing and broken files, trade-off points, published references, CSV."""
import json

import pandas as pd
import pytest

from matcher.eval.results import (PUBLISHED_LABEL, RESULT_FILES, load_results, metrics_table, published_table, tradeoff_figure,
                             tradeoff_points, write_csv)


def entry(rsum, ms, r1=20.0, **extra):
    return {"t2i": {"R@1": r1, "R@5": 50.0, "R@10": 60.0}, "i2t": {"R@1": 30.0, "R@5": 60.0, "R@10": 70.0},
            "rsum": rsum, "params": 4_000_000, "size_mb": 16.0, "text_query_ms": ms, "images_per_s": 100.0, **extra}


@pytest.fixture
def results_dir(tmp_path):
    (tmp_path / "eval-test.json").write_text(json.dumps({"gallery": "g", "split": "test", "machine": {"cpu": "x"},
        "matchers": {"teacher": entry(350, 9.0, 30.0), "student": entry(300, 3.0), "hashed-64": entry(280, 3.1, bits=64)}}))
    (tmp_path / "ablation.json").write_text(json.dumps({"command": "c", "records": [
        {"loss": "contrastive", "rsum": 290, "text_query_ms": 3.0}, {"loss": "contrastive+kd", "rsum": 305, "text_query_ms": 3.0}]}))
    (tmp_path / "hashing.json").write_text("{not json")
    return tmp_path


def test_missing_and_broken_files_become_notes(results_dir, tmp_path_factory):
    res = load_results(results_dir)
    assert set(res.tables) == {"eval", "ablation"}
    # one schema: a file without a "records" list (here a bare list) is "no records", not guessed at
    (results_dir / "finegrained.json").write_text(json.dumps([{"name": "x", "rsum": 1.0}]))
    assert "finegrained.json: no records yet" in load_results(results_dir).notes
    assert "hashing.json: unreadable" in " ".join(res.notes)
    assert "bench.json: not measured yet" in res.notes
    empty = load_results(tmp_path_factory.mktemp("nothing"))
    assert empty.tables == {} and len(empty.notes) == len(RESULT_FILES)
    assert metrics_table(empty).empty
    fig, tp = tradeoff_figure(empty)
    assert tp.points.empty and "no measured results yet" in fig.layout.title.text


def test_metrics_table_and_csv(results_dir, tmp_path):
    table = metrics_table(load_results(results_dir))
    assert list(table["matcher"]) == ["teacher", "student", "hashed-64"]
    assert table.loc[0, "t2i R@1"] == 30.0 and table.loc[0, "params (M)"] == 4.0
    path = write_csv(table, tmp_path / "out" / "m.csv")
    assert pd.read_csv(path)["rsum"].tolist() == [350, 300, 280]


def test_tradeoff_points_cover_matchers_losses_and_code_lengths(results_dir):
    tp = tradeoff_points(load_results(results_dir), "text-query latency (ms)", "rsum")
    groups = dict(zip(tp.points["label"], tp.points["group"]))
    assert groups["teacher"] == "matcher" and groups["hashed-64 (64 bits)"] == "code length"
    assert groups["contrastive+kd"] == "distillation loss"
    r1 = tradeoff_points(load_results(results_dir), "text-query latency (ms)", "text->image R@1")
    assert r1.points.set_index("label").loc["teacher", "accuracy"] == 30.0
    skipped = tradeoff_points(load_results(results_dir), "search latency at N (ms)", "rsum")
    assert skipped.points.empty and any("not measured" in s for s in skipped.skipped)
    with pytest.raises(ValueError):
        tradeoff_points(load_results(results_dir), "speed", "rsum")


def test_fine_grained_tiers_are_points_of_their_own_group(results_dir):
    (results_dir / "finegrained.json").write_text(json.dumps({"records": [
        {"name": "dual teacher", "rsum": 309.7, "t2i_R@1": 24.3, "text_query_ms": 8.1},
        {"name": "alignment fused C=20", "rsum": 315.0, "t2i_R@1": 25.0, "text_query_ms": 9.0}]}))
    tp = tradeoff_points(load_results(results_dir), "text-query latency (ms)", "rsum")
    fine = tp.points[tp.points["group"] == "fine-grained tiers"].set_index("label")
    assert fine.loc["alignment fused C=20", "accuracy"] == 315.0 and fine.loc["dual teacher", "speed"] == 8.1


def test_published_points_are_labelled_and_drawn_apart(results_dir):
    table = published_table()
    assert (table["source"] == PUBLISHED_LABEL).all()
    dfn = table.set_index("model").loc["ViT-L-14-quickgelu (dfn2b)"]
    assert dfn["rsum"] == pytest.approx(551.74) and dfn["t2i.R@1"] == 75.46
    fig, _ = tradeoff_figure(load_results(results_dir))
    annotations = [a.text for a in fig.layout.annotations]
    assert len(annotations) == len(table) and all(PUBLISHED_LABEL in a for a in annotations)
    assert any("measured here" in (t.name or "") for t in fig.data)


def test_shipped_file_shapes_are_plotted(tmp_path):
    """The ablation reports test_rsum; the scale benchmark p50_ms against recall_at_k per N."""
    (tmp_path / "ablation.json").write_text(json.dumps({"records": [
        {"loss": "listnet", "test_rsum": 205.0, "val_rsum": 212.0, "text_query_ms": 1.1}]}))
    (tmp_path / "bench.json").write_text(json.dumps({"records": [
        {"N": 1000, "method": "float-flat", "p50_ms": 0.01, "recall_at_k": 1.0},
        {"N": 1000000, "method": "binary+rerank C=100", "p50_ms": 0.6, "recall_at_k": 0.39}]}))
    res = load_results(tmp_path)
    ablation = tradeoff_points(res, "text-query latency (ms)", "rsum").points
    assert ablation[["label", "accuracy"]].values.tolist() == [["listnet", 205.0]]
    bench = tradeoff_points(res, "search latency at N (ms)", "recall@10 vs exact search").points
    assert bench["label"].tolist() == ["float-flat @ N=1,000", "binary+rerank C=100 @ N=1,000,000"]
    assert bench["speed"].tolist() == [0.01, 0.6]


def test_text_table_aligns_headers_with_their_columns():
    from matcher.texttable import text_table

    table = text_table([{"name": "a", "x": 1.25, "n": 3}, {"name": "bcd", "x": 10.0, "n": 12}],
                       [("name", "name", "<5"), ("x", "x", "7.2f"), ("2n", lambda r: 2 * r["n"], "4d")])
    assert table.splitlines() == ["name       x  2n", "----------------", "a       1.25   6", "bcd    10.00  24"]
    with pytest.raises(ValueError, match="must start with a width"):
        text_table([], [("x", "x", ".2f")])
