"""Connection and session ids on every log record, from the socket down to the mesh worker.

The transport binds ids with :func:`bind_log_context`; they live in a :mod:`contextvars`
variable, which asyncio copies into every task a connection starts, and which the mesh backend
carries into its worker threads (:func:`run_in_context`). :class:`LogContextFilter` (installed
on the CLI's handler) puts them on each record as ``record.log_context`` (``conn=… session=…``).
"""

import contextvars
import logging
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "farmesh_log_context", default=()
)


def bind_log_context(**ids: str) -> None:
    """Add ids (e.g. ``conn``, ``session``) to the current context's log records."""
    _context.set(tuple({**dict(_context.get()), **ids}.items()))


def log_context() -> dict[str, str]:
    """The ids bound in the current context."""
    return dict(_context.get())


def run_in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` wrapped to run in a copy of the caller's context (for worker threads)."""
    context = contextvars.copy_context()

    def run(*args: Any) -> T:
        return context.run(fn, *args)

    return run


class LogContextFilter(logging.Filter):
    """Sets ``record.log_context`` to ``"conn=… session=… "`` (empty outside a connection)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.log_context = "".join(f"{name}={value} " for name, value in _context.get())
        return True
