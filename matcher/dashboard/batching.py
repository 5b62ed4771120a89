"""Concurrent text queries share forward passes: single-text ``encode_texts`` calls that arrive while
the same encoder is busy are queued and encoded together in the next batch.

Why: on a small CPU a text tower's cost per query falls steeply with the batch, and under load many
visitors' queries wait for the same encoder anyway. The offline preset's three columns cost 25.9 ms
of CPU per query one at a time and 12.9 ms with 16 in flight (``python bench/load_test.py
--in-process 16`` on the shared 2-core VM, load average 8.6). There is no added wait when the server is idle: a query that finds the encoder
free is encoded at once, alone; the ones that arrive meanwhile form the next batch. The ``encode``
time a column shows is then the wall time of that query's encoding, waiting for the batch included.

``share_text_batches(matcher)`` wraps the encoders a matcher holds (``encoder``, ``rerank_encoder``,
and those of a ``base`` matcher) in one ``BatchedEncoder`` per encoder object, so matchers that
share an encoder (the student and the hashed student) share its batches too. Everything else an
encoder offers is passed through unchanged.
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import numpy as np

MAX_BATCH = 32


class _Pending:
    __slots__ = ("text", "done", "vector", "error", "lead")

    def __init__(self, text: str):
        self.text = text
        self.done = threading.Event()
        self.vector: np.ndarray | None = None
        self.error: BaseException | None = None
        self.lead = False


class BatchedEncoder:
    """An encoder whose single-text ``encode_texts`` calls are batched with concurrent ones."""

    def __init__(self, encoder, max_batch: int = MAX_BATCH):
        self._encoder = encoder
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._busy = False
        self.batches: list[int] = []   # sizes of the last batches run (for tests and benchmarks)

    @property
    def wrapped(self):
        return self._encoder

    def __getattr__(self, name):  # everything but encode_texts is the encoder's own
        return getattr(self._encoder, name)

    def encode_texts(self, texts: Sequence[str], *args, **kwargs) -> np.ndarray:
        if len(texts) != 1 or args or kwargs:
            return self._encoder.encode_texts(texts, *args, **kwargs)
        item = _Pending(texts[0])
        with self._lock:
            self._queue.append(item)
            lead = not self._busy
            self._busy = True
        if not lead:
            item.done.wait()
            if not item.lead:
                return self._result(item)
        self._run_batch()
        return self._result(item)

    @staticmethod
    def _result(item: _Pending) -> np.ndarray:
        if item.error is not None:
            raise item.error
        return item.vector[None]

    def _run_batch(self) -> None:
        """Encode what is queued (this caller's text first), then hand the lead to the next waiter."""
        with self._lock:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
        try:
            vectors = self._encoder.encode_texts([p.text for p in batch])
            for p, v in zip(batch, vectors):
                p.vector = v
        except BaseException as exc:  # every waiter gets the error its own call would have raised
            for p in batch:
                p.error = exc
        self.batches = (self.batches + [len(batch)])[-1000:]
        with self._lock:
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._busy = False
            else:
                nxt.lead = True
        for p in batch:
            p.done.set()
        if nxt is not None:
            nxt.done.set()


_shared: "weakref.WeakKeyDictionary[object, BatchedEncoder]" = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def batched(encoder) -> BatchedEncoder:
    """The one ``BatchedEncoder`` of an encoder object (created on first use)."""
    if isinstance(encoder, BatchedEncoder):
        return encoder
    with _shared_lock:
        try:
            wrapper = _shared.get(encoder)
        except TypeError:  # not weak-referenceable: wrap without sharing
            return BatchedEncoder(encoder)
        if wrapper is None:
            wrapper = _shared[encoder] = BatchedEncoder(encoder)
        return wrapper


def share_text_batches(matcher) -> None:
    """Replace the encoders a matcher holds by their shared ``BatchedEncoder``."""
    for owner in (matcher, getattr(matcher, "base", None)):
        if owner is None:
            continue
        for attr in ("encoder", "rerank_encoder"):
            encoder = getattr(owner, attr, None)
            if encoder is not None and callable(getattr(encoder, "encode_texts", None)):
                try:
                    setattr(owner, attr, batched(encoder))
                except AttributeError:  # a read-only property: leave that matcher unbatched
                    pass
