"""The browser page resumes its chat by itself when the network drops (protocol.md §2.2),
through a proxy the test cuts, over the scripted mesh; and when its gateway is redeployed with
the state store shared (§2.3), on the real swarm. Headless Chromium."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Locator, Page, expect

from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from tests.engine.support import release
from tests.helpers import start_gateway
from tests.test_browser_page import (
    CHROMIUM,
    TURN_TIMEOUT_MS,
    BrowserThread,
    finished_reply,
    open_page,
    running_chromium,
    send_turn,
    usage_of,
)
from tests.transport.proxy import CuttableProxy
from tests.transport.support import fake_gateway

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")

REPLY = "Still here after the network came back."


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


async def test_a_turn_cut_by_a_network_drop_ends_whole_in_the_page(
    chromium: BrowserThread,
) -> None:
    gate = asyncio.Semaphore(0)
    gateway = await fake_gateway(FakeBackend(reply=REPLY, gate=gate))
    proxy = CuttableProxy(gateway.port)
    await proxy.start()
    browser = chromium.browser
    assert browser is not None
    try:

        async def start() -> tuple[Page, Locator]:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{proxy.port}/")
            status = page.get_by_test_id("conn-status")
            await expect(status).to_have_attribute("data-state", "open")
            turn = await send_turn(page, "hi")
            await expect(turn.get_by_test_id("reply")).to_have_text(REPLY[:3])
            return page, turn

        release(gate, 3)
        page, turn = await chromium.run(start())
        proxy.cut()
        release(gate, len(REPLY) + 2)
        text = await chromium.run(finished_reply(turn))
        assert text == REPLY
        connections = gateway.metrics.registry.get_sample_value("farmesh_connections_total")
        assert connections == 2  # the page's second connection resumed the same session
        await chromium.run(page.close())
    finally:
        await proxy.aclose()
        await gateway.shutdown()


async def test_chat_page_follows_a_redeploy_that_shares_the_state_store(
    backend: Any, chromium: BrowserThread
) -> None:
    """A gateway redeployed on the same address with the state store shared: the page's chat
    moves to the new process by itself and goes on with its history cached (§2.3)."""
    store = MemoryStateStore()
    server = await start_gateway(backend, registry=SessionRegistry(store))
    port, http_port = server.port, server.http.port
    problems: list[str] = []
    assert chromium.browser is not None
    try:
        page = await chromium.run(open_page(chromium.browser, port, problems))
        first = await chromium.run(send_turn(page, "Name a colour."))
        await chromium.run(finished_reply(first))
        before = await chromium.run(usage_of(first))
        await server.shutdown()
        server = await start_gateway(
            backend, registry=SessionRegistry(store), port=port, http_port=http_port
        )

        async def goes_on() -> dict[str, Any]:
            await expect(page.get_by_test_id("conn-status")).to_have_attribute(
                "data-state", "open", timeout=TURN_TIMEOUT_MS
            )
            await expect(page.get_by_test_id("disconnect")).to_be_hidden()
            turn = await send_turn(page, "Another one.")
            assert (await finished_reply(turn)).strip()
            await expect(page.get_by_test_id("error")).to_be_hidden()
            return await usage_of(turn)

        after = await chromium.run(goes_on())
    finally:
        await server.shutdown()
    # every token of turn one but its last reply token, which turn two sends first
    assert after["cached_tokens"] == before["prompt_tokens"] + before["completion_tokens"] - 1
    assert [p for p in problems if "WebSocket connection to" not in p] == []
