"""``eval-fine``: val and test recall, per-pair cost and per-query latency of every fine tier.

One record per (tier, mode, C): the dual teacher itself, each alignment scorer as a pure and a
fused re-ranker of the teacher's top-C (fusion weight λ chosen on val), each code scorer as an
exhaustive late-interaction matcher. ``rsum`` and the R@K columns are test numbers; ``val_rsum``
is the selection number. Latency is one text query against the 1000-image test gallery on the
current torch threads: the teacher's text encoding (measured here) plus the search itself.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from matcher.atomic import write_json, write_records_csv
from matcher.finegrained.evaluate import (code_diversity, encode_split, full_scores, pair_cost_us, pair_scores, pure_and_fused, score_shortlists,
                                          search_ms)
from matcher.finegrained.checkpoints import load_scorer, teacher_heads
from matcher.finegrained.features import dual_embeddings, dual_similarity, fine_features
from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.tops import KIND as KIND_TOPS



def _flat(metrics: dict) -> dict:
    out = {f"{d}_{k}": round(v, 2) for d in ("t2i", "i2t") for k, v in metrics[d].items()}
    return {**out, "rsum": round(metrics["rsum"], 2)}


def text_encode_ms(teacher: str, repeats: int = 30) -> float:
    """The teacher's text tower on one caption (every tier needs it: tokens or pooled)."""
    from matcher.models.dual_encoder import load_checkpoint

    module = load_checkpoint(teacher).module.eval()
    text = ["a brown dog runs through the grass with a stick in its mouth"]
    with torch.inference_mode():
        module.text_embed(text)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module.text_embed(text)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def dual_pair_us(img: torch.Tensor, txt: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for _ in range(3):
        txt @ img.T
    return (time.perf_counter() - t0) / 3 * 1e6 / (len(txt) * len(img))


def _record(name: str, tier: str, mode: str, val: dict, test: dict, encode_ms: float, search: float,
            pair_us: float, **extra) -> dict:
    return {"name": name, "tier": tier, "mode": mode, "val_rsum": round(val["rsum"], 2), **_flat(test),
            "pair_us": round(pair_us, 4), "search_ms": round(search, 3),
            "text_query_ms": round(encode_ms + search, 3), **extra}


def rerank_records(name: str, scorer, enc: dict, caption_images: dict, duals, dual_emb, encode_ms: float,
                   candidates: list[int], tier: str = "alignment") -> list[dict]:
    """Pure and fused re-ranking records for each shortlist size C (λ for fusion chosen on val);
    ``enc``: {split: the split as the scorer stores it}."""
    cost = pair_cost_us(scorer, enc["test"])
    records = []
    for c in candidates:
        lists = {s: score_shortlists(scorer, enc[s], duals[s], c) for s in ("val", "test")}
        search = search_ms(*dual_emb, scorer, enc["test"], candidates=c)
        pure, fused, lam = pure_and_fused(duals, lists, caption_images)
        records.append(_record(f"{name} re-rank C={c}", tier, "rerank", pure["val"], pure["test"],
                               encode_ms, search, cost, candidates=c))
        records.append(_record(f"{name} fused C={c}", tier, "fused", fused["val"], fused["test"],
                               encode_ms, search, cost, candidates=c, fuse_lambda=lam))
    return records


def exhaustive_record(name: str, scorer, feats, dual_emb, encode_ms: float, tier: str = "codes") -> dict:
    """A late-interaction (codes) or decomposed (one vector per item) scorer over the whole gallery."""
    enc = {s: encode_split(scorer, feats[s]) for s in ("val", "test")}
    metrics = {s: retrieval_metrics(full_scores(scorer, enc[s]), feats[s].caption_image) for s in ("val", "test")}
    search = search_ms(*dual_emb, scorer, enc["test"], exhaustive=True)
    codes = enc["test"].images.shape[1]
    diversity = code_diversity(scorer, feats["val"]) if hasattr(scorer, "pool") else {}
    return _record(name, tier, "exhaustive", metrics["val"], metrics["test"], encode_ms, search,
                   pair_cost_us(scorer, enc["test"]), codes=codes,
                   gallery_floats_per_image=codes * enc["test"].images.shape[-1], **diversity)


def run_eval(args) -> dict:
    from matcher.eval.costs import machine_description
    from matcher.train.features import Flickr8k

    feats = fine_features(Flickr8k.load(args.data), args.teacher)
    image_head, text_head, _ = teacher_heads(args.teacher)
    dual_emb = dual_embeddings(feats["test"], image_head, text_head)  # test: embeddings (timing) and matrix, once
    duals = {"val": dual_similarity(feats["val"], image_head, text_head), "test": (dual_emb[1] @ dual_emb[0].T).numpy()}
    encode_ms = text_encode_ms(args.teacher)
    metrics = {s: retrieval_metrics(duals[s], feats[s].caption_image) for s in ("val", "test")}
    records = [_record("dual teacher", "dual", "exhaustive", metrics["val"], metrics["test"], encode_ms,
                       search_ms(*dual_emb), dual_pair_us(*dual_emb), gallery_floats_per_image=dual_emb[0].shape[1])]
    candidates = [int(c) for c in str(args.candidates).split(",") if c.strip()]
    caption_images = {s: feats[s].caption_image for s in ("val", "test")}
    vl = tops = None  # vl-cross/-decomposed and tops-alignment: built on the teacher module, own inputs (lazy)
    for path in sorted(Path(args.models).glob(getattr(args, "pattern", None) or "*.pt")):
        kind = _kind(path)
        if kind == KIND_TOPS:
            tops = tops or _tops_inputs(args)
            records += _tops_records(path, tops, caption_images, duals, dual_emb, encode_ms, candidates)
        elif kind:
            vl = vl or _vl_inputs(args)
            records += _vl_records(path, kind, vl, encode_ms)
        else:
            records += _scorer_records(path, image_head, text_head, feats, caption_images, duals, dual_emb, encode_ms,
                                       candidates)
        print(f"evaluated {path.name}", flush=True)
    if getattr(args, "ensemble", None):  # "A.pt,B.pt,...": fused together with the dual cosine
        paths = [Path(x) for x in args.ensemble.split(",")]
        vl = vl or (_vl_inputs(args) if any(_kind(p) in ("vl-cross", "vl-decomposed") for p in paths) else None)
        tops = tops or (_tops_inputs(args) if any(_kind(p) == KIND_TOPS for p in paths) else None)
        records.append(_ensemble_record(paths, candidates[0], feats, duals, image_head, text_head, vl, tops, encode_ms))
    results = Path(args.results)
    previous = _previous(results.with_suffix(".json")) if getattr(args, "append", False) else {}
    if previous:  # keep earlier tiers (same teacher row first), replace re-evaluated ones
        fresh = {r["name"] for r in records}
        records = records[:1] + [r for r in previous.get("records", [])[1:] if r["name"] not in fresh] + records[1:]
    teacher = records[0]
    for r in records:
        r["rsum_vs_teacher"] = round(r["rsum"] - teacher["rsum"], 2)
        r["val_rsum_vs_teacher"] = round(r["val_rsum"] - teacher["val_rsum"], 2)
    command = "python -m matcher " + " ".join(sys.argv[1:])
    earlier = previous.get("commands", [previous["command"]] if "command" in previous else [])
    report = {"command": command, "commands": [*earlier, command], "split": "test (val_rsum: val)",
              "gallery_images": len(feats["test"]), "machine": machine_description(), "records": records,
              "distillation": student_records(args.data, [p for p in str(args.students or "").split(",") if p])
              or previous.get("distillation", [])}
    write_json(results.with_suffix(".json"), report)
    write_records_csv(results.with_suffix(".csv"), records)
    print(format_table(records))
    return report


def _scorer_records(path: Path, image_head, text_head, feats, caption_images, duals, dual_emb, encode_ms: float,
                    candidates: list[int]) -> list[dict]:
    """Rows of a scorer on the teacher's fine features: alignment and cross re-rankers, code scorers."""
    scorer, recipe, _ = load_scorer(path, image_head, text_head)
    tier = recipe["tier"] if isinstance(recipe, dict) else recipe.tier
    if tier in ("alignment", "cross"):  # cross, the slowest tier: only its own (small) shortlist size
        enc = {s: encode_split(scorer, feats[s]) for s in ("val", "test")}
        sizes = candidates if tier == "alignment" else [recipe["candidates"]]
        return rerank_records(path.stem, scorer, enc, caption_images, duals, dual_emb, encode_ms, sizes, tier=tier)
    return [exhaustive_record(path.stem, scorer, feats, dual_emb, encode_ms, tier)]


def _tops_records(path: Path, tops: tuple, caption_images, duals, dual_emb, encode_ms: float,
                  candidates: list[int]) -> list[dict]:
    """``tops-alignment`` re-ranks like an alignment scorer, from its own tops run on the trunk caches
    (``tops`` = ``_tops_inputs``); a query pays the teacher's text encoding plus the tier's own top layers."""
    from matcher.finegrained.tops import encode_cached, load_tops

    module, splits = tops
    model, _, _ = load_tops(path, module)
    enc = {s: encode_cached(model, splits[s]) for s in ("val", "test")}
    return rerank_records(path.stem, model, enc, caption_images, duals, dual_emb,
                          encode_ms + _own_text_ms(model, splits["test"]), candidates, tier=KIND_TOPS)


def _own_text_ms(model, split) -> float:
    """A tops-alignment query also runs the tier's own top MiniLM layers on the caption (the lower
    layers' states come from the teacher's text tower run)."""
    from matcher.finegrained.evaluate import median_ms

    one = split.caption_batch(np.array([0]))
    with torch.inference_mode():
        return median_ms(lambda: model.encode_text(*one), 30)


def _vl_inputs(args) -> tuple:
    from matcher.finegrained.vl_cross import cross_splits

    module, _, _, _, splits = cross_splits(args.data, args.teacher, ("val", "test"))
    return module, splits


def _vl_record(encode_ms: float):
    """``_record`` with the teacher's text-encoding time filled in (the vl rows pass the rest)."""
    def record(name, tier, mode, val, test, search, cost, **extra):
        return _record(name, tier, mode, val, test, encode_ms, search, cost, **extra)
    return record


@functools.lru_cache(maxsize=None)
def _kind(path: Path) -> str | None:
    """"vl-cross" / "vl-decomposed" / "tops-alignment" for the checkpoints built on the teacher module
    (own inputs), None for the scorers on the teacher's fine features."""
    kind = torch.load(path, map_location="cpu", weights_only=True).get("kind")
    return kind if kind in ("vl-cross", "vl-decomposed", KIND_TOPS) else None


def _tops_inputs(args) -> tuple:
    """(teacher module, {val, test: CachedSplit}): what tops-alignment checkpoints read."""
    from matcher.finegrained.tops import cached_splits

    return cached_splits(args.data, args.teacher, ("val", "test"))


def _ensemble_record(paths: list[Path], candidates: int, feats, duals, image_head, text_head, vl, tops,
                     encode_ms) -> dict:
    """One row: the teacher's top-C fused with every scorer in ``paths`` (weights chosen on val)."""
    from matcher.finegrained.ensemble import choose_weights, score_split
    from matcher.finegrained.evaluate import median_ms
    from matcher.finegrained.tops import encode_cached, load_tops
    from matcher.finegrained.vl_cross import load_vl_cross, score_pairs

    def pair_functions(split: str) -> list:
        out = []
        for model, kind in models:
            if kind in ("vl-cross", "vl-decomposed"):
                out.append(lambda c, i, m=model: score_pairs(m, vl[1][split], c, i))
            else:
                enc = encode_cached(model, tops[1][split]) if kind == KIND_TOPS else encode_split(model, feats[split])
                out.append(lambda c, i, m=model, e=enc: pair_scores(m, e, c, i))
        return out

    def load(p: Path):
        kind = _kind(p)
        if kind == KIND_TOPS:
            return load_tops(p, tops[0])[0], kind
        if kind:
            return load_vl_cross(p, vl[0])[0], kind
        return load_scorer(p, image_head, text_head)[0], None

    models = [load(p) for p in paths]
    functions = {s: pair_functions(s) for s in ("val", "test")}  # each split encoded once: scores and timing
    scored = {s: score_split(duals[s], feats[s].caption_image, functions[s], candidates) for s in ("val", "test")}
    weights, _ = choose_weights(scored["val"])
    metrics = {s: scored[s].metrics(weights) for s in ("val", "test")}
    test_fns = functions["test"]
    one = np.zeros(candidates, dtype=np.int64)
    pairs = sum(median_ms(lambda f=f: f(one, np.arange(candidates)), 10) for f in test_fns)
    own_text = sum(_own_text_ms(m, tops[1]["test"]) for m, kind in models if kind == KIND_TOPS)
    name = " + ".join(p.stem for p in paths) + f" fused C={candidates}"
    return _record(name, "ensemble", "fused", metrics["val"], metrics["test"], encode_ms + own_text, pairs,
                   1000 * pairs / candidates, candidates=candidates,
                   fuse_weights={p.stem: w for p, w in zip(paths, weights)})


def _vl_records(path: Path, kind: str, vl: tuple, encode_ms: float) -> list[dict]:
    from matcher.finegrained.vl_cross import load_vl_cross
    from matcher.finegrained.vl_eval import cross_records, decomposed_record

    module, splits = vl
    model, recipe, _ = load_vl_cross(path, module)
    record = _vl_record(encode_ms)
    if kind == "vl-cross":
        return cross_records(path.stem, model, splits, recipe["candidates"], record)
    return [decomposed_record(path.stem, model, splits, record)]


def student_records(data_root: str, paths: list[str]) -> list[dict]:
    """Students distilled from different teacher matrices: val from training, test from cached features."""
    from matcher.models.dual_encoder import load_checkpoint
    from matcher.train.features import Flickr8k, cached_image_features
    from matcher.train.pairs import CachedSplit
    from dataclasses import fields

    from matcher.train.student import StudentRecipe, caption_id_features
    from matcher.train.teacher import cached_metrics

    data, out = Flickr8k.load(data_root), []
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        recipe = payload["metadata"]["recipe"]
        known = {f.name for f in fields(StudentRecipe)}  # the cache the student was trained from (skips, crops)
        r = StudentRecipe(**{k: v for k, v in recipe.items() if k in known})
        module = load_checkpoint(path).module
        test = CachedSplit.from_features(
            cached_image_features(data, r.image_variant, r.image_size, r.cached_blocks, r.skipped_blocks(),
                                  r.crop_views),
            caption_id_features(data, module), "test")
        out.append({"name": Path(path).stem, "loss": recipe["loss"], "teacher_scores": recipe.get("teacher_scores", "dual"),
                    "epochs": recipe["epochs"], "caption_passes": recipe["caption_passes"], "seed": recipe["seed"],
                    "best_epoch": payload["metadata"]["best_epoch"], "val_rsum": round(payload["metadata"]["val"]["rsum"], 2),
                    **_flat(cached_metrics(module, test))})
    return out


def _previous(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def format_table(records: list[dict]) -> str:
    from matcher.texttable import text_table

    return text_table(records, [("tier", "name", "<34"), ("val", "val_rsum", "8.2f"), ("test", "rsum", "8.2f"),
                                ("t2i@1", "t2i_R@1", "7.2f"), ("i2t@1", "i2t_R@1", "7.2f"), ("pair us", "pair_us", "9.3f"),
                                ("query ms", "text_query_ms", "9.2f")])
