"""Print the README's result tables (Markdown) from the measured JSON files, so no number is retyped.

    python bench/readme_tables.py [--results assets/results]

Sections: the eval table (``eval-test.json``), student vs teacher with ratios, the loss ablation
(``ablation.json``), and HEI vs LSH/ITQ
(``hashing.json``, test split). Paste the output over the matching README tables.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def eval_table(data: dict) -> str:
    rows = ["| matcher | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | **rsum** | params | weights MB | text query ms | images/s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in data["matchers"].items():
        if name == "hashed":  # the app's alias of hashed-64
            continue
        label = name
        if name.startswith("hashed-"):
            bits = int(name.split("-")[1])
            label = f"{name} ({bits // 8} B/item, C={m.get('candidates', 100)})"
        recall = [m["t2i"][k] for k in ("R@1", "R@5", "R@10")] + [m["i2t"][k] for k in ("R@1", "R@5", "R@10")]
        rss = f"{m['peak_rss_mb']:.0f}" if m.get("peak_rss_mb") else "—"
        rows.append(f"| {label} | " + " | ".join(f"{r:.1f}" for r in recall) + f" | **{m['rsum']:.1f}** | "
                    f"{_m(m['params'])} | {m['size_mb']:.1f} | {m['text_query_ms']:.1f} | {m['images_per_s']:.1f} | {rss} |")
    return "\n".join(rows)


def ratio_table(data: dict) -> str:
    """Teacher, the student and any other ``student-*`` entry (e.g. a candidate), with ratios to the teacher."""
    t = data["matchers"]["teacher"]
    students = {n: m for n, m in data["matchers"].items() if n == "student" or n.startswith("student-")}
    rows = ["| | params | weights | text query p50 | images/s (per-round range) | test rsum |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in (("teacher", t), *students.items()):
        spread = m.get("images_per_s_range")
        spread = f" ({spread[0]:.0f}–{spread[1]:.0f})" if spread else ""
        rows.append(f"| {name} | {_m(m['params'])} | {m['size_mb']:.0f} MB | {m['text_query_ms']:.1f} ms | "
                    f"{m['images_per_s']:.1f}{spread} | {m['rsum']:.1f} |")
    for name, s in students.items():
        rows.append(f"| {name} / teacher | **{t['params'] / s['params']:.2f}× fewer** | {t['size_mb'] / s['size_mb']:.1f}× smaller | "
                    f"**{t['text_query_ms'] / s['text_query_ms']:.1f}× faster** | **{s['images_per_s'] / t['images_per_s']:.1f}× faster** | "
                    f"**{100 * s['rsum'] / t['rsum']:.0f} %** |")
    return "\n".join(rows)


def ablation_table(data: dict) -> str:
    """One row per loss variant: the contrastive and embedding weights, val (selection) and test rsum."""
    teacher = data.get("teacher", {}).get("rsum")
    rows = ["| loss | +contrastive | +embed | best epoch | val rsum | **test rsum** | t2i R@1 | i2t R@1 | test rsum / teacher |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["records"]:
        share = f"{100 * r['test_rsum'] / teacher:.1f} %" if teacher else "—"
        rows.append(f"| `{r['loss']}` | {r['contrastive_weight']:g} | {r['embed_weight']:g} | {r['best_epoch']} | "
                    f"{r['val_rsum']:.1f} | **{r['test_rsum']:.1f}** | {r['t2i_R@1']:.1f} | {r['i2t_R@1']:.1f} | {share} |")
    return "\n".join(rows)


def hashing_table(data: dict, split: str = "test") -> str:
    table: dict[tuple[int, str], dict] = defaultdict(dict)
    for r in data["records"]:
        if r["split"] == split:
            table[(r["bits"], r["method"])][r["candidates"]] = r
    best = defaultdict(float)
    for (bits, _), by_c in table.items():
        for c, r in by_c.items():
            best[(bits, c)] = max(best[(bits, c)], r["candidate_recall"])
    rows = ["| bits | bytes/item | method | cand. recall C=20 | C=50 | C=100 | C=200 | t2i R@10 (C=100) | rsum (C=100) |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for bits in sorted({b for b, _ in table}):
        for method in ("lsh", "itq", "hei"):
            by_c = table.get((bits, method))
            if not by_c:
                continue
            cells = []
            for c in (20, 50, 100, 200):
                v = by_c[c]["candidate_recall"]
                cells.append(f"**{v:.3f}**" if v >= best[(bits, c)] else f"{v:.3f}")
            r100 = by_c[100]
            rows.append(f"| {bits} | {bits // 8} | {method.upper()} | " + " | ".join(cells) +
                        f" | {r100['t2i_R@10']:.1f} | {r100['rsum']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="assets/results")
    args = parser.parse_args()
    root = Path(args.results)
    evaluation = json.loads((root / "eval-test.json").read_text())
    print("## eval-test.json\n\n" + eval_table(evaluation) + "\n")
    print("## student vs teacher\n\n" + ratio_table(evaluation) + "\n")
    ablation = root / "ablation.json"
    if ablation.exists():
        print("## ablation.json\n\n" + ablation_table(json.loads(ablation.read_text())) + "\n")
    hashing = root / "hashing.json"
    if hashing.exists():
        print("## hashing.json (test)\n\n" + hashing_table(json.loads(hashing.read_text())))


if __name__ == "__main__":
    main()
