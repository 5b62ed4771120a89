import numpy as np
import pytest

from matcher.eval.metrics import i2t_ranks, retrieval_metrics, t2i_ranks


def test_perfect_similarity_gives_full_recall():
    caption_image = np.repeat(np.arange(4), 2)               # 4 images, 2 captions each
    sim = np.eye(4)[caption_image]                            # each caption matches only its image
    m = retrieval_metrics(sim, caption_image)
    assert m["t2i"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert m["i2t"]["R@1"] == 100.0
    assert m["rsum"] == pytest.approx(600.0)


def test_hand_made_ranks():
    # 3 images; captions 0,1 -> image 0; 2 -> image 1; 3 -> image 2
    caption_image = np.array([0, 0, 1, 2])
    sim = np.array([
        [0.9, 0.1, 0.0],   # rank 0
        [0.2, 0.5, 0.1],   # own image second -> rank 1
        [0.3, 0.2, 0.1],   # own image (1) is second -> rank 1
        [0.5, 0.4, 0.3],   # own image (2) is third -> rank 2
    ])
    assert t2i_ranks(sim, caption_image).tolist() == [0, 1, 1, 2]
    # image 0: best caption 0 (0.9 is top of column) -> 0; image 1: column [.1,.5,.2,.4] caption 2 (.2) rank 2;
    # image 2: column [0,.1,.1,.3] caption 3 is top -> 0
    assert i2t_ranks(sim, caption_image).tolist() == [0, 2, 0]
    m = retrieval_metrics(sim, caption_image)
    assert m["t2i"]["R@1"] == pytest.approx(25.0)
    assert m["i2t"]["R@1"] == pytest.approx(200 / 3)
    assert m["i2t"]["R@5"] == 100.0


def test_duplicate_caption_counts_only_for_its_own_image():
    # The same caption string describes images 0 and 1, so both captions get identical scores.
    # Image 0 wins the tie-free ordering; the copy owned by image 1 must be a miss at R@1.
    caption_image = np.array([0, 1])
    sim = np.array([[0.8, 0.6], [0.8, 0.6]])
    ranks = t2i_ranks(sim, caption_image)
    assert ranks.tolist() == [0, 1]
    assert retrieval_metrics(sim, caption_image)["t2i"]["R@1"] == 50.0


def test_images_without_captions_are_not_i2t_queries():
    caption_image = np.array([0, 0])
    sim = np.array([[0.9, 0.95], [0.9, 0.1]])  # image 1 has no captions
    m = retrieval_metrics(sim, caption_image)
    assert m["i2t"]["R@1"] == 100.0  # only image 0 is a query


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))
