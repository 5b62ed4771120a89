"""Concurrent single-text queries share one forward pass per encoder; nothing else changes."""
import threading
import time

import numpy as np
import pytest

from matcher.dashboard.batching import BatchedEncoder, batched, share_text_batches


class SlowEncoder:
    """Encodes text i as [len(text), i-th call]; each call takes 30 ms (a forward pass)."""

    name = "slow"

    def __init__(self):
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def encode_texts(self, texts, batch_size=256, progress=False):
        with self.lock:
            self.calls.append(list(texts))
        time.sleep(0.03)
        if any(t == "boom" for t in texts):
            raise RuntimeError("encoder failed")
        return np.array([[len(t), len(self.calls)] for t in texts], np.float32)

    def fingerprint(self):
        return "slow-1"


def test_concurrent_queries_are_encoded_together_and_each_gets_its_own_vector():
    encoder = SlowEncoder()
    shared = BatchedEncoder(encoder)
    texts = [f"query {'x' * i}" for i in range(12)]
    results: dict[str, np.ndarray] = {}

    def ask(text):
        results[text] = shared.encode_texts([text])

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t for call in encoder.calls for t in call) == sorted(texts)   # every text encoded once
    assert len(encoder.calls) < len(texts) and max(shared.batches) > 1         # ... in fewer, larger batches
    for text, vector in results.items():
        assert vector.shape == (1, 2) and vector[0, 0] == len(text)             # its own row


def test_alone_a_query_is_encoded_at_once_and_batches_pass_through():
    encoder = SlowEncoder()
    shared = BatchedEncoder(encoder)
    started = time.perf_counter()
    assert shared.encode_texts(["a dog"])[0, 0] == 5
    assert time.perf_counter() - started < 0.2 and shared.batches == [1]
    assert shared.encode_texts(["a", "bb"]).shape == (2, 2) and encoder.calls[-1] == ["a", "bb"]
    assert shared.fingerprint() == "slow-1" and shared.name == "slow"          # the rest is the encoder's own


def test_an_error_reaches_every_query_of_its_batch_and_the_next_batch_still_runs():
    encoder, gate = SlowEncoder(), threading.Event()
    plain = encoder.encode_texts
    encoder.encode_texts = lambda texts, *a, **k: (gate.wait(10), plain(texts))[1]
    shared = BatchedEncoder(encoder)
    errors, oks = [], []

    def ask(text):
        try:
            oks.append(shared.encode_texts([text]))
        except RuntimeError as exc:
            errors.append(str(exc))

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    rest = [threading.Thread(target=ask, args=(t,)) for t in ("boom", "fine")]
    for t in rest:                 # "first" is held in the encoder; these two queue up as the next batch
        t.start()
    deadline = time.time() + 10
    while len(shared._queue) < 2 and time.time() < deadline:
        time.sleep(0.005)
    gate.set()
    for t in [first] + rest:
        t.join()
    assert errors == ["encoder failed", "encoder failed"] and len(oks) == 1
    assert shared.encode_texts(["after"])[0, 0] == 5


def test_matchers_sharing_an_encoder_share_its_batches():
    class Matcher:
        def __init__(self, encoder, rerank=None):
            self.encoder, self.rerank_encoder = encoder, rerank

    encoder, other = SlowEncoder(), SlowEncoder()
    student, hashed = Matcher(encoder), Matcher(encoder, other)
    share_text_batches(student)
    share_text_batches(hashed)
    assert isinstance(student.encoder, BatchedEncoder) and student.encoder is hashed.encoder is batched(encoder)
    assert hashed.rerank_encoder is batched(other) and hashed.rerank_encoder.wrapped is other
    share_text_batches(student)   # idempotent
    assert student.encoder.wrapped is encoder


def test_real_matchers_answer_the_same_with_and_without_batching(small_gallery):
    from matcher.dashboard.matchers import MatcherSet
    from matcher.data.gallery import open_gallery
    from matcher.search.protocol import SearchOptions

    gallery = open_gallery(small_gallery)
    plain = MatcherSet({"teacher": "open_clip:matcher-tiny-vit"}, gallery, batch_texts=False)
    shared = MatcherSet({"teacher": "open_clip:matcher-tiny-vit"}, gallery)
    captions = [gallery.captions[n][0] for n in gallery.names[:6]]
    expected = {c: [h.name for h in plain.search_text(c, SearchOptions(k=5))[0].hits] for c in captions}
    shared.warm()   # opened first: a query during the opening gets "still loading" (MatcherSet.matcher)
    got = {}

    def ask(caption):
        got[caption] = [h.name for h in shared.search_text(caption, SearchOptions(k=5))[0].hits]

    threads = [threading.Thread(target=ask, args=(c,)) for c in captions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert isinstance(shared.matcher("teacher").encoder, BatchedEncoder)
