"""Measured results (the JSON files in ``assets/results/``) as pandas tables and trade-off charts.

The files are written by other commands (``eval``, the distillation ablation, the hashing and
scale benchmarks) and may be missing or partly filled while those are being produced, so every
loader is defensive: a missing or unreadable file becomes a note ("not measured yet"), never an
exception. Published reference numbers are kept apart, with their source, and are drawn as
reference lines labelled as numbers on a *different* dataset (Flickr30k, not our Flickr8k split).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

RESULT_FILES = {
    "eval": "eval-test.json",
    "ablation": "ablation.json",
    "hashing": "hashing.json",
    "bench": "bench.json",
    "finegrained": "finegrained.json",  # python -m matcher eval-fine (docs/finegrained.md)
}

# Axis choices: label -> candidate column names (first present wins), and whether lower is better.
SPEED_METRICS = {
    "text-query latency (ms)": (["text_query_ms", "query_ms", "text_ms"], "lower"),
    "image throughput (images/s)": (["images_per_s", "img_per_s"], "higher"),
    "search latency at N (ms)": (["p50_ms", "search_ms", "search_latency_ms", "latency_ms", "search_ms_p50"], "lower"),
}
ACCURACY_METRICS = {
    "rsum": ["rsum", "test_rsum"],  # the ablation reports test and val rsum separately
    "text->image R@1": ["t2i.R@1", "t2i_R@1", "R@1"],
    "recall@10 vs exact search": ["recall_at_k"],  # the scale benchmark: share of the exact top-10 returned
}

# Published zero-shot Flickr30k (1K test) numbers from open_clip's retrieval benchmark table,
# docs/openclip_retrieval_results.csv in github.com/mlfoundations/open_clip (commit f862f86).
# "Flickr image retr." is text->image, "Flickr text retr." is image->text. Percentages.
PUBLISHED_SOURCE = ("open_clip retrieval results (docs/openclip_retrieval_results.csv, "
                    "github.com/mlfoundations/open_clip), zero-shot Flickr30k 1K test")
PUBLISHED = [
    {"model": "ViT-B-32 (openai)", "t2i": [58.78, 83.56, 90.02], "i2t": [78.90, 94.90, 98.20]},
    {"model": "ViT-B-32 (laion2b_s34b_b79k)", "t2i": [66.78, 88.38, 93.10], "i2t": [84.10, 96.20, 98.30]},
    {"model": "ViT-L-14 (openai)", "t2i": [64.96, 87.24, 92.04], "i2t": [85.20, 97.40, 99.20]},
    {"model": "ViT-L-14-quickgelu (dfn2b)", "t2i": [75.46, 92.80, 96.08], "i2t": [89.60, 98.50, 99.30]},
]
PUBLISHED_LABEL = "published, Flickr30k, different data"


def published_table() -> pd.DataFrame:
    rows = []
    for p in PUBLISHED:
        row = {"model": p["model"]}
        for direction in ("t2i", "i2t"):
            for k, v in zip((1, 5, 10), p[direction]):
                row[f"{direction}.R@{k}"] = v
        row["rsum"] = round(sum(p["t2i"]) + sum(p["i2t"]), 2)
        row["source"] = PUBLISHED_LABEL
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Results:
    """Every results table there is, plus notes about what is missing."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, dict] = field(default_factory=dict)

    def table(self, kind: str) -> pd.DataFrame:
        return self.tables.get(kind, pd.DataFrame())


def _read_json(path: Path) -> tuple[object | None, str | None]:
    if not path.exists():
        return None, f"{path.name}: not measured yet"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name}: unreadable ({exc})"


def _records(data) -> list[dict]:
    """The records of a results file. One schema for every table the commands write: a JSON object
    whose header fields describe the run and whose ``records`` list holds one row per measurement
    (the evaluation report keeps its ``matchers`` mapping; ``eval_table`` reads it)."""
    records = data.get("records") if isinstance(data, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _label(row: pd.Series, fallbacks=("name", "label", "loss", "method", "matcher", "role")) -> str:
    for key in fallbacks:
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return "?"


def eval_table(data: dict) -> pd.DataFrame:
    """One row per matcher of an ``eval --json`` report."""
    matchers = data.get("matchers") if isinstance(data, dict) else None
    if not isinstance(matchers, dict):
        return pd.DataFrame()
    rows = []
    for name, m in matchers.items():
        if isinstance(m, dict):
            rows.append({"name": name, **m})
    df = pd.json_normalize(rows) if rows else pd.DataFrame()
    if not df.empty:
        df["group"] = ["code length" if str(n).startswith("hashed-") else "matcher" for n in df["name"]]
    return df


def load_results(results_dir: str | Path) -> Results:
    """Read every known results file under ``results_dir``; missing ones become notes."""
    results_dir = Path(results_dir)
    out = Results()
    for kind, filename in RESULT_FILES.items():
        data, problem = _read_json(results_dir / filename)
        if problem:
            out.notes.append(problem)
            continue
        if kind == "eval":
            df = eval_table(data)
            if isinstance(data, dict):
                out.meta[kind] = {k: v for k, v in data.items() if k != "matchers"}
        else:
            records = _records(data)
            df = pd.json_normalize(records) if records else pd.DataFrame()
        if df.empty:
            out.notes.append(f"{filename}: no records yet")
            continue
        out.tables[kind] = df
    return out


def _column(df: pd.DataFrame, candidates: list[str]) -> str | None:
    for c in candidates:
        if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any():
            return c
    return None


def metrics_table(results: Results) -> pd.DataFrame:
    """The table beside the chart: every measured matcher, one row each, readable column names."""
    df = results.table("eval")
    if df.empty:
        return pd.DataFrame(columns=["matcher", "note"]).astype(object)
    wanted = [
        ("name", "matcher"), ("t2i.R@1", "t2i R@1"), ("t2i.R@5", "t2i R@5"), ("t2i.R@10", "t2i R@10"),
        ("i2t.R@1", "i2t R@1"), ("i2t.R@5", "i2t R@5"), ("i2t.R@10", "i2t R@10"), ("rsum", "rsum"),
        ("params", "params (M)"), ("size_mb", "size (MB)"), ("text_query_ms", "text query (ms)"),
        ("images_per_s", "images/s"), ("bytes_per_item", "bytes/item"), ("candidate_recall", "candidate recall"),
    ]
    out = pd.DataFrame({new: df[old] for old, new in wanted if old in df.columns})
    if "params (M)" in out:
        out["params (M)"] = (pd.to_numeric(out["params (M)"], errors="coerce") / 1e6).round(2)
    return out.round(2)


@dataclass
class TradeoffPoints:
    points: pd.DataFrame            # columns: label, group, speed, accuracy
    speed_column: dict[str, str]    # group -> which column the speed came from
    skipped: list[str]              # groups/rows without the chosen metrics
    references: pd.DataFrame        # published: model, accuracy (no speed: different hardware and data)


def tradeoff_points(results: Results, speed: str, accuracy: str) -> TradeoffPoints:
    """Points (speed, accuracy) for every matcher, distillation-loss run and code length measured."""
    if speed not in SPEED_METRICS or accuracy not in ACCURACY_METRICS:
        raise ValueError(f"unknown metric: choose speed from {list(SPEED_METRICS)} and accuracy from {list(ACCURACY_METRICS)}")
    speed_cols, _ = SPEED_METRICS[speed]
    acc_cols = ACCURACY_METRICS[accuracy]
    sources = []
    eval_df = results.table("eval")
    if not eval_df.empty:
        for group, part in eval_df.groupby("group", sort=False):
            sources.append((group, part))
    if not results.table("ablation").empty:
        sources.append(("distillation loss", results.table("ablation")))
    if not results.table("hashing").empty:
        sources.append(("code length (hashing)", results.table("hashing")))
    if not results.table("bench").empty:
        sources.append(("scale benchmark", results.table("bench")))
    if not results.table("finegrained").empty:
        sources.append(("fine-grained tiers", results.table("finegrained")))
    rows, used, skipped = [], {}, []
    for group, df in sources:
        s_col, a_col = _column(df, speed_cols), _column(df, acc_cols)
        if s_col is None or a_col is None:
            missing = speed if s_col is None else accuracy
            skipped.append(f"{group}: {missing} not measured")
            continue
        used[group] = s_col
        for _, row in df.iterrows():
            s, a = pd.to_numeric(row.get(s_col), errors="coerce"), pd.to_numeric(row.get(a_col), errors="coerce")
            if pd.isna(s) or pd.isna(a):
                continue
            label = _label(row)
            if "bits" in row and pd.notna(row.get("bits")) and group != "matcher":
                label = f"{label} ({int(row['bits'])} bits)" if label != "?" else f"{int(row['bits'])} bits"
            if "N" in row and pd.notna(row.get("N")):
                label = f"{label} @ N={int(row['N']):,}"
            rows.append({"label": label, "group": group, "speed": float(s), "accuracy": float(a)})
    refs = published_table()
    ref_col = "rsum" if accuracy == "rsum" else "t2i.R@1"
    references = pd.DataFrame({"model": refs["model"], "accuracy": refs[ref_col]})
    return TradeoffPoints(pd.DataFrame(rows, columns=["label", "group", "speed", "accuracy"]), used, skipped, references)


# Label placement: positions are chosen in pixels of an assumed drawing area no larger than the page
# gives the chart (a wider chart only spreads the points further apart).
LABEL_FONT_PX = 10
CHAR_PX = 6.2                 # average width of one character at LABEL_FONT_PX
LINE_PX = 13
MARKER_PX = 12
PLOT_AREA_PX = (700.0, 360.0)  # (width, height) of the plot area, legend and margins excluded
LABEL_POSITIONS = ("top center", "bottom center", "middle right", "middle left",
                   "top left", "top right", "bottom left", "bottom right")  # corners: for crowded neighbours
Box = tuple[float, float, float, float]   # x0, y0, x1, y1 in pixels, y upwards


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_box(x: float, y: float, text: str, position: str) -> Box:
    w, h, gap = len(text) * CHAR_PX, LINE_PX, MARKER_PX / 2 + 2
    if position == "top center":
        return (x - w / 2, y + gap, x + w / 2, y + gap + h)
    if position == "bottom center":
        return (x - w / 2, y - gap - h, x + w / 2, y - gap)
    if position == "middle right":
        return (x + gap, y - h / 2, x + gap + w, y + h / 2)
    if position == "middle left":
        return (x - gap - w, y - h / 2, x - gap, y + h / 2)
    vertical, horizontal = position.split()      # a corner: the text starts diagonally off the marker
    x0 = x + gap if horizontal == "right" else x - gap - w
    y0 = y + gap if vertical == "top" else y - gap - h
    return (x0, y0, x0 + w, y0 + h)


def _to_pixels(values: pd.Series, log: bool, size: float, extra: list[float] = ()) -> list[float]:
    """Data -> pixel positions along one axis; ``extra`` values widen the range (reference lines)."""
    v = pd.to_numeric(values, errors="coerce").astype(float)
    if log:
        v = v.clip(lower=1e-12).map(math.log10)
    lo, hi = min([float(v.min()), *extra]), max([float(v.max()), *extra])
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.06 * span, hi + 0.06 * span   # plotly pads the range around markers
    return [(x - lo) / (hi - lo) * size for x in v]


def place_labels(points: pd.DataFrame, log_x: bool, obstacles: list[Box] = (), y_extra: list[float] = (),
                 area: tuple[float, float] = PLOT_AREA_PX) -> tuple[list[str | None], list[Box]]:
    """A text position for each point whose label fits without touching another label, a marker, an
    obstacle or the edge of the plot (first come, first served: rows in order, the matchers first),
    None where it does not (that point is named on hover only). Returns (positions, label boxes)."""
    if points.empty:
        return [], []
    xs, ys = _to_pixels(points["speed"], log_x, area[0]), _to_pixels(points["accuracy"], False, area[1], y_extra)
    half = MARKER_PX / 2
    taken: list[Box] = [(x - half, y - half, x + half, y + half) for x, y in zip(xs, ys)] + list(obstacles)
    positions: list[str | None] = []
    boxes: list[Box] = []
    for x, y, label in zip(xs, ys, points["label"]):
        chosen = None
        for position in LABEL_POSITIONS:
            box = _label_box(x, y, str(label), position)
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= area[0] and box[3] <= area[1]
            own_marker = (x - half, y - half, x + half, y + half)
            if inside and not any(_overlaps(box, t) for t in taken if t != own_marker):
                chosen = position
                taken.append(box)
                boxes.append(box)
                break
        positions.append(chosen)
    return positions, boxes


def tradeoff_figure(results: Results, speed: str = "text-query latency (ms)", accuracy: str = "rsum"):
    """Plotly figure: measured points as markers per group (one legend entry each, click to hide), a
    name printed next to a point only where it collides with nothing (``place_labels``), every name on
    hover; published numbers as dotted reference lines."""
    import plotly.graph_objects as go

    tp = tradeoff_points(results, speed, accuracy)
    fig = go.Figure()
    symbols = ["circle", "diamond", "square", "triangle-up", "cross", "x"]
    log_x = SPEED_METRICS[speed][1] == "lower" and not tp.points.empty and bool((tp.points["speed"] > 0).all())
    refs = tp.references.sort_values("accuracy").reset_index(drop=True)
    ref_texts = [f"{r['model']}: {r['accuracy']:.1f} ({PUBLISHED_LABEL})" for _, r in refs.iterrows()]
    positions, _ = place_labels(tp.points, log_x, _reference_boxes(tp.points, refs, ref_texts),
                                y_extra=[float(a) for a in refs["accuracy"]])
    points = tp.points.assign(position=positions)
    for i, (group, part) in enumerate(points.groupby("group", sort=False)):
        shown = part["position"].notna()
        fig.add_trace(go.Scatter(
            x=part["speed"], y=part["accuracy"], mode="markers+text", name=f"{group} (measured here)",
            text=[label if ok else "" for label, ok in zip(part["label"], shown)],
            textposition=[p if isinstance(p, str) else "top center" for p in part["position"]],
            textfont=dict(size=LABEL_FONT_PX),
            customdata=part[["label"]].values, marker=dict(size=MARKER_PX, symbol=symbols[i % len(symbols)]),
            hovertemplate="<b>%{customdata[0]}</b><br>" + speed + ": %{x:.2f}<br>" + accuracy + ": %{y:.2f}<extra>" + group + "</extra>",
        ))
    for i, text in enumerate(ref_texts):
        fig.add_hline(y=float(refs.loc[i, "accuracy"]), line_dash="dot", line_color="gray", opacity=0.7,
                      annotation_text=text,
                      annotation_position="bottom right" if i % 2 == 0 else "top left",
                      annotation_font_size=10, annotation_font_color="gray")
    if not tp.references.empty:  # a legend entry so the dotted lines are explained
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(dash="dot", color="gray"),
                                 name=f"{PUBLISHED_LABEL} (no speed: other hardware)"))
    title = f"{accuracy} vs {speed}"
    if tp.points.empty:
        title += " (no measured results yet)"
    elif points["position"].isna().any():
        title += " (hover for the names of unlabelled points)"
    fig.update_layout(title=title, xaxis_title=speed + ("  (lower is faster)" if SPEED_METRICS[speed][1] == "lower" else ""),
                      yaxis_title=accuracy + " (Flickr8k test, measured here)", legend=dict(orientation="h", y=-0.2),
                      margin=dict(l=50, r=20, t=50, b=40), height=520, template="plotly_white", hovermode="closest")
    if log_x:
        fig.update_xaxes(type="log")
    return fig, tp


def _reference_boxes(points: pd.DataFrame, refs: pd.DataFrame, texts: list[str]) -> list[Box]:
    """Where the reference lines' annotations sit, in the pixels ``place_labels`` uses (the y range
    then spans the points and the lines)."""
    if points.empty or refs.empty:
        return []
    w, h = PLOT_AREA_PX
    ys = _to_pixels(refs["accuracy"], False, h, [float(a) for a in points["accuracy"]])
    boxes = []
    for i, (text, y) in enumerate(zip(texts, ys)):
        width = len(text) * CHAR_PX
        boxes.append((w - width, y - LINE_PX, w, y) if i % 2 == 0 else (0.0, y, width, y + LINE_PX))
    return boxes


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path
