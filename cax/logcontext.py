"""Site, task and run on every log record, without passing them through every call."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

_context: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("cax_log", default=())


@contextmanager
def log_context(*parts: str) -> Iterator[None]:
    """Prefix log records made inside the block with ``parts`` (e.g. task name, run label)."""
    token = _context.set(_context.get() + tuple(p for p in parts if p))
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``record.ctx``: the active context as ``[a b c] `` (empty outside any context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        parts = _context.get()
        record.ctx = f"[{' '.join(parts)}] " if parts else ""
        return True
