"""``farmesh-ws chat``: a terminal chat on top of :mod:`farmesh_ws.client`.

::

    you> What is the capital of France?
    The capital of France is Paris.
    [8 tokens, 31.0 tok/s, TTFT 95 ms, prompt 31 (+0 cached), cost 0.00142 $FAR]

The reply streams as it arrives and each turn ends with one usage line. Turns sample as ``/models``
recommends unless ``temperature`` / ``top_p`` are given (0: greedy). ``/reset`` starts a new chat
session (on a new connection: closing a session closes its connection, protocol.md §3.5); ``/quit``
or the end of the input exits with 0. Ctrl-C during a reply cancels that reply and keeps the
session; Ctrl-C at the prompt (or a second one during a reply) exits with 130. A failed connect or
a lost connection exits with 1; a server error ends only its turn.

A gateway that requires credentials (protocol.md §2.1) takes an API key (``--api-key``, default
``$FARMESH_API_KEY``) or a Sign-In with Ethereum session token (``--token``), sent in the
handshake; without one, its ``unauthorized`` comes with a hint on how to get a key.

Writing to the given ``stdout`` is this module's job; it prints nothing else.
"""

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any, Final, TextIO, TypeVar

from farmesh_ws.chat_input import InputLines
from farmesh_ws.client import (
    DEFAULT_TIMEOUT_S,
    Chat,
    ConnectionLost,
    DoneEvent,
    FarmeshClient,
    FarmeshClientError,
    ReplyStream,
    TokenEvent,
)
from farmesh_ws.models import generation

PROMPT: Final = "you> "
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_INTERRUPTED: Final = 130
COMMANDS: Final = "/reset starts a new session, /quit exits"
API_KEY_ENV: Final = "FARMESH_API_KEY"
UNAUTHORIZED_HINT: Final = (
    "hint: this gateway requires an API key: farmesh-ws keys create --wallet 0x… and pass --api-key"
)

T = TypeVar("T")


def run_chat(
    url: str,
    *,
    max_new_tokens: int | None = None,
    system_prompt: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    token: str | None = None,
) -> int:
    """Chat with the gateway at ``url`` until ``/quit`` or the end of input; returns the exit
    code. ``max_new_tokens`` None: the gateway's default for the model (within its limit).
    ``stdin``/``stdout`` default to the process's (looked up at call time). ``token``
    (an API key or session token) is sent in every connection's handshake."""
    terminal = _Terminal(
        url,
        token=token,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        overrides={"temperature": temperature, "top_p": top_p},
        stdin=stdin if stdin is not None else sys.stdin,
        stdout=stdout if stdout is not None else sys.stdout,
        timeout=timeout,
    )
    try:
        return asyncio.run(terminal.run())
    except KeyboardInterrupt:  # only where no SIGINT handler could be installed
        terminal.line("interrupted")
        return EXIT_INTERRUPTED


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` (default ``$FARMESH_API_KEY``) and ``--token`` for ``farmesh-ws chat``;
    :func:`credential_argument` picks the one to send."""
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"an API key fmk_… (farmesh-ws keys create); default: ${API_KEY_ENV}",
    )
    given.add_argument(
        "--token", default=None, help="a session token fms_… from Sign-In with Ethereum"
    )


def credential_argument(args: argparse.Namespace) -> str | None:
    """The credential ``farmesh-ws chat`` sends: ``--token``, else ``--api-key``."""
    token: str | None = args.token or args.api_key
    return token


def format_usage(done: DoneEvent) -> str:
    """The usage line after a reply, e.g.
    ``[8 tokens, 12.3 tok/s, TTFT 95 ms, prompt 15 (+44 cached), cost 0.0008 $FAR]``."""
    usage = done.usage
    parts = [f"{usage.completion_tokens} token{'' if usage.completion_tokens == 1 else 's'}"]
    if done.finish_reason != "stop":
        parts.append(done.finish_reason)
    rate = done.tokens_per_second
    if rate is not None:
        parts.append(f"{rate:.1f} tok/s")
    if done.time_to_first_token_ms is not None:
        parts.append(f"TTFT {done.time_to_first_token_ms:.0f} ms")
    parts.append(f"prompt {usage.prompt_tokens} (+{usage.cached_tokens} cached)")
    parts.append(f"cost {usage.cost_far:f} $FAR")
    return "[" + ", ".join(parts) + "]"


def _describe(error: FarmeshClientError, *, sent_credential: bool) -> str:
    """One line for a person: the server's message and its code, and what to do next; for
    ``unauthorized`` without a credential, a second line on how to get one."""
    message = " ".join(error.message.split())
    if isinstance(error, ConnectionLost):
        return f"error: connection lost: {message}"
    if error.code == "connect_failed":
        return f"error: {message}"
    text = f"error: {message} ({error.code})"
    if error.code == "context_overflow":
        text += "; /reset starts a new session"
    elif error.code == "unauthorized" and not sent_credential:
        text += "\n" + UNAUTHORIZED_HINT
    elif error.retry_after_s is not None:
        text += f"; try again in {error.retry_after_s:g} s"
    elif error.retryable:
        text += "; try again"
    return text


class _Terminal:
    """One terminal chat: the prompt loop, the streaming reply, Ctrl-C, /reset and /quit."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        max_new_tokens: int | None,
        system_prompt: str | None,
        overrides: dict[str, float | None],
        stdin: TextIO,
        stdout: TextIO,
        timeout: float,
    ) -> None:
        self._url = url
        self._token = token
        self._max_new_tokens = max_new_tokens
        self._system_prompt = system_prompt
        self._overrides = overrides
        self._sampling: generation.Sampling = {}
        self._stdin = stdin
        self._out = stdout
        self._timeout = timeout
        self._at_line_start = True
        self._client: FarmeshClient | None = None
        self._chat: Chat | None = None
        self._reply: ReplyStream | None = None
        self._interrupts = 0
        self._quit = asyncio.Event()
        self._lines = InputLines(stdin)
        self._background: set[asyncio.Task[None]] = set()

    def write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()
            self._at_line_start = text.endswith("\n")

    def line(self, text: str) -> None:
        """``text`` on a line of its own."""
        self.end_line()
        self.write(text + "\n")

    def report(self, error: FarmeshClientError) -> None:
        self.line(_describe(error, sent_credential=self._token is not None))

    def end_line(self) -> None:
        if not self._at_line_start:
            self.write("\n")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handles_sigint = self._handle_sigint(loop)
        try:
            return await self._session()
        finally:
            if handles_sigint:
                loop.remove_signal_handler(signal.SIGINT)
            if self._client is not None:
                await self._client.aclose()

    async def _session(self) -> int:
        try:
            chat = await self._open()
        except FarmeshClientError as exc:
            self.report(exc)
            return EXIT_ERROR
        info = chat.info
        self._sampling, problem = await asyncio.to_thread(
            generation.chat_sampling, self._url, info.model, self._timeout, **self._overrides
        )
        if problem is not None:
            self.line(f"note: no recommended sampling ({problem})")
        prices = f"{info.price_per_token_far:f} $FAR per generated token"
        if info.price_per_prompt_token_far:
            prices += f" + {info.price_per_prompt_token_far:f} per prompt token"
        self.line(
            f"connected to {self._url}: {info.model}, max_length {info.max_length}, {prices}, "
            f"sampling {generation.describe_sampling(self._sampling)}; {COMMANDS}"
        )
        while True:
            self.write(PROMPT)
            line = await self._next_line()
            if isinstance(line, int):
                return line
            text = line.strip()
            if not text:
                continue
            if text == "/quit":
                return EXIT_OK
            if text == "/reset":
                code = await self._reset()
            elif text.startswith("/") and text[1:].isalpha():
                self.line(f"unknown command {text}; {COMMANDS}")
                continue
            else:
                code = await self._turn(text)
            if code is not None:
                return code

    async def _open(self) -> Chat:
        self._client = await FarmeshClient.connect(
            self._url, timeout=self._timeout, token=self._token
        )
        self._chat = await self._client.open_chat(system_prompt=self._system_prompt)
        return self._chat

    async def _reset(self) -> int | None:
        if self._chat is not None:
            with contextlib.suppress(FarmeshClientError):
                await self._chat.aclose()
        try:
            await self._open()
        except FarmeshClientError as exc:
            self.report(exc)
            return EXIT_ERROR
        self.line("[new chat session]")
        return None

    async def _next_line(self) -> str | int:
        """The next input line, or the exit code if the input ended, Ctrl-C was pressed at
        the prompt, or the server closed the connection meanwhile (idle timeout, shutdown)."""
        assert self._client is not None
        closed = self._client.wait_closed()
        outcome = await self._first(self._lines.readline(), closed)
        if outcome is _QUIT:
            self.end_line()
            return EXIT_INTERRUPTED
        if outcome is _OTHER:
            self.report(self._client.close_error or self._client.lost_error())
            return EXIT_ERROR
        if outcome is None:  # end of input
            self.end_line()
            return EXIT_OK
        assert isinstance(outcome, str)
        return outcome

    async def _turn(self, text: str) -> int | None:
        assert self._chat is not None
        try:
            stream = self._chat.send(text, max_new_tokens=self._max_new_tokens, **self._sampling)
        except FarmeshClientError as exc:
            self.report(exc)
            return None
        self._reply, self._interrupts = stream, 0
        try:
            outcome = await self._first(self._stream(stream), None)
        except ConnectionLost as exc:
            self.report(exc)
            return EXIT_ERROR
        except FarmeshClientError as exc:
            self.report(exc)
            if exc.done is not None:
                self.line(format_usage(exc.done))
            return None
        finally:
            self._reply = None
        if outcome is _QUIT:
            self.line("interrupted")
            return EXIT_INTERRUPTED
        return None

    async def _stream(self, stream: ReplyStream) -> None:
        done: DoneEvent | None = None
        async for event in stream:
            if isinstance(event, TokenEvent):
                self.write(event.text)
            elif isinstance(event, DoneEvent):
                done = event
        if done is not None:
            self.line(format_usage(done))

    async def _first(
        self, work: Coroutine[Any, Any, T], other: Coroutine[Any, Any, Any] | None
    ) -> "T | _Outcome":
        """Run ``work`` until it ends, ``other`` ends first (``_OTHER``) or the user asks to
        quit (``_QUIT``); the rest is cancelled."""
        work_task = asyncio.ensure_future(work)
        tasks: set[asyncio.Future[Any]] = {work_task, asyncio.ensure_future(self._quit.wait())}
        other_task = asyncio.ensure_future(other) if other is not None else None
        if other_task is not None:
            tasks.add(other_task)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._quit.is_set():
            return _QUIT
        if work_task.done() and not work_task.cancelled():
            return work_task.result()
        return _OTHER

    def _handle_sigint(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Ctrl-C is ours while the chat runs (signals reach only the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        try:
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        return True

    def _on_sigint(self) -> None:
        """During a reply the first Ctrl-C cancels it (the session stays) and a second one
        quits; at the prompt Ctrl-C quits."""
        reply = self._reply
        if reply is None or reply.finished or self._interrupts > 0:
            self._quit.set()
            return
        self._interrupts += 1
        task = asyncio.ensure_future(self._cancel(reply))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _cancel(reply: ReplyStream) -> None:
        with contextlib.suppress(FarmeshClientError):  # the stream reports a lost connection
            await reply.cancel()


class _Outcome:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_QUIT: Final = _Outcome("QUIT")
_OTHER: Final = _Outcome("OTHER")
