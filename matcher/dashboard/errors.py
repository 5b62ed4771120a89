"""Unexpected exceptions: logged in full with a short id, shown to the visitor as one plain sentence.

Expected failures (a refused query, an unusable upload) carry their own message; anything else
is a bug or an environment problem whose text (paths, library internals) is no business of a
visitor's. The id in the message finds the traceback in the server log.
"""
from __future__ import annotations

import logging
import uuid

log = logging.getLogger("matcher.app")


def report_unexpected(exc: BaseException, where: str = "request") -> str:
    """Log ``exc`` with its traceback under a new id; return the message to show instead."""
    error_id = uuid.uuid4().hex[:10]
    log.error("unexpected error %s in %s: %s: %s", error_id, where, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return (f"Something went wrong on the server (error id {error_id}). It has been logged; "
            "please try again, or try another query.")
