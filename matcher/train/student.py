"""Train the distilled student: EfficientNet-Lite0 at reduced resolution + a tiny text transformer.

Like the teacher (``matcher.train.teacher``), the student trains on cached features so a CPU is
enough: the image trunk's outputs at the student's resolution are cached once, the text "trunk" is
just the tokenizer + vocabulary remap, and the teacher's embeddings of every training image view
and caption are computed once from the teacher's own feature caches (``teacher_targets``). Each
batch's teacher similarity matrix is then a [B, D] x [D, B] product.

Objective (``matcher.train.losses.DistillationObjective``):
    distill_weight * L_name(S, T) + contrastive_weight * InfoNCE(S) + embed_weight * L_embed
where L_embed = mean(1 - cos(student, teacher)) over the batch's image embeddings plus the same over
its caption embeddings (``EmbeddingDistillationLoss``, optional feature distillation; both live in
256-d spaces). The loop (optimiser, schedule, best epoch on val) is ``matcher.train.loop.fit``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matcher.atomic import atomic_path, write_json
from matcher.eval.metrics import retrieval_metrics
from matcher.models.dual_encoder import DualEncoderModule, load_checkpoint, save_checkpoint
from matcher.models.student_towers import caption_vocabulary, init_from_minilm
from matcher.train.features import Flickr8k, cached_arrays, cached_image_features, cached_text_features, file_digest
from matcher.train.loop import Optimiser, Resume, Round, fit, seeded, train_frozen_batchnorm
from matcher.train.losses import DistillationObjective, EmbeddingDistillationLoss
from matcher.train.pairs import CachedSplit
from matcher.train.teacher import cached_metrics, embed_split

DEFAULT_TEACHER = "assets/models/offline-teacher.pt"


@dataclass
class StudentRecipe:
    """Everything that determines a trained student (stored in the checkpoint's metadata)."""

    loss: str = "wsd"
    contrastive_weight: float = 1.0
    distill_weight: float = 1.0
    embed_weight: float = 0.0
    wsd_eps: float = 0.5
    image_variant: str = "efficientnet-lite0"
    image_size: int = 112
    # Residual Lite0 blocks left out of the image tower ("6,7,9"; EfficientNetLiteTower.skip_blocks);
    # cached_blocks / finetune_blocks then count the blocks that remain.
    skip_blocks: str = ""
    # Extra training views per photo: seeded random crops (features.crop_boxes), each distilled
    # towards the teacher's embedding of the same crop. 0 = the photo and its mirror image only.
    crop_views: int = 0
    cached_blocks: int = 1       # the last MBConv block + conv head run per step (CPU budget)
    finetune_blocks: int = 1
    text_dim: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_dropout: float = 0.1
    vocab_min_count: int = 2
    embed_dim: int = 256
    head_dropout: float = 0.3
    epochs: int = 15
    caption_passes: int = 1      # passes over the images per epoch, each with a fresh random caption
    batch_size: int = 256
    lr: float = 1e-3             # heads, text tower (trained from a PCA init) and logit scale
    tower_lr: float = 1e-4       # fine-tuned image blocks (ImageNet-pretrained)
    weight_decay: float = 0.05
    seed: int = 0
    teacher: str = DEFAULT_TEACHER
    # "dual": the teacher matrix is t_img @ t_txt.T (default); the path of a trained alignment scorer
    # (matcher.finegrained): its per-batch alignment scores are distilled instead; "fused:PATH@LAMBDA":
    # the fused re-ranker's score t_img @ t_txt.T + LAMBDA * alignment (matcher.finegrained.distill).
    teacher_scores: str = "dual"
    # Diagnostic only (bench/student_sides.py): "text" or "image" replaces that student tower by the
    # teacher's fixed embeddings, so the other tower is trained and scored against the teacher's. It
    # measures how far each student tower alone falls short; the checkpoint is then half a model.
    teacher_side: str = "none"

    def skipped_blocks(self) -> tuple[int, ...]:
        try:
            return tuple(sorted(int(i) for i in self.skip_blocks.split(",") if i.strip()))
        except ValueError:
            raise ValueError(f"skip_blocks must be comma-separated block numbers such as 6,7,9, "
                             f"not {self.skip_blocks!r}") from None

    def model_config(self, vocab_size: int, finetune: bool = True) -> dict:
        image = {"type": "efficientnet-lite", "variant": self.image_variant, "image_size": self.image_size,
                 "trainable_blocks": self.finetune_blocks if finetune else self.cached_blocks}
        if self.skipped_blocks():  # only then, so configs (and fingerprints) of full towers are unchanged
            image["skip_blocks"] = list(self.skipped_blocks())
        return {
            "image_tower": image,
            "text_tower": {"type": "tiny-text", "vocab_size": vocab_size, "dim": self.text_dim,
                           "layers": self.text_layers, "heads": self.text_heads, "dropout": self.text_dropout},
            "embed_dim": self.embed_dim,
            "head_dropout": self.head_dropout,
        }


# -- teacher targets ----------------------------------------------------------------------------

def teacher_targets(data: Flickr8k, teacher_path: str | Path, crop_views: int = 0) -> dict[str, np.ndarray]:
    """The teacher's train image-view and caption embeddings and its logit scale, cached on disk.

    Keyed by the checkpoint's content hash, so a retrained teacher never serves stale targets.
    Computed from the teacher's own trunk caches (the same ones its training used).
    """
    teacher_path = Path(teacher_path)
    cropped = f"-crops{crop_views}" if crop_views else ""

    def build() -> dict[str, np.ndarray]:
        encoder = load_checkpoint(teacher_path)
        module, config = encoder.module, encoder.config
        img_cfg, txt_cfg = config["image_tower"], config["text_tower"]
        image_feats = cached_image_features(data, img_cfg["variant"], img_cfg["image_size"], img_cfg["trainable_blocks"],
                                            crop_views=crop_views)
        text_feats = cached_text_features(data, txt_cfg["trainable_layers"])
        targets = {"logit_scale": np.array(float(module.logit_scale.detach().exp().clamp(max=100)))}
        for split in ("train", "val"):
            images, texts = embed_split(module, CachedSplit.from_features(image_feats, text_feats, split))
            targets[f"{split}_images"], targets[f"{split}_texts"] = images.half().numpy(), texts.half().numpy()
        return targets

    return cached_arrays(f"teacher-targets-{file_digest(teacher_path)}{cropped}", data, build)


# -- student data ------------------------------------------------------------------------------

def caption_id_features(data: Flickr8k, module: DualEncoderModule) -> dict[str, np.ndarray]:
    """The tiny text tower's "trunk" output per split: compact token ids as [T, 1] + offsets."""
    tower = module.text_tower
    feats = {}
    for split in ("train", "val", "test"):
        texts = [c for i in data.indices(split) for c in data.captions[i]]
        tok = tower.tokenizer(texts, truncation=True, max_length=tower.max_tokens)["input_ids"]
        ids = tower.forward_trunk(torch.tensor(np.concatenate(tok))).numpy().astype(np.float32)
        feats[f"{split}_tokens"] = ids[:, None]
        feats[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(t) for t in tok])]).astype(np.int64)
    return feats


def build_student(recipe: StudentRecipe, data: Flickr8k) -> tuple[DualEncoderModule, dict]:
    """The training module (cache split, only the fine-tuned part trainable) and its vocab info."""
    train_captions = [c for i in data.indices("train") for c in data.captions[i]]
    kept = caption_vocabulary(train_captions, recipe.vocab_min_count)
    module = DualEncoderModule(recipe.model_config(len(kept), finetune=False))
    info = init_from_minilm(module.text_tower, kept)
    image_top = module.image_tower.top_modules()
    frozen = len(image_top) - 1 - recipe.finetune_blocks if recipe.finetune_blocks else len(image_top)
    for m in image_top[: max(0, frozen)]:
        m.requires_grad_(False)
    return module, {"vocab_size": len(kept), **info}


def _step_embeddings(module: DualEncoderModule, split: CachedSplit, rows, views, captions):
    img = module.image_head(module.image_tower.forward_top(split.image_batch(rows, views)))
    states, mask = split.caption_batch(captions)
    txt = module.text_head(module.text_tower.forward_top(states, mask))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _with_teacher_side(side: str, img: torch.Tensor, txt: torch.Tensor,
                       t_img: torch.Tensor, t_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap in the teacher's embeddings for the side named by ``StudentRecipe.teacher_side``."""
    if side == "text":
        return img, t_txt
    if side == "image":
        return t_img, txt
    return img, txt


def _val_metrics(module: DualEncoderModule, val: CachedSplit, side: str, targets: dict | None) -> dict:
    if side == "none":
        return cached_metrics(module, val)
    images, texts = embed_split(module, val)
    t_img = torch.from_numpy(targets["val_images"][:, 0].astype(np.float32))
    t_txt = torch.from_numpy(targets["val_texts"].astype(np.float32))
    images, texts = _with_teacher_side(side, images[:, 0], texts, t_img, t_txt)
    return retrieval_metrics((texts @ images.T).numpy(), np.repeat(np.arange(len(val)), val.captions_per_image))


def train_student(data_root: str | Path, out: str | Path, recipe: StudentRecipe, progress: bool = True,
                  resume: str | Path | None = None) -> dict:
    """Train, keep the best epoch on val, save the checkpoint; returns the training history.

    ``resume``: a state file written after every epoch (``matcher.train.loop.Resume``); a run killed
    part-way continues from it when started again with the same recipe."""
    if recipe.teacher_side not in ("none", "text", "image"):
        raise ValueError(f"teacher_side must be none, text or image, not {recipe.teacher_side!r}")
    rng = seeded(recipe.seed)
    data = Flickr8k.load(data_root)
    needs_teacher = recipe.loss != "contrastive" or recipe.embed_weight > 0 or recipe.teacher_side != "none"
    targets = None
    if needs_teacher:
        targets = teacher_targets(data, recipe.teacher, recipe.crop_views)
        t_images = torch.from_numpy(targets["train_images"].astype(np.float32))
        t_texts = torch.from_numpy(targets["train_texts"].astype(np.float32))
        teacher_scale = float(targets["logit_scale"])
    scores = None
    if needs_teacher:
        from matcher.finegrained.distill import teacher_scores

        scores = teacher_scores(recipe.teacher_scores, data, recipe.teacher, t_images, t_texts, teacher_scale,
                                recipe.batch_size, seed=recipe.seed)
        if scores.kind != "dual":
            teacher_scale = scores.scale
            print(f"teacher scores {recipe.teacher_scores} ({scores.kind}), teacher scale {teacher_scale:.2f}",
                  flush=True)

    module, vocab_info = build_student(recipe, data)
    image_feats = cached_image_features(data, recipe.image_variant, recipe.image_size, recipe.cached_blocks,
                                        recipe.skipped_blocks(), recipe.crop_views)
    text_feats = caption_id_features(data, module)
    train = CachedSplit.from_features(image_feats, text_feats, "train")
    val = CachedSplit.from_features(image_feats, text_feats, "val")

    image_tower_params = [p for p in module.image_tower.parameters() if p.requires_grad]
    image_ids = {id(p) for p in image_tower_params}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in image_ids]
    groups = [{"params": rest, "lr": recipe.lr}]
    if image_tower_params:
        groups.append({"params": image_tower_params, "lr": recipe.tower_lr})
    steps_per_epoch = recipe.caption_passes * (len(train) // recipe.batch_size)
    kwargs = {"eps": recipe.wsd_eps} if recipe.loss in ("wsd", "wsd-shared") else {}
    objective = DistillationObjective(recipe.loss, recipe.contrastive_weight, recipe.distill_weight, **kwargs)
    embed_loss = EmbeddingDistillationLoss()

    def batches(_epoch: int):
        return (b for _ in range(recipe.caption_passes) for b in train.sample_epoch(recipe.batch_size, rng))

    def step(batch) -> tuple[torch.Tensor, dict]:
        rows, views, captions = batch
        img, txt = _step_embeddings(module, train, rows, views, captions)
        scale = module.logit_scale.exp().clamp(max=100)
        if needs_teacher:
            t_img = t_images[torch.from_numpy(rows), torch.from_numpy(views)]
            t_txt = t_texts[torch.from_numpy(captions)]
            img, txt = _with_teacher_side(recipe.teacher_side, img, txt, t_img, t_txt)
            sim_t = scores.batch(rows, captions, t_img, t_txt)
            loss, parts = objective(img @ txt.T, sim_t, scale, teacher_scale)
        else:
            loss, parts = objective(img @ txt.T, None, scale)
        if recipe.embed_weight:
            embed = embed_loss(img, t_img) + embed_loss(txt, t_txt)
            loss = loss + recipe.embed_weight * embed
            parts["embed"] = float(embed.detach())
        parts["total"] = float(loss.detach())
        return loss, parts

    def evaluate(r: Round) -> dict:
        metrics = _val_metrics(module, val, recipe.teacher_side, targets)
        return {"epoch": r.index, "loss": r.parts, "val_rsum": metrics["rsum"], "val": metrics,
                "temperature": float(1 / module.logit_scale.detach().exp()), "seconds": time.time() - r.started}

    def log(entry: dict) -> None:
        print(f"[{recipe.loss}] epoch {entry['epoch']:2d}  loss {entry['loss']['total']:.3f}  "
              f"val rsum {entry['val_rsum']:.1f}  ({entry['seconds']:.0f}s)", flush=True)

    optimiser = Optimiser(groups, recipe.weight_decay, recipe.epochs * steps_per_epoch, pct_start=0.1)
    best = fit(module, optimiser, step, batches, evaluate, rounds=recipe.epochs, steps_per_round=steps_per_epoch,
               train_mode=train_frozen_batchnorm, progress=f"{recipe.loss} epoch" if progress else None, log=log,
               resume=Resume(Path(resume), rng) if resume is not None else None)
    best_epoch = best.best  # restored by fit
    config = recipe.model_config(vocab_info["vocab_size"])
    final = DualEncoderModule(config)
    final.load_state_dict(module.state_dict())
    metadata = {"recipe": asdict(recipe), "best_epoch": best_epoch["epoch"], "val": best_epoch["val"],
                "vocab": vocab_info, "data": "Flickr8k train, selected on val",
                "teacher_sha256_16": file_digest(Path(recipe.teacher)) if needs_teacher else None}
    save_checkpoint(final, config, out, metadata)
    return {"recipe": asdict(recipe), "history": best.history, "best_epoch": best_epoch["epoch"],
            "val": best_epoch["val"], "checkpoint": str(out), **vocab_info}


# -- ablation -----------------------------------------------------------------------------------

ABLATION_COLUMNS = ["loss", "seed", "contrastive_weight", "distill_weight", "embed_weight", "best_epoch", "val_rsum",
                    "test_rsum", "t2i_R@1", "i2t_R@1", "params", "size_mb", "text_query_ms", "images_per_s",
                    "rsum_vs_teacher", "params_ratio", "text_speedup", "image_speedup", "train_seconds"]


def ablation_row(name: str, recipe: StudentRecipe, trained: dict, result: dict, teacher: dict) -> dict:
    """One table row: the student's test numbers and its ratios to the teacher's (teacher / student)."""
    def ratio(a, b):
        return round(a / b, 2) if a == a and b == b and b else None  # NaN / 0 -> not measured yet

    return {
        "loss": name, "seed": recipe.seed, "contrastive_weight": recipe.contrastive_weight,
        "distill_weight": 0.0 if recipe.loss == "contrastive" else recipe.distill_weight,
        "embed_weight": recipe.embed_weight, "best_epoch": trained["best_epoch"],
        "val_rsum": round(trained["val"]["rsum"], 1), "test_rsum": round(result["rsum"], 1),
        "t2i_R@1": round(result["t2i"]["R@1"], 1), "i2t_R@1": round(result["i2t"]["R@1"], 1),
        "params": result["params"], "size_mb": result["size_mb"], "text_query_ms": result["text_query_ms"],
        "images_per_s": result["images_per_s"],
        "rsum_vs_teacher": None if ratio(result["rsum"], teacher["rsum"]) is None
        else round(result["rsum"] / teacher["rsum"], 4),
        "params_ratio": ratio(teacher["params"], result["params"]),
        "text_speedup": ratio(teacher["text_query_ms"], result["text_query_ms"]),
        "image_speedup": ratio(result["images_per_s"], teacher["images_per_s"]),
        "train_seconds": round(sum(h["seconds"] for h in trained["history"])),
    }


def write_ablation(path_json: str | Path, rows: list[dict], header: dict, summary: list[dict] | None = None) -> None:
    """The table as JSON (with the command, machine and teacher numbers) and as CSV, atomically.

    ``summary`` (per-loss statistics over seeds, ``seed_summary``) goes into the JSON as
    ``summary`` and into the CSV as one row per loss after the records, with ``seed`` = "all"."""
    import csv
    import io

    write_json(path_json, {**header, "records": rows, **({"summary": summary} if summary else {})})
    buf = io.StringIO()
    extra = [k for k in (summary[0] if summary else {}) if k not in ABLATION_COLUMNS]
    writer = csv.DictWriter(buf, fieldnames=ABLATION_COLUMNS + extra)
    writer.writeheader()
    writer.writerows(rows)
    for entry in summary or []:
        writer.writerow({**entry, "seed": "all"})
    with atomic_path(Path(path_json).with_suffix(".csv")) as tmp:
        tmp.write_text(buf.getvalue())


def parse_variant(spec: str) -> tuple[str, dict]:
    """``wsd`` or ``wsd+embed`` (adds the embedding-distillation term) or ``mse:0`` (no contrastive)."""
    changes: dict = {}
    name = spec
    if "+embed" in name:
        name = name.replace("+embed", "")
        changes["embed_weight"] = 1.0
    if ":" in name:
        name, weight = name.split(":", 1)
        changes["contrastive_weight"] = float(weight)
    changes["loss"] = name
    return spec, changes


def _finished_variants(results: Path, base: StudentRecipe, out_dir: Path) -> dict[str, tuple[dict, dict]]:
    """Variants an earlier run of the same ablation (same base recipe) already trained and tested:
    name -> (trained, result) rebuilt from its row, if the row's checkpoint is still there."""
    if not results.exists():
        return {}
    earlier = json.loads(results.read_text())
    # Recipe fields added since that run take their defaults, which is what that run did.
    if {**asdict(StudentRecipe()), **earlier.get("recipe", {})} != asdict(base):
        return {}
    done = {}
    for row in earlier.get("records", earlier.get("rows", [])):  # "rows": files written before one schema
        if _variant_checkpoint(out_dir, row["loss"]).exists():
            trained = {"best_epoch": row["best_epoch"], "val": {"rsum": row["val_rsum"]},
                       "history": [{"seconds": row["train_seconds"]}]}
            result = {"rsum": row["test_rsum"], "t2i": {"R@1": row["t2i_R@1"]}, "i2t": {"R@1": row["i2t_R@1"]}}
            done[row["loss"]] = (trained, result)
    return done


def _variant_checkpoint(out_dir: Path, name: str, seed: int | None = None) -> Path:
    suffix = "" if seed is None else f"-s{seed}"
    return Path(out_dir) / f"student-{name.replace(':', '-c').replace('+', '-')}{suffix}.pt"


def _run_record(ckpt: Path) -> Path:
    return ckpt.with_suffix(".run.json")


def _finished_run(ckpt: Path, recipe: StudentRecipe) -> tuple[dict, dict] | None:
    """(trained, result) of a finished (variant, seed) run: its record beside the checkpoint, if the
    checkpoint is still there and the record's recipe is this one (fields added since: defaults)."""
    record = _run_record(ckpt)
    if not (ckpt.exists() and record.exists()):
        return None
    done = json.loads(record.read_text())
    if {**asdict(StudentRecipe()), **done.get("recipe", {})} != asdict(recipe):
        return None
    return done["trained"], done["result"]


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per loss (in first-seen order): number of seeds, mean, min, max and sample std (ddof 1; 0
    for one seed) of val and test rsum over its rows."""
    out = []
    for loss in dict.fromkeys(r["loss"] for r in rows):
        mine = [r for r in rows if r["loss"] == loss]
        entry = {"loss": loss, "seeds": len(mine)}
        for key in ("val_rsum", "test_rsum"):
            v = np.array([r[key] for r in mine], dtype=np.float64)
            entry.update({f"{key}_mean": round(float(v.mean()), 2), f"{key}_min": float(v.min()),
                          f"{key}_max": float(v.max()),
                          f"{key}_std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 2)})
        entry["val_rsum"], entry["test_rsum"] = entry["val_rsum_mean"], entry["test_rsum_mean"]
        out.append(entry)
    return out


def run_ablation(data_root: str | Path, out_dir: str | Path, base: StudentRecipe, variants: list[str],
                 results: str | Path, gallery_path: str | Path, split: str = "test", command: str = "",
                 resume: bool = False, seeds: list[int] | None = None) -> dict:
    """Train every variant with the same recipe/budget (and seed, or each of ``seeds``); tabulate
    recall, costs and teacher ratios.

    Every variant has the same architecture, so costs (params, text-query latency, image throughput)
    are measured once, with ``measure_encoders`` (the code path of ``python -m matcher eval``) on
    the checkpoint that is best on val; the teacher gets the same treatment. Per-variant test recall
    comes from the cached test trunk features (float16 cache, same weights); the best variant's
    full-pipeline test recall is stored in the header next to it. The table is rewritten after
    every variant so a long run can be watched. ``resume`` reuses the runs an interrupted run of
    the same ablation (same base recipe, checkpoint still in ``out_dir``) already finished.

    With ``seeds``, each variant is trained once per seed (``recipe.seed``; checkpoints
    ``student-NAME-sSEED.pt``, each with a ``.run.json`` record that ``resume`` reuses, so several
    processes can share ``out_dir``), the rows carry their seed, and the per-loss mean, min..max
    and std of val and test rsum are written as ``summary`` (``seed_summary``). The best variant
    is the one with the highest *mean* val rsum; its checkpoint the seed best on val.
    """
    from matcher.eval.costs import machine_description, measure_encoders
    from matcher.data.gallery import open_gallery

    data = Flickr8k.load(data_root)
    multi = seeds is not None
    seeds = list(seeds) if multi else [base.seed]
    header = {"command": command, "split": split, "machine": machine_description(),
              "budget": {"epochs": base.epochs, "batch_size": base.batch_size, "seed": base.seed},
              "recipe": asdict(base),
              "note": "test recall per row from cached trunk features; costs measured once (same architecture) "
                      "on the best-on-val checkpoint with matcher.eval.costs.measure_encoders, timed with the teacher"}
    if multi:
        header["budget"]["seeds"] = seeds
    finished = _finished_variants(Path(results), base, Path(out_dir)) if resume and not multi else {}
    rows, trained_runs = [], []
    pending = {"rsum": float("nan"), "params": 0, "text_query_ms": float("nan"), "images_per_s": float("nan")}
    no_costs = {k: pending[k] for k in ("params", "text_query_ms", "images_per_s")}

    def table(runs, teacher, measured=None):
        out = [ablation_row(n, r, t, {**res, **(measured or {})}, teacher) for n, r, t, res, _ in runs]
        return out, (seed_summary(out) if multi else None)

    for seed in seeds:  # seed-major: every variant has a first seed before any has a second
        for spec in variants:
            name, changes = parse_variant(spec)
            recipe = replace(base, **changes, **({"seed": seed} if multi else {}))
            ckpt = _variant_checkpoint(out_dir, name, seed if multi else None)
            earlier = finished.get(name) or (_finished_run(ckpt, recipe) if resume else None)
            if earlier:
                trained, tested = earlier
                trained_runs.append((name, recipe, trained, {**tested, **no_costs, "size_mb": float("nan")}, ckpt))
                print(f"[{name} seed {recipe.seed}] resumed: val rsum {trained['val']['rsum']:.1f}  "
                      f"{split} rsum {tested['rsum']:.1f}", flush=True)
                continue
            trained = train_student(data_root, ckpt, recipe, progress=False)
            module = load_checkpoint(ckpt).module
            test = CachedSplit.from_features(
                cached_image_features(data, recipe.image_variant, recipe.image_size, recipe.cached_blocks,
                                      recipe.skipped_blocks(), recipe.crop_views),
                caption_id_features(data, module), split)
            tested = cached_metrics(module, test)
            write_json(_run_record(ckpt), {
                "recipe": asdict(recipe),
                "trained": {"best_epoch": trained["best_epoch"], "val": {"rsum": trained["val"]["rsum"]},
                            "history": [{"seconds": h["seconds"]} for h in trained["history"]]},
                "result": {"rsum": tested["rsum"], "t2i": {"R@1": tested["t2i"]["R@1"]},
                           "i2t": {"R@1": tested["i2t"]["R@1"]}}})
            trained_runs.append((name, recipe, trained, {**tested, **no_costs, "size_mb": float("nan")}, ckpt))
            print(f"[{name} seed {recipe.seed}] val rsum {trained['val']['rsum']:.1f}  {split} rsum "
                  f"{tested['rsum']:.1f}", flush=True)
            rows, summary = table(trained_runs, pending)
            write_ablation(results, rows, header, summary)

    if multi:  # the best loss by mean val rsum, then its seed best on val (never test)
        means = {e["loss"]: e["val_rsum_mean"] for e in seed_summary(table(trained_runs, pending)[0])}
        best_loss = max(means, key=means.get)
        best_run = max((r for r in trained_runs if r[0] == best_loss), key=lambda r: r[2]["val"]["rsum"])
    else:
        best_run = max(trained_runs, key=lambda r: r[2]["val"]["rsum"])  # val, never test
    best_name, best_recipe, _, _, best_ckpt = best_run
    header.update(best_on_val=best_name, best_checkpoint=str(best_ckpt))
    if multi:
        header["best_seed"] = best_recipe.seed
    gallery = open_gallery(gallery_path).select(split)
    entries = measure_encoders([base.teacher, str(best_ckpt)], gallery)  # speeds timed together
    teacher, student = entries[base.teacher], entries[str(best_ckpt)]
    measured = {k: student[k] for k in ("params", "size_mb", "text_query_ms", "images_per_s")}
    keep = ("t2i", "i2t", "rsum", "params", "size_mb", "text_query_ms", "images_per_s")
    header.update(teacher={k: teacher[k] for k in keep}, best_full_pipeline={k: student[k] for k in keep})
    rows, summary = table(trained_runs, teacher, measured)
    write_ablation(results, rows, header, summary)
    best = next(r for r, run in zip(rows, trained_runs) if run is best_run)
    return {"rows": rows, "best": {**best, "checkpoint": str(best_ckpt)}, "teacher": teacher, "student": student}
