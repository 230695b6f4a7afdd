"""The terminal chat's input (:mod:`farmesh_ws.chat_cli`): lines read without blocking the
event loop, so the connection's frames and keepalive pings go on while the user types."""

import asyncio
import codecs
import os
import stat
from typing import TextIO


class InputLines:
    """The input's lines without blocking the event loop, so frames and keepalive pings go
    on while the user types: a terminal or pipe is watched with the loop's ``add_reader``;
    a file or in-memory text is read directly, as reading it never blocks."""

    def __init__(self, stdin: TextIO) -> None:
        self._stdin = stdin
        self._fd: int | None = None
        self._checked = False
        encoding = getattr(stdin, "encoding", None) or "utf-8"
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._buffer = ""
        self._eof = False

    async def readline(self) -> str | None:
        """The next line with its newline, or None at the end of the input."""
        loop = asyncio.get_running_loop()
        if not self._checked:
            self._fd, self._checked = _watchable_fd(self._stdin, loop), True
        if self._fd is None:
            return self._stdin.readline() or None
        while "\n" not in self._buffer and not self._eof:
            await _readable(loop, self._fd)
            try:
                data = os.read(self._fd, 65536)
            except OSError:  # e.g. EIO: the terminal hung up
                data = b""
            self._buffer += self._decoder.decode(data, final=not data)
            self._eof = not data
        if not self._buffer:
            return None
        line, newline, self._buffer = self._buffer.partition("\n")
        return line + newline


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _watchable_fd(stdin: TextIO, loop: asyncio.AbstractEventLoop) -> int | None:
    """The input's file descriptor if the loop can watch it, else None (read directly)."""
    try:
        fd = stdin.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        loop.add_reader(fd, lambda: None)
    except (AttributeError, OSError, ValueError, NotImplementedError):
        return None
    loop.remove_reader(fd)
    return fd
