"""Past one process: shards that answer exactly what one index answers (in-process and on 2 local
Ray workers bound to loopback), Ray Data encoding equal to a plain loop, augmented views and the
view mixture. Ray tests skip when Ray is not installed (it is an optional extra)."""
import importlib.util
import ipaddress
import json

import numpy as np
import pytest
from PIL import Image

from matcher.hashing.codes import LSHHasher
from matcher.scale.shards import LocalShards, merge_topk, split_rows, write_shards
from matcher.scale.views import ViewMixture, augment, view_items, view_rng
from matcher.search.index import QuantizerStage, SignStage, TwoStageIndex
from tests.helpers import BUNDLED
from tests.search.test_hashing import synthetic, unit


def gallery(n=3000, seed=0):
    """Items and caption queries with a shared latent (a small gallery with real neighbourhoods)."""
    emb = synthetic(n, seed=seed)
    return emb, LSHHasher(emb.images, emb.captions, 32)


def single_index(emb, hasher):
    stage = SignStage(hasher)
    stage.add(emb.images)
    return TwoStageIndex(stage, emb.images.astype(np.float16))


def test_merge_topk_keeps_the_best_and_breaks_ties_by_id():
    parts = [(np.array([[0.9, 0.5, -np.inf]]), np.array([[10, 11, -1]])), (np.array([[0.9, 0.7]]), np.array([[3, 4]]))]
    scores, ids = merge_topk(parts, 3)
    assert ids.tolist() == [[3, 10, 4]] and np.allclose(scores, [[0.9, 0.9, 0.7]])
    _, ids = merge_topk(parts, 6)
    assert ids.tolist() == [[3, 10, 4, 11, -1]]                        # only five answers exist


def test_split_rows_covers_every_row_once():
    assert split_rows(10, 3) == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError):
        split_rows(2, 3)


def test_local_shards_return_the_single_index_top_k(tmp_path):
    emb, hasher = gallery()
    single = single_index(emb, hasher)
    shards = write_shards(tmp_path, lambda: SignStage(hasher), emb.images, emb.names, 3, batch=500)
    assert [off for _, off in shards] == [0, 1000, 2000]
    local = LocalShards(shards)
    q = emb.captions[:300]
    for c in (50, 200):
        ref_scores, ref = single.search(q, 10, c)
        scores, ids = local.search(q, 10, c)
        assert np.array_equal(ids, ref) and np.allclose(scores, ref_scores)
        one_round = local.search(q, 10, c, rounds=1)[1]     # each shard re-ranks its own top-C: never worse
        exact = np.argsort(-(q @ emb.images.T), axis=1)[:, :10]
        hits = lambda found: np.mean([len(set(f) & set(e)) for f, e in zip(found, exact)])  # noqa: E731
        assert hits(one_round) >= hits(ref)
    with pytest.raises(ValueError, match="rounds"):
        local.search(q, 10, 50, rounds=3)


@pytest.mark.parametrize("make", [lambda h: QuantizerStage("PQ8x4fs", 32), lambda h: SignStage(h, nlist=16, probe=0.25)])
def test_trained_stages_are_trained_once_so_shards_equal_one_index(tmp_path, make):
    emb, _ = gallery(2000)
    hasher = LSHHasher(emb.images, emb.captions, 64)   # 64 bits: few exact ties of code scores at the C-th place
    template = make(hasher)
    template.train(emb.images[np.linspace(0, 1999, 1000).astype(int)])
    single = template.empty_copy()
    single.add(emb.images)
    ref = TwoStageIndex(single, emb.images.astype(np.float16)).search(emb.captions[:200], 10, 100)[1]
    shards = write_shards(tmp_path, make_stage=lambda: make(hasher), vectors=emb.images, names=None, shards=2,
                          train_size=1000)                                  # trains its own template the same way
    assert np.array_equal(LocalShards(shards).search(emb.captions[:200], 10, 100)[1], ref)


def test_augmented_views_are_deterministic_and_differ_between_views():
    image = Image.open(sorted((BUNDLED / "images").iterdir())[0]).convert("RGB")
    a, b = augment(image, view_rng(0, 5, 1)), augment(image, view_rng(0, 5, 1))
    c = augment(image, view_rng(0, 5, 2))
    assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    photos, views = view_items(3, 2)
    assert photos.tolist() == [0, 0, 1, 1, 2, 2] and views.tolist() == [0, 1, 0, 1, 0, 1]


def test_view_mixture_samples_unit_vectors_around_the_photos():
    rng = np.random.default_rng(0)
    photos = unit(rng.standard_normal((50, 16)))
    owners = np.repeat(np.arange(50), 4)
    views = unit(photos[owners] + 0.05 * rng.standard_normal((200, 16)))
    mixture = ViewMixture.fit(photos, views, owners)
    x = mixture.sample(1000, seed=1)
    assert x.shape == (1000, 16) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    nearest = np.max(x @ photos.T, axis=1)
    assert np.median(nearest) > 0.9          # near-duplicates of real photos, not diffuse draws
    assert np.array_equal(x, mixture.sample(1000, seed=1))
    assert mixture.spread()["sample_norm_check"] == pytest.approx(1.0, abs=1e-3)


# --- Ray (optional extra) -------------------------------------------------------------------------

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is optional: pip install -r requirements-scale.txt")


@pytest.fixture(scope="module")
def local_ray():
    from matcher.scale.engine import start_ray, stop_ray

    ray = start_ray(num_cpus=2)   # loopback only, no dashboard, 2 CPUs
    yield ray
    stop_ray()


@needs_ray
def test_two_ray_workers_on_loopback_return_the_single_index_top_k(local_ray, tmp_path):
    from matcher.scale.engine import RayShards

    assert {node["NodeManagerAddress"] for node in local_ray.nodes()} == {"127.0.0.1"}
    psutil = pytest.importorskip("psutil")
    ray_pids = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
    listening = [ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections("inet")
                 if c.status == "LISTEN" and c.pid in ray_pids]
    assert listening and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in listening)  # loopback only
    emb, hasher = gallery()
    single = single_index(emb, hasher)
    shards = write_shards(tmp_path, lambda: SignStage(hasher), emb.images, emb.names, 2)
    engine = RayShards(shards)
    try:
        assert len({info["pid"] for info in engine.infos}) == 2          # two worker processes, one shard each
        q = emb.captions[:200]
        ref_scores, ref = single.search(q, 10, 100)
        scores, ids = engine.search(q, 10, 100)
        assert np.array_equal(ids, ref) and np.allclose(scores, ref_scores)
        assert np.array_equal(engine.search(q[:1], 5, 100)[1], ref[:1, :5])   # one query at a time too
    finally:
        engine.close()


@needs_ray
def test_ray_data_encoding_writes_shard_files_equal_to_a_plain_loop(local_ray, tmp_path):
    from matcher.data.images import load_rgb
    from matcher.registry import load_encoder
    from matcher.scale.encode import encode_on_ray, read_encoded
    from matcher.scale.views import encode_views

    rows = [json.loads(line) for line in (BUNDLED / "captions.jsonl").read_text().splitlines()[:4]]
    paths = [BUNDLED / "images" / r["image"] for r in rows]
    photos, views = np.repeat(np.arange(4), 2), np.tile([-1, 0], 4)
    files = encode_on_ray([paths[i] for i in photos], "open_clip:matcher-tiny-vit", tmp_path / "enc", workers=2,
                          batch=4, photos=photos, views=views, seed=0)
    assert files and all(f.suffix == ".parquet" for f in files)
    got = read_encoded(files)
    encoder = load_encoder("open_clip:matcher-tiny-vit")
    ref = np.concatenate([encoder.encode_images([load_rgb(paths[i])]) if v < 0
                          else encode_views(encoder.encode_images, [paths[i]], [i], [v], 0) for i, v in zip(photos, views)])
    assert got.shape == (8, ref.shape[1]) and np.allclose(got, ref, atol=1e-5)
