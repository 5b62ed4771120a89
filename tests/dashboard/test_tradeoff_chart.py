"""The trade-off chart: a name next to a point only where it collides with nothing (no other name, no
marker, no reference-line note, not past the edge), every name on hover, one legend entry per group.
Checked on the shipped results for every axis pair, and on a dense synthetic cluster."""
import itertools

import pandas as pd
import pytest

from matcher.eval.results import (ACCURACY_METRICS, MARKER_PX, PLOT_AREA_PX, SPEED_METRICS, _label_box, _overlaps,
                                  _to_pixels, load_results, place_labels, tradeoff_figure)
from matcher.paths import RESULTS_DIR


def assert_no_collisions(points: pd.DataFrame, positions: list, log_x: bool, y_extra: list[float]) -> None:
    """Independent of the placement loop: every pair of placed names, every name against every marker."""
    xs = _to_pixels(points["speed"], log_x, PLOT_AREA_PX[0])
    ys = _to_pixels(points["accuracy"], False, PLOT_AREA_PX[1], y_extra)
    half = MARKER_PX / 2
    markers = [(x - half, y - half, x + half, y + half) for x, y in zip(xs, ys)]
    labels = [(i, _label_box(x, y, str(t), p)) for i, (x, y, t, p) in enumerate(zip(xs, ys, points["label"], positions)) if p]
    for (i, a), (j, b) in itertools.combinations(labels, 2):
        assert not _overlaps(a, b), (points["label"][i], points["label"][j])
    for i, box in labels:
        assert box[0] >= 0 and box[2] <= PLOT_AREA_PX[0] and box[1] >= 0 and box[3] <= PLOT_AREA_PX[1]
        for j, marker in enumerate(markers):
            assert j == i or not _overlaps(box, marker), (points["label"][i], "covers", points["label"][j])


@pytest.mark.parametrize("speed,accuracy", list(itertools.product(SPEED_METRICS, ACCURACY_METRICS)))
def test_shipped_results_every_axis_pair(speed, accuracy):
    fig, tp = tradeoff_figure(load_results(RESULTS_DIR), speed, accuracy)
    measured = [t for t in fig.data if t.name and t.name.endswith("(measured here)")]
    assert [t.name for t in measured] == [f"{g} (measured here)" for g in tp.points["group"].unique()]  # legend groups
    assert sorted(row[0] for t in measured for row in t.customdata) == sorted(tp.points["label"])    # all on hover
    assert all("%{customdata[0]}" in t.hovertemplate for t in measured)
    shown = {text for t in measured for text in t.text if text}
    assert shown <= set(tp.points["label"])
    drawn = pd.DataFrame({"speed": [x for t in measured for x in t.x], "accuracy": [y for t in measured for y in t.y],
                          "label": [row[0] for t in measured for row in t.customdata]})
    positions = [p if text else None for t in measured for text, p in zip(t.text, t.textposition)]
    assert_no_collisions(drawn, positions, fig.layout.xaxis.type == "log", [float(a) for a in tp.references["accuracy"]])
    if "teacher" in set(tp.points["label"]):
        assert "teacher" in shown                                      # the matchers are named first


def test_default_chart_names_the_matchers_and_leaves_the_crowd_to_hover():
    fig, tp = tradeoff_figure(load_results(RESULTS_DIR))
    shown = [text for t in fig.data for text in (t.text or []) if text]
    assert {"teacher", "student"} <= set(shown) and 5 <= len(shown) < len(tp.points)
    assert "hover for the names" in fig.layout.title.text


def test_a_dense_cluster_names_few_points_and_hovers_all():
    cluster = pd.DataFrame({"label": [f"alignment variant {i} fused C=20" for i in range(20)], "group": "fine-grained tiers",
                            "speed": [8.6 + 0.01 * i for i in range(20)], "accuracy": [310 + 0.1 * i for i in range(20)]})
    far = pd.DataFrame({"label": ["teacher", "student"], "group": "matcher", "speed": [6.6, 1.1], "accuracy": [309.7, 238.5]})
    points = pd.concat([far, cluster], ignore_index=True)
    positions, _ = place_labels(points, True)
    assert positions[0] is not None and positions[1] is not None       # the matchers first
    assert sum(p is not None for p in positions[2:]) <= 3               # a crowd gets a name or two, not twenty
    assert_no_collisions(points, positions, True, [])
