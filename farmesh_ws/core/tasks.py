"""Background tasks of long-lived components (heartbeats, refresh loops)."""

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: "asyncio.Task[Any] | None") -> None:
    """Cancel ``task`` (None: nothing) and wait until it has stopped; its cancellation is
    absorbed, any other error it ends with is raised."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
