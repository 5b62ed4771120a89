"""The student's tiny text tower and checkpoint: vocabulary pruning, PCA init, save/load round trip."""
import numpy as np
import pytest
import torch
from PIL import Image

from matcher.models.dual_encoder import DualEncoderModule, load_checkpoint, save_checkpoint
from matcher.models.student_towers import caption_vocabulary, init_from_minilm
from matcher.train.student import StudentRecipe, ablation_row, parse_variant
from tests.helpers import tiny_flickr8k

CAPTIONS = ["a dog runs through the grass .", "two dogs play in the snow", "a man rides a bike .",
            "a child in a red shirt jumps", "a dog jumps over a log"]


@pytest.fixture(scope="module")
def student():
    kept = caption_vocabulary(CAPTIONS, min_count=1)
    recipe = StudentRecipe(image_size=64, text_dim=32, text_layers=2, text_heads=2)
    torch.manual_seed(0)
    module = DualEncoderModule(recipe.model_config(len(kept)))
    info = init_from_minilm(module.text_tower, kept)
    return module, recipe.model_config(len(kept)), kept, info


def test_vocabulary_is_pruned_and_unseen_words_map_to_unk(student):
    module, _, kept, info = student
    tower = module.text_tower
    assert len(kept) < 60 and 0 < info["pca_variance_kept"] <= 1
    ids = tower.tokenize(["a dog", "zebra xylophone"])["input_ids"]
    compact = tower.forward_trunk(ids)
    unk_row = kept.index(tower.tokenizer.unk_token_id)
    dog = tower.tokenizer.convert_tokens_to_ids("dog")
    assert compact[0, 2] == kept.index(dog)
    assert (compact[1, 1:-1] == unk_row).all()  # every piece of the unseen words
    assert int(compact.max()) < len(kept)


def test_forward_top_accepts_cached_float_ids(student):
    module, _, _, _ = student
    tower = module.text_tower.eval()
    tok = tower.tokenize(CAPTIONS[:2])
    ids = tower.forward_trunk(tok["input_ids"])
    a = tower.forward_top(ids, tok["attention_mask"])
    b = tower.forward_top(ids.float().unsqueeze(-1), tok["attention_mask"])
    assert torch.allclose(a, b) and a.shape == (2, 32)
    # padding does not change a caption's embedding
    alone = tower(CAPTIONS[:1])
    assert torch.allclose(alone, tower(CAPTIONS[:2])[:1], atol=1e-5)


def test_checkpoint_round_trip_is_small_and_exact(student, tmp_path):
    module, config, _, _ = student
    with torch.no_grad():
        module.image_head[1].weight.normal_()
        module.text_head[1].weight.normal_()
    path = tmp_path / "student.pt"
    save_checkpoint(module, config, path)
    restored = load_checkpoint(path)
    module.eval()
    ref_txt = torch.nn.functional.normalize(module.text_embed(CAPTIONS), dim=-1).detach().numpy()
    assert np.allclose(restored.encode_texts(CAPTIONS), ref_txt, atol=2e-3)  # float16 storage
    images = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (64, 64), (10, 10, 240))]
    pixels = torch.stack([restored.preprocess(im) for im in images])
    ref_img = torch.nn.functional.normalize(module.image_embed(pixels), dim=-1).detach().numpy()
    assert np.allclose(restored.encode_images(images), ref_img, atol=2e-3)  # BN-folded encoder, same output
    assert torch.equal(restored.module.text_tower.embed.id_map, module.text_tower.embed.id_map)
    assert path.stat().st_size < 3e6


def test_fold_batchnorm_keeps_the_output_and_removes_every_bn():
    from matcher.models.towers import EfficientNetLiteTower

    torch.manual_seed(0)
    tower = EfficientNetLiteTower("efficientnet-lite0", 96, trainable_blocks=2).eval()
    with torch.no_grad():  # BN statistics unlike ImageNet's, so folding must really use them
        for m in tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.randn_like(m.running_mean) * 0.05)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = tower(x)
        after = tower.fold_batchnorm()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules())
    assert before.abs().max() > 0.1 and torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert tower.fold_batchnorm() is tower  # a second call changes nothing


def test_skipped_blocks_make_a_smaller_tower_that_round_trips(tmp_path):
    from matcher.models.towers import EfficientNetLiteTower

    with pytest.raises(ValueError, match=r"skip_blocks \[5\]: only residual blocks .* \[2, 4, 6, 7, 9, 10, 12, 13, 14\]"):
        EfficientNetLiteTower("efficientnet-lite0", 64, skip_blocks=[5])  # 40 -> 80 channels: cannot go
    full = EfficientNetLiteTower("efficientnet-lite0", 64)
    kept = caption_vocabulary(CAPTIONS, min_count=1)
    recipe = StudentRecipe(image_size=64, text_dim=32, text_layers=2, text_heads=2, skip_blocks="13,6,7",
                           cached_blocks=2, finetune_blocks=2)
    config = recipe.model_config(len(kept))
    assert config["image_tower"]["skip_blocks"] == [6, 7, 13]
    assert "skip_blocks" not in StudentRecipe(image_size=64).model_config(len(kept))["image_tower"]
    with pytest.raises(ValueError, match="comma-separated block numbers"):
        StudentRecipe(skip_blocks="6;7").model_config(len(kept))
    module = DualEncoderModule(config).eval()
    tower = module.image_tower
    assert len(tower.blocks) == len(full.blocks) - 3 and tower.split == len(tower.blocks) - 2
    assert sum(p.numel() for p in tower.parameters()) < sum(p.numel() for p in full.parameters())
    path = tmp_path / "slim.pt"
    save_checkpoint(module, config, path)
    restored = load_checkpoint(path)
    image = Image.new("RGB", (64, 64), (30, 160, 60))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(module.image_embed(restored.preprocess(image)[None]), dim=-1).numpy()
    assert len(restored.module.image_tower.blocks) == len(tower.blocks)
    assert np.allclose(restored.encode_images([image]), ref, atol=2e-3)


def test_parse_variant_and_ratios():
    assert parse_variant("wsd") == ("wsd", {"loss": "wsd"})
    assert parse_variant("mse+embed")[1] == {"loss": "mse", "embed_weight": 1.0}
    assert parse_variant("listnet:0")[1] == {"loss": "listnet", "contrastive_weight": 0.0}
    teacher = {"rsum": 300.0, "params": 28_000_000, "text_query_ms": 10.0, "images_per_s": 20.0}
    result = {"rsum": 285.0, "t2i": {"R@1": 20.0}, "i2t": {"R@1": 30.0}, "params": 5_000_000, "size_mb": 20.0,
              "text_query_ms": 1.0, "images_per_s": 120.0}
    trained = {"best_epoch": 3, "val": {"rsum": 290.0}, "history": [{"seconds": 10.0}]}
    row = ablation_row("wsd", StudentRecipe(), trained, result, teacher)
    assert row["rsum_vs_teacher"] == 0.95 and row["params_ratio"] == 5.6
    assert row["text_speedup"] == 10.0 and row["image_speedup"] == 6.0


def test_teacher_side_swaps_in_the_teacher_embeddings(tmp_path):
    from matcher.train.student import _with_teacher_side, train_student

    img, txt, t_img, t_txt = (torch.full((2, 4), float(v)) for v in range(4))
    assert _with_teacher_side("none", img, txt, t_img, t_txt) == (img, txt)
    assert _with_teacher_side("text", img, txt, t_img, t_txt) == (img, t_txt)
    assert _with_teacher_side("image", img, txt, t_img, t_txt) == (t_img, txt)
    with pytest.raises(ValueError, match="teacher_side must be none, text or image"):
        train_student(tmp_path / "no-data", tmp_path / "s.pt", StudentRecipe(teacher_side="both"))


def test_resumed_ablation_rebuilds_the_same_rows(tmp_path):
    from dataclasses import asdict

    from matcher.train.student import _finished_variants, _variant_checkpoint, write_ablation

    base = StudentRecipe(epochs=2)
    teacher = {"rsum": 300.0, "params": 28_000_000, "text_query_ms": 10.0, "images_per_s": 20.0}
    result = {"rsum": 285.0, "t2i": {"R@1": 20.0}, "i2t": {"R@1": 30.0}, "params": 5_000_000, "size_mb": 20.0,
              "text_query_ms": 1.0, "images_per_s": 120.0}
    trained = {"best_epoch": 2, "val": {"rsum": 290.0}, "history": [{"seconds": 7.0}, {"seconds": 5.0}]}
    rows = [ablation_row(name, base, trained, result, teacher) for name in ("wsd", "mse+embed")]
    results = tmp_path / "ablation.json"
    write_ablation(results, rows, {"recipe": asdict(base)})
    _variant_checkpoint(tmp_path, "wsd").write_bytes(b"")  # mse+embed's checkpoint is gone: retrain it
    done = _finished_variants(results, base, tmp_path)
    assert set(done) == {"wsd"}
    again_trained, again_result = done["wsd"]
    again = ablation_row("wsd", base, again_trained, {**again_result, **{k: result[k] for k in
                         ("params", "size_mb", "text_query_ms", "images_per_s")}}, teacher)
    assert again == rows[0]
    assert _finished_variants(results, StudentRecipe(epochs=3), tmp_path) == {}  # another budget: nothing reused
    older = {k: v for k, v in asdict(base).items() if k != "skip_blocks"}  # a run from before that field existed
    write_ablation(results, rows, {"recipe": older})
    assert set(_finished_variants(results, base, tmp_path)) == {"wsd"}
    assert _finished_variants(results, StudentRecipe(epochs=2, skip_blocks="6"), tmp_path) == {}


@pytest.mark.slow
def test_bundled_student_is_registered_small_and_retrieves(small_gallery, tmp_path):
    from matcher.data.cache import ArrayCache
    from matcher.data.embed import embed_gallery
    from matcher.eval.costs import evaluate_embeddings
    from matcher.data.gallery import open_gallery
    from matcher.presets import PRESETS
    from matcher.registry import cached_encoder

    assert PRESETS["offline"]["student"] == "offline-student"
    student, teacher = cached_encoder("offline-student"), cached_encoder("offline-teacher")
    assert student.num_params() * 5 <= teacher.num_params()
    metrics = evaluate_embeddings(embed_gallery(student, open_gallery(small_gallery), cache=ArrayCache(tmp_path)))
    # 12 images: chance t2i R@1 is 8%; the committed student measured 88 / 92 here (teacher 85 / 83).
    assert metrics["t2i"]["R@1"] >= 40 and metrics["i2t"]["R@1"] >= 50


def test_crop_views_are_seeded_and_cached_next_to_the_photo_and_its_mirror(tmp_path):
    from matcher.models.towers import EfficientNetLiteTower, image_transform
    from matcher.train.features import crop_boxes, image_trunk_features

    boxes = crop_boxes(50, 3, seed=0)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert boxes.shape == (50, 3, 4) and boxes.min() >= 0 and boxes.max() <= 1
    assert area.min() >= 0.5 and np.array_equal(boxes, crop_boxes(50, 3, seed=0))  # teacher and student agree
    assert not np.array_equal(boxes, crop_boxes(50, 3, seed=1))

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(paths[-1])
    tower = EfficientNetLiteTower("efficientnet-lite0", 64, trainable_blocks=16).eval()  # trunk = stem only
    feats = image_trunk_features(tower, paths, flip=True, crops=crop_boxes(2, 2, seed=0))
    assert feats.shape[:2] == (2, 4)  # photo, mirror, 2 crops
    box = crop_boxes(2, 2, seed=0)[1, 1]  # second photo, second crop: mirrored
    photo = Image.open(paths[1])
    w, h = photo.size
    crop = photo.convert("RGB").crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    with torch.no_grad():
        expected = tower.forward_trunk(image_transform(64)(crop)[None].flip(-1)).numpy()
    np.testing.assert_allclose(feats[1, 3], expected[0], atol=2e-2)  # float16 cache
    assert not np.allclose(feats[1, 3], feats[1, 0], atol=2e-2)


def test_best_on_val_keeps_the_earliest_best_weights_and_restores_them():
    from matcher.train.selection import BestOnVal

    layer = torch.nn.Linear(1, 1, bias=False)
    best = BestOnVal(layer)
    with pytest.raises(RuntimeError, match="no validation entry"):
        best.restore()
    for epoch, (weight, rsum) in enumerate([(1.0, 10.0), (2.0, 30.0), (3.0, 30.0), (4.0, 20.0)], 1):
        layer.weight.data.fill_(weight)
        best.record({"epoch": epoch, "val_rsum": rsum})
    assert [h["epoch"] for h in best.history] == [1, 2, 3, 4]
    assert best.restore()["epoch"] == 2 and layer.weight.item() == 2.0


def test_teacher_phases_record_every_val_check_and_restore_the_best():
    """The teacher's two training phases on tiny random cached features: plumbing of BestOnVal."""
    import numpy as np

    from matcher.train.pairs import CachedSplit
    from matcher.train.selection import BestOnVal
    from matcher.train.teacher import TeacherRecipe, _training_module, cached_metrics, finetune, probe_heads

    torch.manual_seed(0)
    recipe = TeacherRecipe(image_variant="efficientnet-lite0", image_size=64, cached_blocks=1, finetune_blocks=1,
                           cached_layers=1, finetune_layers=1, probe_epochs=3, epochs=2, batch_size=8, embed_dim=16)
    module = _training_module(recipe)
    trunk = module.image_tower.forward_trunk(torch.zeros(1, 3, 64, 64))
    rng = np.random.default_rng(0)

    def split(n: int) -> CachedSplit:
        images = rng.standard_normal((n, 2, *trunk.shape[1:])).astype(np.float16)
        lengths = rng.integers(3, 7, 5 * n)
        tokens = rng.standard_normal((int(lengths.sum()), 384)).astype(np.float16)
        return CachedSplit(images, tokens, np.concatenate([[0], np.cumsum(lengths)]))

    train, val = split(16), split(8)
    best = BestOnVal(module)
    probe_heads(module, train, val, recipe, rng, best)
    finetune(module, train, val, recipe, rng, best)
    assert [h["phase"] for h in best.history] == ["probe", "finetune", "finetune"]
    chosen = best.restore()
    assert chosen["val_rsum"] == max(h["val_rsum"] for h in best.history)
    assert cached_metrics(module, val)["rsum"] == pytest.approx(chosen["val_rsum"])


def test_train_student_end_to_end_on_a_tiny_flickr8k(tmp_path, monkeypatch):
    """The whole train-student path on 16/8/4 photos: caches (crops included), teacher targets,
    distillation epochs, best-on-val selection and a checkpoint that loads and retrieves."""
    from dataclasses import asdict

    from matcher.models.dual_encoder import load_checkpoint
    from matcher.train.student import StudentRecipe, train_student

    monkeypatch.setenv("MATCHER_CACHE_DIR", str(tmp_path / "cache"))
    data = tiny_flickr8k(tmp_path / "flickr", {"train": 16, "val": 8, "test": 4})
    recipe = StudentRecipe(loss="listnet", embed_weight=1.0, image_size=64, crop_views=2, cached_blocks=2,
                           finetune_blocks=2, epochs=3, batch_size=8, lr=3e-3, vocab_min_count=1)
    result = train_student(data, tmp_path / "student.pt", recipe, progress=False)
    assert result["recipe"] == asdict(recipe)  # the full resolved recipe, recorded with the checkpoint
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert result["best_epoch"] == max(history, key=lambda h: h["val_rsum"])["epoch"]
    assert history[-1]["loss"]["total"] < history[0]["loss"]["total"]
    encoder = load_checkpoint(tmp_path / "student.pt")
    assert encoder.num_params() < 5_000_000
    emb = encoder.encode_texts(["a dog runs on the grass", "two people"])
    assert emb.shape == (2, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
