"""Heavy work (indexing a gallery, re-running the evaluation, the error analysis) on one
low-priority thread of its own, one task at a time.

Searches are short and many; a heavy task is minutes of CPU. Running heavy tasks on a dedicated
thread with a raised nice value (Linux schedules threads separately, so only this thread is
lowered) lets the scheduler give the cores to searches first whenever both want them, and one
task at a time bounds what visitors can start. The caller waits for the result (its context, e.g.
Gradio's progress tracking, travels with the task).
"""
from __future__ import annotations

import contextvars
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
NICE = 10


class HeavyRunner:
    def __init__(self, nice: int = NICE):
        self.nice = nice
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matcher-heavy",
                                        initializer=self._lower_priority)
        self.niced: bool | None = None

    def _lower_priority(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)  # this thread only (Linux)
            self.niced = True
        except (AttributeError, OSError) as exc:
            self.niced = False
            log.info("heavy tasks run at normal priority (%s)", exc)

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        ctx = contextvars.copy_context()
        return self._pool.submit(ctx.run, fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` on the heavy thread and wait for it (exceptions propagate)."""
        return self.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
