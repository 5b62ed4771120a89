"""``tops-alignment`` served as the fine column (``offline-tops``): its own tops on the photo's trunk
output and on the query's lower-layer states, re-ranking the teacher's shortlist.

Oracle: a ``TopsAlignment`` built as training starts it, with the special tokens kept, is exactly
the alignment scorer on the teacher's own final features; served, the two must rank and score alike.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from matcher.data.cache import ArrayCache
from tests.helpers import make_gallery

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from matcher.data.gallery import open_gallery

    return open_gallery(make_gallery(tmp_path_factory.mktemp("tops") / "gallery", 12))


@pytest.fixture(scope="module")
def base(gallery):
    from matcher.registry import cached_encoder
    from matcher.search.exact import ExactMatcher

    return ExactMatcher(cached_encoder("offline-teacher"), gallery)


def _served(base, scorer, tmp_path, fuse=None, candidates=8):
    from matcher.search.fine import FineRerankMatcher

    return FineRerankMatcher(base, scorer, fuse, candidates, cache=ArrayCache(tmp_path / "arrays"), name="tops")


def _captions(gallery, n=6):
    return [gallery.captions[name][0] for name in gallery.names[:n]]


def test_untrained_tops_with_special_tokens_serve_exactly_the_alignment_scorer(base, gallery, tmp_path):
    from matcher.finegrained.checkpoints import teacher_heads
    from matcher.finegrained.scorers import AlignmentScorer
    from matcher.finegrained.tops import TopsAlignment
    from matcher.search.protocol import SearchOptions

    module = base.encoder.module
    image_head, text_head, _ = teacher_heads(module)
    tops = _served(base, TopsAlignment(module, "sum", 0.0, drop_special=False).eval(), tmp_path / "a", fuse=0.25)
    plain = _served(base, AlignmentScorer(image_head, text_head, "sum", 0.0).eval(), tmp_path / "b", fuse=0.25)
    assert tops.kind == "tops-alignment" and plain.kind == "alignment"
    assert tuple(tops.regions.shape) == tuple(plain.regions.shape) == (12, 49, 256)
    for text in _captions(gallery):
        a, b = tops.search_text(text, SearchOptions(k=8)).hits, plain.search_text(text, SearchOptions(k=8)).hits
        assert [h.name for h in a] == [h.name for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=2e-3)


def test_served_scores_equal_the_models_own_pairs_without_special_tokens(base, gallery, tmp_path):
    from matcher.data.images import load_rgb
    from matcher.finegrained.tops import TopsAlignment
    from matcher.search.protocol import SearchOptions

    module = base.encoder.module
    torch.manual_seed(0)
    model = TopsAlignment(module, "sum", 0.0, drop_special=True).eval()
    with torch.no_grad():  # moved away from the teacher's tops, as training would
        for p in model.text_layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    served = _served(base, model, tmp_path, fuse=None)
    text = _captions(gallery)[3]
    hits = served.search_text(text, SearchOptions(k=8)).hits
    rows = [h.row for h in hits]
    tower = module.text_tower
    tok = tower.tokenize([text])
    pixels = torch.stack([base.encoder.preprocess(load_rgb(gallery.path(base.embeddings.names[r]))) for r in rows])
    with torch.inference_mode():
        words, keep = model.encode_text(tower.forward_trunk(tok["input_ids"], tok["attention_mask"]),
                                        tok["attention_mask"])
        assert int(keep.sum()) == int(tok["attention_mask"].sum()) - 2   # no [CLS], no [SEP]
        images = model.encode_image(module.image_tower.forward_trunk(pixels))
        own = model.score_pairs(images, words.expand(len(rows), -1, -1), keep.expand(len(rows), -1)).numpy()
    assert np.allclose([h.score for h in hits], own, rtol=1e-3, atol=2e-2)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # image queries have no words: the teacher answers them
    name = gallery.names[1]
    assert [h.name for h in served.more_like(name).hits] == [h.name for h in base.more_like(name).hits]


def test_a_tops_checkpoint_loads_through_the_fine_column_and_a_foreign_kind_is_refused(base, tmp_path):
    from matcher.finegrained.checkpoints import save_cross
    from matcher.finegrained.tops import TopsAlignment, save_tops
    from matcher.search.fine import CheckpointProblem, load_rerank_scorer

    module = base.encoder.module
    model = TopsAlignment(module, "sum", 0.1, True).eval()
    save_tops(tmp_path / "tops.pt", model, {"reduce": "sum", "dropout": 0.1, "drop_special": True}, {})
    loaded = load_rerank_scorer(tmp_path / "tops.pt", module)
    assert isinstance(loaded, TopsAlignment) and not loaded.training
    save_cross(tmp_path / "other.pt", "some-new-kind", torch.nn.Linear(2, 2), {}, {})
    with pytest.raises(CheckpointProblem, match="tops-alignment"):
        load_rerank_scorer(tmp_path / "other.pt", module)


def test_the_registered_config_serves_the_shipped_checkpoint_in_the_fine_preset(gallery):
    from matcher.presets import PRESETS
    from matcher.registry import open_matcher, registered_models
    from matcher.search.protocol import SearchOptions

    config = registered_models()["offline-tops"]
    assert config["scorer"] == "assets/models/fine/tops-alignment.pt" and config["base"] == "offline-teacher"
    assert PRESETS["offline+fine"]["fine"] == "offline-tops"
    served = open_matcher("offline-tops", gallery)
    assert served.kind == "tops-alignment" and served.candidates == config["candidates"]
    text = _captions(gallery)[0]
    shortlist = {h.name for h in served.base.search_text(text, SearchOptions(k=served.candidates)).hits}
    hits = served.search_text(text, SearchOptions(k=5)).hits
    assert {h.name for h in hits} <= shortlist and len(hits) == 5
