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
    from matcher.hashing.bench import DEFAULT_METHOD, DEFAULT_METHODS, BenchConfig, run_benchmark

    methods = [m.strip() for m in args.methods.split(";")] if args.methods else list(DEFAULT_METHODS)
    galleries = [g.strip() for g in args.galleries.split(",") if g.strip()]
    unknown = set(galleries) - {"gaussian", "views"}
    if unknown:
        fail(f"unknown --galleries {sorted(unknown)}; choose from gaussian, views")
    if args.engine == "ray":
        from matcher.scale.engine import ray_available

        if not ray_available():
            fail("--engine ray needs Ray: pip install -r requirements-scale.txt")
        if not args.methods:
            methods = ["float-flat"]   # the default method (sharded) is added by the benchmark
    config = BenchConfig(sizes=_int_list(args.sizes), model=args.model or default_base(), data=args.data, bits=args.bits,
                         methods=methods, candidates=_int_list(args.candidates), queries=args.queries, rounds=args.rounds,
                         batch=args.batch, recall_queries=args.recall_queries, galleries=galleries, views=args.views,
                         hnsw_m=args.hnsw_m, hnsw_max=args.hnsw_max, seed=args.seed, heads=args.heads,
                         engine=args.engine, workers=_int_list(args.workers), store=not args.no_store,
                         default_method=args.default_method or DEFAULT_METHOD, work_dir=args.work_dir or "")
    if args.suite == "scoring":
        from matcher.hashing.bench import run_scoring

        run_scoring(config, args.json)
    else:
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

    p = sub.add_parser("bench", help="scale benchmark: exact float search vs two-stage code indexes (HEI, ITQ, LSH, "
                                      "faiss PQ / RaBitQ) at 1k..1M items; --engine ray shards the default")
    p.add_argument("--suite", choices=("scale", "scoring"), default="scale",
                   help="scoring: Hamming vs asymmetric shortlists of the same codes on the real val/test splits")
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--model", help="float encoder whose embeddings are indexed (default as train-hash)")
    p.add_argument("--data", default=default_data)
    p.add_argument("--bits", type=int, default=256, help="code length of the hash-code methods (256 = 32 B/item)")
    p.add_argument("--methods", help="';'-separated method names (default: all; see matcher/hashing/bench.py), "
                                     "e.g. 'float-flat;hei-asym;PQ64x4fs'")
    p.add_argument("--candidates", default="100,300,500,750,1000,3000", help="shortlist sizes C for the re-ranked methods")
    p.add_argument("--galleries", default="gaussian,views", help="distractor kinds: gaussian and/or views")
    p.add_argument("--views", type=int, default=4, help="augmented views encoded per real photo (views gallery)")
    p.add_argument("--queries", type=int, default=200, help="single queries timed per size, method and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--batch", type=int, default=256, help="batch size for the throughput measure")
    p.add_argument("--recall-queries", dest="recall_queries", type=int, default=1000, help="queries whose recall is measured")
    p.add_argument("--heads", default="assets/models/offline-hashed.pt", help="hash-head checkpoint of --model")
    p.add_argument("--hnsw-m", dest="hnsw_m", type=int, default=32)
    p.add_argument("--hnsw-max", dest="hnsw_max", type=int, default=100_000, help="skip float HNSW above this N")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: also shard the default method over Ray workers (loopback; needs requirements-scale.txt)")
    p.add_argument("--workers", default="2", help="with --engine ray: worker counts to run, e.g. 1,2")
    p.add_argument("--no-store", dest="no_store", action="store_true", help="skip building/reopening the index directory")
    p.add_argument("--default-method", dest="default_method", help="method of the index directory and the Ray engine "
                                                                  "(default: the measured best, matcher/hashing/bench.py)")
    p.add_argument("--work-dir", dest="work_dir", help="where the float16 re-rank files and index directories go "
                                                       "(default: a temporary folder; about 0.8 KB per item)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="assets/results/bench.json", help="also writes .csv, .html and .fig.json next to it")
    p.set_defaults(func=cmd_bench)
