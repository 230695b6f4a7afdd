"""Origins in headless Chromium (scripted mesh): a page from another origin cannot open a
session unless listed, nor frame the gateway's page; the gateway's own page still chats under
its Content-Security-Policy."""

import contextlib
import http.server
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from farmesh_ws.mesh.fake import FakeBackend
from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    running_chromium,
    send_turn,
)
from tests.transport.support import fake_gateway

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")

# Opens a WebSocket to the gateway; window.outcome resolves to "open" or "closed <code>".
CONNECTING_PAGE = """<!doctype html><title>another origin</title><script>
window.outcome = new Promise((resolve) => {
  const ws = new WebSocket("ws://127.0.0.1:%(port)d/ws");
  ws.onopen = () => { resolve("open"); ws.close(); };
  ws.onclose = (event) => resolve(`closed ${event.code}`);
});
</script>"""
FRAMING_PAGE = """<!doctype html><title>another origin</title>
<iframe src="http://127.0.0.1:%(port)d/"></iframe>"""


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


class OtherOrigin:
    """A second origin: Python's http.server on another 127.0.0.1 port, in a thread, serving
    ``/connect`` and ``/frame`` for the gateway port set in ``gateway_port``."""

    def __init__(self) -> None:
        self.gateway_port = 0
        pages = {"/connect": CONNECTING_PAGE, "/frame": FRAMING_PAGE}
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path not in pages:  # the favicon
                    self.send_error(404)
                    return
                body = (pages[self.path] % {"port": origin.gateway_port}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextlib.contextmanager
    def serving(self) -> Iterator["OtherOrigin"]:
        thread = threading.Thread(target=self.server.serve_forever, name="other-origin")
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            thread.join()
            self.server.server_close()


@pytest.fixture
def other() -> Iterator[OtherOrigin]:
    with OtherOrigin().serving() as served:
        yield served


async def outcome_from(browser: Browser, url: str) -> str:
    """Load a page of the other origin and return how its WebSocket to the gateway ended."""
    page = await browser.new_page()
    await page.goto(url)
    outcome: str = await page.evaluate("window.outcome")
    await page.close()
    return outcome


async def test_another_origins_page_cannot_open_a_session(
    chromium: BrowserThread, other: OtherOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farmesh_ws.transport.ws")
    gateway = await fake_gateway(FakeBackend())
    other.gateway_port = gateway.port
    try:
        assert chromium.browser is not None
        outcome = await chromium.run(outcome_from(chromium.browser, f"{other.origin}/connect"))
    finally:
        await gateway.shutdown()
    assert outcome == "closed 1006"  # the handshake failed
    assert f"refused a WebSocket handshake from origin ['{other.origin}']" in caplog.messages
    assert gateway.metrics.registry.get_sample_value("farmesh_connections_total") == 0


async def test_a_listed_origins_page_opens_a_session(
    chromium: BrowserThread, other: OtherOrigin
) -> None:
    gateway = await fake_gateway(FakeBackend(), allowed_origins=(other.origin,))
    other.gateway_port = gateway.port
    try:
        assert chromium.browser is not None
        outcome = await chromium.run(outcome_from(chromium.browser, f"{other.origin}/connect"))
    finally:
        await gateway.shutdown()
    assert outcome == "open"


async def test_the_gateways_page_chats_and_cannot_be_framed(
    chromium: BrowserThread, other: OtherOrigin
) -> None:
    """Its own origin connects under the CSP (connect-src 'self' covers ws:), styles and the
    contribution bars (CSSOM) apply, nothing is reported; another origin cannot frame it."""
    gateway = await fake_gateway(FakeBackend(reply="Hi there."))
    other.gateway_port = gateway.port
    problems: list[str] = []

    async def chat(browser: Browser) -> None:
        page = await browser.new_page()
        page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        await page.goto(f"http://127.0.0.1:{gateway.port}/")
        await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")
        assert await page.evaluate("document.styleSheets[0].cssRules.length") > 0
        turn = await send_turn(page, "Say hi.")
        assert await finished_reply(turn) == "Hi there."
        await expect(turn.get_by_test_id("node-bar")).to_have_count(2)
        bar = turn.get_by_test_id("node-bar").first
        await expect(bar).to_have_attribute("style", re.compile(r"left: 0%; width: 50%"))
        await page.close()

    async def framed(browser: Browser) -> str:
        page = await browser.new_page()
        async with page.expect_console_message(lambda msg: "frame-ancestors" in msg.text) as msg:
            await page.goto(f"{other.origin}/frame")
        text = (await msg.value).text
        await page.close()
        return text

    try:
        assert chromium.browser is not None
        await chromium.run(chat(chromium.browser))
        refusal = await chromium.run(framed(chromium.browser))
    finally:
        await gateway.shutdown()
    assert problems == []
    assert refusal.startswith(f"Framing 'http://127.0.0.1:{other.gateway_port}/' violates")
    assert "\"frame-ancestors 'none'\". The request has been blocked." in refusal
