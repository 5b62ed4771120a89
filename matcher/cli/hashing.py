"""CLI commands of the hashing package: ``train-hash``, ``bench`` and the eval hook.

Kept here so ``matcher/cli.py`` only registers them (``add_commands``) and calls
``add_hashed_entries`` from ``cmd_eval``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from matcher.atomic import write_json, write_records_csv
from matcher.cli.common import DEFAULT_DATA, fail

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_base() -> str:
    """The student when it is registered, else the teacher: the hashing code does not care which."""
    from matcher.registry import registered_models

    return "offline-student" if "offline-student" in registered_models() else "offline-teacher"


def cmd_train_hash(args: argparse.Namespace) -> None:
    import torch

    from matcher.cli.train import recipe_arg
    from matcher.hashing.bench import split_embeddings
    from matcher.hashing.heads import HEIHasher, base_probe, save_heads
    from matcher.hashing.report import baseline_hashers, comparison_records
    from matcher.hashing.train import HashRecipe, train_heads

    recipe = recipe_arg(HashRecipe, args)
    try:
        code_lengths = recipe.code_lengths()
    except ValueError as exc:
        fail(exc)
    torch.set_num_threads(args.threads)
    base, encoder = split_embeddings(recipe.base, args.data, ("train", "val", "test"))
    target = split_embeddings(recipe.target, args.data, ("train",))[0] if recipe.target != recipe.base else base
    heads, training, hashers = {}, [], []
    for bits in code_lengths:
        heads[bits], record = train_heads(base["train"], target["train"], base["val"], bits, recipe)
        training.append(record)
        hashers += [HEIHasher(heads[bits]), *baseline_hashers(base["train"], bits)]
        print(f"{bits} bits: best epoch {record['best_epoch']}, val candidate recall {record['val_candidate_recall']:.4f}")
    meta = {"base": recipe.base, "base_fingerprint": encoder.fingerprint(), "base_probe": base_probe(encoder),
            "target": recipe.target, "recipe": asdict(recipe), "data": str(args.data),
            "best_epochs": {r["bits"]: r["best_epoch"] for r in training}}
    save_heads(args.out, heads, meta)
    write_json(Path(args.out).with_suffix(".train.json"), {"recipe": asdict(recipe), "training": training})
    print(f"saved {args.out}")
    records = comparison_records(hashers, base["val"], "val") + comparison_records(hashers, base["test"], "test")
    results = Path(args.results)
    write_json(results.with_suffix(".json"), {"base": recipe.base, "target": recipe.target, "heads": str(args.out),
                                              "records": records, "training": training})
    write_records_csv(results.with_suffix(".csv"), records)
    print(format_comparison([r for r in records if r["split"] == "test"]))
    print(f"wrote {results.with_suffix('.json')} and .csv")


def format_comparison(records: list[dict]) -> str:
    from matcher.texttable import text_table

    return text_table(records, [("method", "method", "<6"), ("bits", "bits", "5d"), ("C", "candidates", "5d"),
                                ("cand.rec", "candidate_recall", "9.4f"), ("t2i R@1", "t2i_R@1", "8.1f"),
                                ("R@5", "t2i_R@5", "7.1f"), ("R@10", "t2i_R@10", "7.1f"), ("rsum", "rsum", "8.1f")])


def cmd_bench(args: argparse.Namespace) -> None:
    from matcher.hashing.bench import BenchConfig, run_benchmark

    config = BenchConfig(sizes=_int_list(args.sizes), model=args.model or default_base(), data=args.data, bits=args.bits,
                         candidates=_int_list(args.candidates), queries=args.queries, batch=args.batch,
                         hnsw_m=args.hnsw_m, hnsw_max=args.hnsw_max, seed=args.seed, heads=args.heads)
    run_benchmark(config, args.json)


def add_commands(sub) -> None:
    default_data = str(DEFAULT_DATA)
    from matcher.cli.train import add_recipe_options

    p = sub.add_parser("train-hash", help="train HEI hash heads on a float encoder's Flickr8k train embeddings "
                                          "(recipe: base and target encoders, code lengths, optimisation)")
    add_recipe_options(p, "hash")
    p.add_argument("--data", default=default_data)
    p.add_argument("--out", default="assets/models/offline-hashed.pt", help="heads (+ .train.json with the recipe)")
    p.add_argument("--results", default="assets/results/hashing", help="writes .json and .csv (HEI vs LSH vs ITQ)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train_hash)

    p = sub.add_parser("bench", help="scale benchmark: float flat/HNSW vs binary flat vs binary+re-rank")
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--model", help="float encoder whose embeddings are indexed (default as train-hash)")
    p.add_argument("--data", default=default_data)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--candidates", default="100,1000", help="shortlist sizes C for binary+rerank")
    p.add_argument("--queries", type=int, default=200, help="single queries timed per size")
    p.add_argument("--batch", type=int, default=256, help="batch size for the throughput measure")
    p.add_argument("--heads", default="assets/models/offline-hashed.pt", help="hash-head checkpoint of --model")
    p.add_argument("--hnsw-m", dest="hnsw_m", type=int, default=32)
    p.add_argument("--hnsw-max", dest="hnsw_max", type=int, default=1_000_000, help="skip float HNSW above this N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="assets/results/bench.json", help="also writes .csv and .html next to it")
    p.set_defaults(func=cmd_bench)
