"""The browser chat page (farmesh_ws/static) in headless Chromium, on the real local swarm."""

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.async_api import (
    Browser,
    Locator,
    Page,
    Playwright,
    WebSocket,
    async_playwright,
    expect,
)

from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import PRICE, PROMPT_PRICE, start_gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TURN_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


T = TypeVar("T")


class BrowserThread:
    """Playwright's async API on its own event loop in a thread.

    The tests' loop serves the gateway; it cannot start Playwright's driver process because
    hivemind installs uvloop's event loop policy, which has no child watcher for asyncio's
    own loop. A loop made by that policy in another thread (uvloop's) spawns it fine.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="playwright")
        self.thread.start()
        self.browser: Browser | None = None

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the browser's loop; the tests' loop keeps serving meanwhile."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


@contextlib.asynccontextmanager
async def running_chromium() -> AsyncIterator[BrowserThread]:
    """Headless Chromium on its own thread (the `chromium` fixture of the browser tests)."""
    runner = BrowserThread()

    async def launch() -> tuple[Playwright, Browser]:
        expect.set_options(timeout=30_000)  # opening a mesh session can take a few seconds
        playwright = await async_playwright().start()
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        return playwright, browser

    async def close(playwright: Playwright, browser: Browser) -> None:
        await browser.close()
        await playwright.stop()

    try:
        playwright, browser = await runner.run(launch())
        runner.browser = browser
        try:
            yield runner
        finally:
            await runner.run(close(playwright, browser))
    finally:
        runner.stop()


async def open_page(
    browser: Browser,
    port: int,
    problems: list[str],
    *,
    sent: list[dict[str, Any]] | None = None,
    before_load: Callable[[Page], Awaitable[None]] | None = None,
) -> Page:
    """Load the page and wait for its chat session; collect page errors into `problems` and
    the JSON frames the page sends into `sent`."""
    page = await browser.new_page(viewport={"width": 1000, "height": 900})
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    page.on(
        "console",
        lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    if sent is not None:

        def watch(ws: WebSocket) -> None:
            ws.on("framesent", lambda payload: sent.append(json.loads(payload)))

        page.on("websocket", watch)
    if before_load is not None:
        await before_load(page)
    await page.goto(f"http://127.0.0.1:{port}/")
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("session-model")).to_have_text("SmolLM2-135M-Instruct")
    await expect(page.get_by_test_id("send")).to_be_enabled()
    return page


async def send_turn(page: Page, text: str, *, enter: bool = False) -> Locator:
    """Type a message, send it (button or Enter) and return the new turn's element."""
    turns = page.get_by_test_id("turn")
    count = await turns.count()
    await page.get_by_test_id("input").fill(text)
    if enter:
        await page.get_by_test_id("input").press("Enter")
    else:
        await page.get_by_test_id("send").click()
    await expect(turns).to_have_count(count + 1)
    turn = turns.nth(count)
    await expect(turn.get_by_test_id("prompt")).to_have_text(text)
    return turn


async def finished_reply(turn: Locator, state: str | re.Pattern[str] = "done") -> str:
    """Wait for the turn's usage and contribution; return the reply's exact text."""
    await expect(turn).to_have_attribute("data-state", state, timeout=TURN_TIMEOUT_MS)
    await expect(turn.get_by_test_id("usage")).to_be_visible()
    await expect(turn.get_by_test_id("contribution")).to_be_visible()
    text = await turn.get_by_test_id("reply").text_content()
    assert text is not None
    return text


async def usage_of(turn: Locator) -> dict[str, Any]:
    async def number(testid: str) -> int:
        return int(await turn.get_by_test_id(testid).inner_text())

    return {
        "prompt_tokens": await number("prompt-tokens"),
        "cached_tokens": await number("cached-tokens"),
        "completion_tokens": await number("completion-tokens"),
        "cost_far": await turn.get_by_test_id("cost").inner_text(),
    }


async def check_contribution(turn: Locator, cost_far: str) -> None:
    bars = turn.get_by_test_id("node-bar")
    await expect(bars).to_have_count(2)
    spans = []
    for index in range(2):
        bar = bars.nth(index)
        start, end = await bar.get_attribute("data-start"), await bar.get_attribute("data-end")
        assert start is not None
        assert end is not None
        spans.append((int(start), int(end)))
        # Drawn at its position over the 30 blocks: left = start/30, width = (end - start)/30.
        left = 100 * int(start) / 30
        width = 100 * (int(end) - int(start)) / 30
        await expect(bar).to_have_attribute("style", re.compile(rf"left: {left:g}%"))
        await expect(bar).to_have_attribute("style", re.compile(rf"width: {width:g}%"))
        box, track = await bar.bounding_box(), await bar.locator("..").bounding_box()
        assert box is not None
        assert track is not None
        assert box["x"] == pytest.approx(track["x"] + track["width"] * left / 100, abs=2)
        assert box["width"] == pytest.approx(track["width"] * width / 100, abs=2)
    assert sorted(spans) == [(0, 15), (15, 30)]
    shares = [Decimal(text) for text in await turn.get_by_test_id("node-share").all_inner_texts()]
    assert sum(shares) == Decimal(cost_far)


async def screenshot(page: Page, paths: list[Path]) -> None:
    """The whole conversation in one picture: grow the viewport to the page's height, so the
    sticky message box sits below the last turn instead of over it."""
    height = await page.evaluate("document.documentElement.scrollHeight")
    await page.set_viewport_size({"width": 1000, "height": height})
    for path in paths:
        await page.screenshot(path=str(path))


def turns_sent(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in sent if frame["type"] == "turn"]


async def test_chat_page_two_turns_contribution_and_stop(
    gateway: GatewayServer, golden: dict[str, Any], chromium: BrowserThread, tmp_path: Path
) -> None:
    turn1, turn2 = golden["conversations"][0][:2]
    screenshots = [ARTIFACTS / "browser-page.png", tmp_path / "browser-page.png"]
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        assert chromium.browser is not None
        page = await open_page(chromium.browser, gateway.port, problems, sent=sent)
        error = page.get_by_test_id("error")
        await expect(page.get_by_test_id("session-price")).to_have_text("0.0001")
        await expect(page.get_by_test_id("stop")).to_be_disabled()

        # Temperature 0 (greedy) in the page: the replies are the golden greedy ones.
        await page.get_by_test_id("temperature").fill("0")
        await expect(page.get_by_test_id("sampling-source")).to_have_text("(edited)")
        first = await send_turn(page, turn1["new_messages"][0]["content"])
        assert turns_sent(sent)[-1]["temperature"] == 0
        assert await finished_reply(first) == turn1["greedy_48_text"].removesuffix("<|im_end|>")
        usage1 = await usage_of(first)
        assert usage1["cached_tokens"] == 0
        assert usage1["prompt_tokens"] == len(turn1["prompt_ids"])
        expected = PRICE * usage1["completion_tokens"] + PROMPT_PRICE * usage1["prompt_tokens"]
        assert Decimal(usage1["cost_far"]) == expected
        await expect(first.get_by_test_id("turn-status")).to_have_text("done")
        await expect(first.get_by_test_id("speed")).to_contain_text("tok/s")
        await check_contribution(first, usage1["cost_far"])
        await expect(error).to_be_hidden()

        second = await send_turn(page, turn2["new_messages"][0]["content"], enter=True)
        assert await finished_reply(second) == turn2["greedy_48_text"].removesuffix("<|im_end|>")
        usage2 = await usage_of(second)
        assert usage2["cached_tokens"] > 0
        await check_contribution(second, usage2["cost_far"])
        position = int(await page.get_by_test_id("session-position").inner_text())
        assert position > usage2["cached_tokens"] + usage2["prompt_tokens"]
        await expect(error).to_be_hidden()

        long = await send_turn(page, "Write a long story about a lighthouse keeper.")
        await expect(page.get_by_test_id("send")).to_be_disabled()
        await expect(long.get_by_test_id("reply")).to_have_text(re.compile(r"\S"))
        await page.get_by_test_id("stop").click()
        await finished_reply(long, "cancelled")
        await expect(long.get_by_test_id("turn-status")).to_have_text("cancelled")
        assert 0 < (await usage_of(long))["completion_tokens"] < 256
        await expect(page.get_by_test_id("stop")).to_be_disabled()
        await expect(error).to_be_hidden()

        after = await send_turn(page, "Say hi.")
        assert (await finished_reply(after)).strip()
        assert (await usage_of(after))["cached_tokens"] > 0
        await expect(error).to_be_hidden()
        await expect(page.get_by_test_id("disconnect")).to_be_hidden()
        await expect(page.get_by_test_id("turn")).to_have_count(4)

        await screenshot(page, screenshots)
        await page.close()

    await chromium.run(scenario())
    assert all(path.stat().st_size > 0 for path in screenshots)
    assert problems == []
    assert all(frame["temperature"] == 0 for frame in turns_sent(sent))


async def test_chat_page_shows_disconnect_and_reconnects(
    backend: Any, chromium: BrowserThread, tmp_path: Path
) -> None:
    server = await start_gateway(backend)
    # The restart below binds the same two ports: port + 1 was never ours to assume free.
    port, http_port = server.port, server.http.port
    problems: list[str] = []
    assert chromium.browser is not None
    try:
        page = await chromium.run(open_page(chromium.browser, port, problems))
        await server.shutdown()
        # After going_away the page tries to resume behind the same address (§2.3).
        status = page.get_by_test_id("conn-status")
        await chromium.run(expect(status).to_have_attribute("data-state", "connecting"))

        # A new gateway on the same port that does not share the old one's state: the session
        # is gone there; the page says so, and Reconnect opens a new session.
        server = await start_gateway(backend, port=port, http_port=http_port)

        async def shows_disconnect() -> None:
            disconnect_text = page.get_by_test_id("disconnect-text")
            await expect(page.get_by_test_id("disconnect")).to_be_visible()
            await expect(disconnect_text).to_contain_text("code 1001")
            await expect(disconnect_text).to_contain_text("server shutting down")
            await expect(page.get_by_test_id("error")).to_contain_text("session_expired")
            await expect(status).to_have_attribute("data-state", "closed")
            await expect(page.get_by_test_id("send")).to_be_disabled()
            await expect(page.get_by_test_id("reconnect")).to_be_enabled()

        await chromium.run(shows_disconnect())
        disconnected = [ARTIFACTS / "browser-page-disconnect.png", tmp_path / "disconnect.png"]
        ARTIFACTS.mkdir(exist_ok=True)
        await chromium.run(screenshot(page, disconnected))

        async def reconnects() -> None:
            await page.get_by_test_id("reconnect").click()
            await expect(status).to_have_attribute("data-state", "open")
            await expect(page.get_by_test_id("disconnect")).to_be_hidden()
            turn = await send_turn(page, "Say hi.")
            assert (await finished_reply(turn)).strip()
            await expect(page.get_by_test_id("error")).to_be_hidden()
            await page.close()

        await chromium.run(reconnects())
    finally:
        await server.shutdown()
    # while no gateway listened, the browser logged its failed connection attempts
    assert [p for p in problems if "WebSocket connection to" not in p] == []


async def test_chat_page_shows_error_frames(
    gateway: GatewayServer, chromium: BrowserThread, tmp_path: Path
) -> None:
    problems: list[str] = []

    async def scenario() -> None:
        assert chromium.browser is not None
        page = await open_page(chromium.browser, gateway.port, problems)
        # Above max_text_chars (16000): the server refuses the turn with invalid_request.
        refused = await send_turn(page, "x" * 16_001)
        await expect(page.get_by_test_id("error-code")).to_have_text("invalid_request")
        await expect(page.get_by_test_id("error-message")).to_contain_text("limit is 16000")
        await expect(refused).to_have_attribute("data-state", "error")
        await expect(refused.get_by_test_id("turn-status")).to_have_text("error: invalid_request")
        await expect(page.get_by_test_id("send")).to_be_enabled()
        await expect(page.get_by_test_id("stop")).to_be_disabled()
        await screenshot(page, [tmp_path / "error.png"])
        await page.close()

    await chromium.run(scenario())
    assert problems == []
