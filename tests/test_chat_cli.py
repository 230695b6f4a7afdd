"""`farmesh-ws chat` (farmesh_ws.chat_cli.run_chat) driven like a person at a terminal, on the
real gateway: scripted input in a thread, and a real process for Ctrl-C."""

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import pytest

from farmesh_ws.chat_cli import run_chat
from farmesh_ws.models.generation import describe_sampling, recommended_sampling
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, PROMPT_PRICE, record_sampling, start_gateway, ws_url

REPO = Path(__file__).resolve().parents[1]
END_OF_TURN = "<|im_end|>"
USAGE = re.compile(
    r"^\[(?P<tokens>\d+) tokens?(?:, (?P<reason>length|cancelled|error|budget))?,"
    r" [\d.]+ tok/s, TTFT \d+ ms, prompt (?P<prompt>\d+) \(\+(?P<cached>\d+) cached\),"
    r" cost (?P<cost>[\d.]+) \$FAR\]$",
    re.MULTILINE,
)


def usages(output: str) -> list[dict[str, Any]]:
    found = []
    for match in USAGE.finditer(output):
        usage: dict[str, Any] = {
            k: int(v) for k, v in match.groupdict().items() if v and k not in {"cost", "reason"}
        }
        usage["reason"] = match["reason"] or "stop"
        usage["cost"] = Decimal(match["cost"])
        assert usage["cost"] == PRICE * usage["tokens"] + PROMPT_PRICE * usage["prompt"]
        found.append(usage)
    return found


async def test_two_turns_reset_and_quit(gateway: GatewayServer, golden: dict[str, Any]) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    question1 = turn1["new_messages"][0]["content"]
    question2 = turn2["new_messages"][0]["content"]
    answer1 = turn1["greedy_48_text"].removesuffix(END_OF_TURN)
    answer2 = turn2["greedy_48_text"].removesuffix(END_OF_TURN)
    stdin = io.StringIO(f"{question1}\n{question2}\n\n/reset\n{question1}\n/quit\nnot read\n")
    stdout = io.StringIO()

    code = await asyncio.to_thread(
        run_chat, ws_url(gateway), max_new_tokens=48, system_prompt=None, temperature=0.0,
        stdin=stdin, stdout=stdout,
    )  # fmt: skip

    output = stdout.getvalue()
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith(f"connected to {ws_url(gateway)}: SmolLM2-135M-Instruct")
    assert "0.0001 $FAR per generated token" in lines[0]
    assert lines[0].endswith(", sampling greedy; /reset starts a new session, /quit exits")
    # Input is not echoed (a terminal does that), so each reply follows its prompt.
    assert lines[1:] == [
        f"you> {answer1}",
        lines[2],
        f"you> {answer2}",
        lines[4],
        "you> you> ",
        "[new chat session]",
        f"you> {answer1}",
        lines[8],
        "you> ",
    ]
    first, second, after_reset = usages(output)
    assert first["tokens"] == len(turn1["greedy_48_ids"])
    assert first["cached"] == 0
    history = len(turn1["prompt_ids"]) + len(turn1["greedy_48_ids"])
    assert second["prompt"] == len(turn2["prompt_ids"]) - history
    assert second["cached"] == history - 1
    assert after_reset == first  # a new session: nothing cached
    assert stdin.readline() == "not read\n"


async def test_sampling_is_the_recommended_one_unless_overridden(
    gateway: GatewayServer, bundled_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default every turn samples as the prepared folder recommends (read through
    /models); --top-p replaces one value and --temperature 0 is plain greedy decoding."""
    recommended = recommended_sampling(bundled_model_path)
    assert recommended.get("temperature", 0) > 0, recommended
    seen = record_sampling(monkeypatch)

    async def chat(**overrides: Any) -> str:
        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, ws_url(gateway), max_new_tokens=4, stdin=io.StringIO("Say hi.\nBye.\n"),
            stdout=stdout, **overrides,
        )  # fmt: skip
        assert code == 0, stdout.getvalue()
        return stdout.getvalue().splitlines()[0]

    assert f"sampling {describe_sampling(recommended)};" in await chat()
    assert len(seen) == 2  # both turns
    for used in seen:
        assert used.temperature == recommended["temperature"]
        assert used.top_p == recommended.get("top_p", 1.0)
        assert used.top_k == recommended.get("top_k", 0)
        assert used.repetition_penalty == recommended.get("repetition_penalty", 1.0)
        assert used.max_new_tokens == 4

    seen.clear()
    assert "sampling greedy;" in await chat(temperature=0.0)
    assert [(used.temperature, used.top_p, used.top_k) for used in seen] == [(0.0, 1.0, 0)] * 2

    seen.clear()
    first_line = await chat(top_p=0.5, temperature=None)
    assert f"sampling temperature {recommended['temperature']:g}, top_p 0.5" in first_line
    assert [(used.temperature, used.top_p) for used in seen] == [
        (recommended["temperature"], 0.5)
    ] * 2


async def test_server_errors_are_one_line_and_the_chat_goes_on(gateway: GatewayServer) -> None:
    stdin = io.StringIO("Hello\n/help\nHello again\n")
    stdout = io.StringIO()
    code = await asyncio.to_thread(
        run_chat, ws_url(gateway), max_new_tokens=10**9, system_prompt="Be terse.",
        stdin=stdin, stdout=stdout,
    )  # fmt: skip
    output = stdout.getvalue()
    assert code == 0, output  # the end of input
    error = (
        "error: max_new_tokens 1000000000 is above the limit 1024 of SmolLM2-135M-Instruct "
        "(invalid_request)"
    )
    assert output.splitlines()[1:] == [
        "you> ",
        error,
        "you> ",
        "unknown command /help; /reset starts a new session, /quit exits",
        "you> ",
        error,
        "you> ",
    ]


async def test_connection_failures_exit_1(backend: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stdout = io.StringIO()
    code = await asyncio.to_thread(
        run_chat, f"ws://127.0.0.1:{port}/ws", max_new_tokens=8, stdin=io.StringIO(), stdout=stdout
    )
    assert code == 1
    assert stdout.getvalue().startswith(f"error: cannot connect to ws://127.0.0.1:{port}/ws")

    # The server goes away while the chat waits at the prompt (a pipe, as from a terminal).
    server = await start_gateway(backend, shutdown_grace_s=5)
    stdin, keyboard = text_pipe()
    stdout = io.StringIO()
    chat = asyncio.create_task(
        asyncio.to_thread(run_chat, ws_url(server), max_new_tokens=4, stdin=stdin, stdout=stdout)
    )
    try:
        keyboard.write("Say hi.\n")
        keyboard.flush()
        await wait_until(lambda: len(usages(stdout.getvalue())) == 1)
        await server.shutdown()
        await asyncio.wait({chat}, timeout=30)
    finally:
        keyboard.close()  # the end of input ends the chat if it still runs
        await server.shutdown()
        await asyncio.wait({chat}, timeout=30)
        stdin.close()
    output = stdout.getvalue()
    assert chat.result() == 1, output
    assert output.endswith(
        "\nerror: connection lost: the server closed the connection (1001 server shutting down)\n"
    )


def text_pipe() -> tuple[TextIO, TextIO]:
    """A pipe's two ends as text files: what the chat reads, what the test types."""
    read_end, write_end = os.pipe()
    return open(read_end, encoding="utf-8"), open(write_end, "w", encoding="utf-8")


async def wait_until(condition: Any, within: float = 60) -> None:
    """Poll without blocking the event loop the gateway runs on."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


class ChatProcess:
    """`run_chat` in its own process, with pipes for stdin and stdout, so SIGINT reaches it
    as Ctrl-C would. Its output is collected by a thread (replies have no newline until
    they end). Greedy, so replies are the same on every run."""

    def __init__(self, url: str, max_new_tokens: int, stderr: Any) -> None:
        code = (
            "import sys; from farmesh_ws.chat_cli import run_chat; "
            "sys.exit(run_chat(sys.argv[1], max_new_tokens=int(sys.argv[2]), temperature=0))"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, url, str(max_new_tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            start_new_session=True,
        )
        self._output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self._output += chunk

    @property
    def output(self) -> str:
        return self._output.decode(errors="replace")

    def type(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


async def test_ctrl_c_cancels_the_reply_and_keeps_the_session(
    gateway: GatewayServer, tmp_path: Path
) -> None:
    with (tmp_path / "stderr.log").open("wb") as stderr:
        chat = ChatProcess(ws_url(gateway), 300, stderr)
    try:
        await wait_until(lambda: chat.output.endswith("you> "))
        chat.type("Write a long story about a lighthouse.\n")
        await wait_until(lambda: len(chat.output.rsplit("you> ", 1)[1]) >= 20)
        chat.process.send_signal(signal.SIGINT)
        await wait_until(lambda: len(usages(chat.output)) == 1)
        chat.type("Say hi.\n")
        await wait_until(lambda: len(usages(chat.output)) == 2)
        assert chat.process.stdin is not None
        chat.process.stdin.close()  # end of input: exit 0
        code = await asyncio.to_thread(chat.process.wait, 30)
    finally:
        chat.close()
    output = chat.output
    assert code == 0, output + (tmp_path / "stderr.log").read_text()
    cancelled, after = usages(output)
    assert cancelled["reason"] == "cancelled"
    assert 1 <= cancelled["tokens"] < 300
    assert after["reason"] in {"stop", "length"}
    assert after["cached"] > cancelled["cached"]  # the cancelled reply stayed in the history
    assert output.endswith("you> \n")


async def test_without_max_new_tokens_the_chat_takes_the_models_own_default() -> None:
    """A model whose limit is below the gateway-wide default still chats: the chat sends no
    max_new_tokens of its own unless given one."""
    from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
    from farmesh_ws.models.catalog import ModelTerms
    from tests.transport.support import fake_gateway

    terms = (ModelTerms(FAKE_MODEL_ID, "fake", max_new_tokens_limit=3),)
    server = await fake_gateway(
        FakeBackend(reply="one two three four five"),
        models=terms,
        price_per_prompt_token_far=PROMPT_PRICE,
    )
    stdout = io.StringIO()
    try:
        code = await asyncio.to_thread(
            run_chat, ws_url(server), stdin=io.StringIO("Hi\n"), stdout=stdout
        )
    finally:
        await server.shutdown()
    output = stdout.getvalue()
    assert code == 0, output
    assert "error:" not in output
    (usage,) = usages(output)
    assert int(usage["tokens"]) == 3
    assert usage["reason"] == "length"
