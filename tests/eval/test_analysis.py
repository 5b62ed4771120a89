"""Error analysis on hand-made embeddings: ranks, teacher-only / fast-only cases, overlap, displacement."""
import numpy as np
import pytest

from matcher.eval.analysis import ErrorAnalysis, analyse
from matcher.data.embed import GalleryEmbeddings
from matcher.data.gallery import Gallery
from matcher.search.exact import ExactMatcher
from matcher.search.protocol import Hit, Ranking, SearchOptions, SearchResult, rank_by_search


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


NAMES = ["a.jpg", "b.jpg", "c.jpg"]
IMAGES = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def embeddings(caption_vectors):
    texts = ["cap a", "cap b", "cap c"]
    return GalleryEmbeddings(NAMES, IMAGES, texts, np.array([0, 1, 2]), unit(caption_vectors))


def float_matcher(emb: GalleryEmbeddings) -> ExactMatcher:
    """An exact matcher over hand-made embeddings (no encoder: every query is a gallery caption)."""
    matcher = ExactMatcher.__new__(ExactMatcher)
    matcher.encoder, matcher.name, matcher.embeddings = None, "float", emb
    return matcher


def test_exact_rank_captions_ranks_and_topk():
    emb = embeddings([[1, 0.1, 0], [0.9, 0.5, 0], [0, 0, 1]])  # caption b is closer to image a
    r = float_matcher(emb).rank_captions(["cap a", "cap b", "cap c"], NAMES, k=2)
    assert r.gt_rank.tolist() == [0, 1, 0]
    assert r.topk[1] == ["a.jpg", "b.jpg"] and r.cap == 3


class ListMatcher:
    """A matcher known only by its answers: ranks come through ``search_text``."""

    name = "list"

    def __init__(self, answers):
        self.answers = answers

    def search_text(self, text, options):
        return SearchResult([Hit(0, n, 1.0) for n in self.answers[text][: options.k]], {})

    def rank_captions(self, texts, owners, k, options, progress=None):
        return rank_by_search(self, texts, owners, k, options, progress=progress)


def test_rank_by_search_censors_beyond_depth():
    m = ListMatcher({"cap a": ["b.jpg", "a.jpg"], "cap b": ["a.jpg", "c.jpg"]})
    r = rank_by_search(m, ["cap a", "cap b"], ["a.jpg", "b.jpg"], k=1, options=SearchOptions(), depth=2)
    assert r.gt_rank.tolist() == [1, 2] and r.cap == 2 and r.topk == [["b.jpg"], ["a.jpg"]]


def make_analysis():
    teacher = Ranking([["a.jpg", "b.jpg"], ["b.jpg", "a.jpg"], ["a.jpg", "b.jpg"]], np.array([0, 0, 5]), cap=10)
    fast = Ranking([["a.jpg", "c.jpg"], ["c.jpg", "a.jpg"], ["c.jpg", "a.jpg"]], np.array([0, 4, 1]), cap=10)
    return ErrorAnalysis(2, "teacher", ["cap a", "cap b", "cap c"], ["a.jpg", "b.jpg", "c.jpg"],
                         {"teacher": teacher, "student": fast})


def test_cases_summary_overlap_and_displacement():
    ea = make_analysis()
    assert ea.cases("student", "teacher-only")["caption"].tolist() == ["cap b"]
    assert ea.cases("student", "fast-only")["caption"].tolist() == ["cap c"]
    assert ea.per_query["overlap_student"].tolist() == [0.5, 0.5, 0.5]
    assert ea.per_query["displacement_student"].tolist() == [0.0, 4.0, -4.0]
    row = ea.summary().iloc[0]
    assert row["teacher only"] == 1 and row["matcher only"] == 1 and row["teacher R@2"] == pytest.approx(200 / 3, abs=0.01)
    assert ea.overlap_figure().data and ea.displacement_figure().data


def test_analyse_end_to_end_with_float_and_generic_matchers():
    gallery = Gallery(root=None, names=NAMES, captions={"a.jpg": ["cap a"], "b.jpg": ["cap b"], "c.jpg": ["cap c"]})
    teacher = float_matcher(embeddings([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    other = ListMatcher({"cap a": NAMES, "cap b": ["a.jpg", "c.jpg", "b.jpg"], "cap c": ["c.jpg"]})
    ea = analyse({"teacher": teacher, "hashed": other}, gallery, k=1)
    assert ea.per_query["rank_teacher"].tolist() == [0, 0, 0]
    assert ea.per_query["rank_hashed"].tolist() == [0, 2, 0]
    assert ea.cases("hashed")["caption"].tolist() == ["cap b"]
    with pytest.raises(ValueError, match="no captions"):
        analyse({"teacher": teacher}, Gallery(root=None, names=NAMES), k=1)
