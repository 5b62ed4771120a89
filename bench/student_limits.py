"""What limits the student's image side: how much it loses to its input resolution, and what each size costs.

For EfficientNet-Lite0 at several input sizes (frozen ImageNet weights, pooled 1280-d features)
this trains only a linear head into the *teacher's* 256-d space, paired with the teacher's own
caption embeddings (contrastive + listnet on the teacher's matrix + cosine to the teacher's image
embedding), and reports val rsum. Because the text side is the teacher's, the number isolates the
image tower: it is the accuracy a student with that image input could reach without fine-tuning.
Next to it, the tower's throughput (batch 8, channels-last, no preprocessing) and the teacher's.

    python bench/student_limits.py [--sizes 112,128,144,160] [--json assets/results/student-limits.json] [--merge]
    python bench/student_limits.py --sizes 112 --skips 2,4,6,7,9,10,12,13,14,6.9.12.14,6.9.12.13.14 --merge

``--skips`` adds rows for the same frozen tower with residual blocks left out (one config per
comma-separated item, blocks joined by dots): what each block is worth, next to what it costs.

Needs the teacher's targets cache (built by ``train-student``) and the Flickr8k folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from matcher.atomic import write_json  # noqa: E402
from matcher.cli.common import DEFAULT_DATA  # noqa: E402
from matcher.eval.costs import machine_description  # noqa: E402
from matcher.train.losses import ContrastiveLoss, ListNetLoss  # noqa: E402
from matcher.eval.metrics import retrieval_metrics  # noqa: E402
from matcher.models.towers import EfficientNetLiteTower, image_transform  # noqa: E402
from matcher.train.features import Flickr8k  # noqa: E402
from matcher.train.student import DEFAULT_TEACHER, teacher_targets  # noqa: E402


def pooled_features(data: Flickr8k, size: int, skip: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Frozen Lite0 pooled features: train [N, 2 views, 1280] (original + flip), val [N, 1280]."""
    tower = EfficientNetLiteTower("efficientnet-lite0", size, 0, skip).eval().to(memory_format=torch.channels_last)
    transform = image_transform(size)
    out = {}
    with torch.inference_mode():
        for split in ("train", "val"):
            idx, chunks = data.indices(split), []
            for start in tqdm(range(0, len(idx), 50), desc=f"lite0@{size} {split}", leave=False):
                x = torch.stack([transform(Image.open(data.root / "images" / data.images[i]))
                                 for i in idx[start:start + 50]]).contiguous(memory_format=torch.channels_last)
                views = [tower(x), tower(x.flip(-1))] if split == "train" else [tower(x)]
                chunks.append(torch.stack(views, 1))
            out[split] = torch.cat(chunks)
    out["val"] = out["val"][:, 0]
    return out


def probe(features: dict[str, torch.Tensor], targets: dict[str, np.ndarray], epochs: int = 30, seed: int = 0) -> dict:
    """Linear head into the teacher's space; val recall against the teacher's caption embeddings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t_img = torch.from_numpy(targets["train_images"].astype(np.float32))
    t_txt = torch.from_numpy(targets["train_texts"].astype(np.float32))
    t_scale = float(targets["logit_scale"])
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(1280, 256))
    log_scale = torch.nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.AdamW([*head.parameters(), log_scale], lr=1e-3, weight_decay=0.05)
    n, batch = len(features["train"]), 256
    steps = epochs * 5 * (n // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps)
    contrastive, listnet = ContrastiveLoss(), ListNetLoss()  # the student's own losses (matcher.train.losses)
    head.train()
    for _ in range(epochs * 5):  # 5 passes per epoch, a fresh random caption each
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            rows = order[start:start + batch]
            views, captions = rng.integers(0, 2, batch), rows * 5 + rng.integers(0, 5, batch)
            img = F.normalize(head(features["train"][rows, views]), dim=-1)
            txt, teacher_img = t_txt[captions], t_img[rows, views]
            logits, teacher_logits = log_scale.exp() * img @ txt.T, t_scale * teacher_img @ txt.T
            loss = contrastive(logits) + listnet(logits, teacher_logits) + (1 - (img * teacher_img).sum(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        img = F.normalize(head(features["val"]), dim=-1)
    sim = torch.from_numpy(targets["val_texts"].astype(np.float32)) @ img.T
    return retrieval_metrics(sim.numpy(), np.repeat(np.arange(len(img)), 5))


def tower_rates(towers: dict[str, tuple[str, int, tuple[int, ...]]], rounds: int = 5) -> dict[str, float]:
    """Images/s of each tower alone (batch 8, channels-last, inference): median of ``rounds``, rounds
    interleaved over all towers so that their ratios are measured under the same load."""
    built, inputs = {}, {}
    for label, (variant, size, skip) in towers.items():
        built[label] = EfficientNetLiteTower(variant, size, 0, skip).eval().to(memory_format=torch.channels_last)
        inputs[label] = torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last)
    rates: dict[str, list[float]] = {label: [] for label in towers}
    with torch.inference_mode():
        for label, tower in built.items():
            for _ in range(3):
                tower(inputs[label])
        for _ in range(rounds):
            for label, tower in built.items():
                started = time.perf_counter()
                for _ in range(8):
                    tower(inputs[label])
                rates[label].append(64 / (time.perf_counter() - started))
    return {label: float(np.median(r)) for label, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sizes", default="112,128,144,160")
    parser.add_argument("--json", default="assets/results/student-limits.json")
    parser.add_argument("--skips", default="", help="residual blocks to leave out, one config per item: 9,12,9.10")
    parser.add_argument("--merge", action="store_true", help="keep rows of other configurations already in --json")
    args = parser.parse_args()
    data = Flickr8k.load(args.data)
    targets = teacher_targets(data, DEFAULT_TEACHER)
    teacher_val = retrieval_metrics(targets["val_texts"].astype(np.float32) @ targets["val_images"][:, 0].astype(np.float32).T,
                                    np.repeat(np.arange(len(targets["val_images"])), 5))
    rows, towers = [], {"teacher": ("efficientnet-lite2", 224, ())}
    skips = [()] + [tuple(int(b) for b in item.split(".")) for item in args.skips.split(",") if item.strip()]
    for size, skip in [(int(s), skip) for s in args.sizes.split(",") if s.strip() for skip in skips]:
        metrics = probe(pooled_features(data, size, skip), targets)
        label = f"efficientnet-lite0@{size}" + (f" skip {','.join(map(str, skip))}" if skip else "")
        towers[label] = ("efficientnet-lite0", size, skip)
        rows.append({"image_tower": label, "val_rsum": round(metrics["rsum"], 1),
                     "t2i_R@1": round(metrics["t2i"]["R@1"], 1), "i2t_R@1": round(metrics["i2t"]["R@1"], 1)})
        print(rows[-1], flush=True)
    rates = tower_rates(towers)  # after the probes, all towers interleaved
    teacher_rate = rates["teacher"]
    for row in rows:
        rate = rates[row["image_tower"]]
        row.update(images_per_s=round(rate, 1), speedup_vs_teacher_tower=round(rate / teacher_rate, 2))
    command = "python bench/student_limits.py " + " ".join(sys.argv[1:])
    for row in rows:
        row.update(command=command, threads=torch.get_num_threads())
    if args.merge and Path(args.json).exists():  # keep the other configurations' rows from earlier runs
        measured = {row["image_tower"] for row in rows}
        rows = [r for r in json.loads(Path(args.json).read_text())["records"] if r["image_tower"] not in measured] + rows
        rows.sort(key=lambda r: (int(r["image_tower"].split("@", 1)[1].split()[0]), len(r["image_tower"]), r["image_tower"]))
    write_json(args.json, {
        "command": command,
        "machine": machine_description(),
        "note": "frozen Lite0 + linear head into the teacher's space, val recall against the teacher's captions; "
                "throughput = tower only, batch 8, channels-last, rounds interleaved with the teacher's tower "
                "(rows merged from earlier runs keep that run's timing)",
        "teacher": {"image_tower": "efficientnet-lite2@224 (fine-tuned)", "val_rsum": round(teacher_val["rsum"], 1),
                    "images_per_s": round(teacher_rate, 1)},
        "records": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
