"""The browser page's sampling controls in headless Chromium, on the real local swarm: pre-filled
with the model's recommended sampling from /models, sent in `open` and with every turn."""

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, Route, expect

from farmesh_ws.models.generation import recommended_sampling
from farmesh_ws.transport.ws import GatewayServer
from tests.helpers import record_sampling
from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    open_page,
    running_chromium,
    screenshot,
    send_turn,
    turns_sent,
    usage_of,
)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


async def test_chat_page_prefills_and_sends_the_recommended_sampling(
    gateway: GatewayServer,
    bundled_model_path: Path,
    chromium: BrowserThread,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The controls show what the model folder recommends (through /models); `open` and each
    turn carry the controls' values, and an edited value is what the server samples with."""
    recommended = recommended_sampling(bundled_model_path)
    assert recommended.get("temperature", 0) > 0, recommended
    expected = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **recommended}
    problems: list[str] = []
    sent: list[dict[str, Any]] = []
    seen = record_sampling(monkeypatch)

    async def scenario() -> None:
        assert chromium.browser is not None
        page = await open_page(chromium.browser, gateway.port, problems, sent=sent)
        controls = {
            name: page.get_by_test_id(name.replace("_", "-"))
            for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
        }
        for name, value in expected.items():
            await expect(controls[name]).to_have_value(f"{value:g}")
        await expect(controls["max_new_tokens"]).to_have_value("")  # the server's default
        source = page.get_by_test_id("sampling-source")
        await expect(source).to_have_text("(recommended for SmolLM2-135M-Instruct)")
        assert sent[0] == {"type": "open", "sampling": expected}

        await controls["max_new_tokens"].fill("6")
        first = await send_turn(page, "Say hi.")
        await finished_reply(first, re.compile("done|length"))
        assert (await usage_of(first))["completion_tokens"] <= 6

        # Edited values are what the next turn sends; an invalid one blocks sending.
        await controls["temperature"].fill("3")
        await page.get_by_test_id("input").fill("Name a color.")
        await page.get_by_test_id("send").click()  # the browser's form validation refuses
        await expect(page.get_by_test_id("turn")).to_have_count(1)
        await expect(page.get_by_test_id("input")).to_have_value("Name a color.")
        await controls["temperature"].fill("0.7")
        await controls["top_p"].fill("0.5")
        await expect(source).to_have_text("(edited)")
        second = await send_turn(page, "Name a color.")
        await finished_reply(second, re.compile("done|length"))
        await screenshot(page, [tmp_path / "sampling.png"])

        await page.get_by_test_id("sampling-reset").click()
        for name, value in expected.items():
            await expect(controls[name]).to_have_value(f"{value:g}")
        await expect(source).to_have_text("(recommended for SmolLM2-135M-Instruct)")
        await page.close()

    await chromium.run(scenario())
    assert problems == []
    first, second = turns_sent(sent)
    assert first == {"type": "turn", "request_id": "r1", "text": "Say hi.", **expected,
                     "max_new_tokens": 6}  # fmt: skip
    assert second == {**first, "request_id": "r2", "text": "Name a color.", "temperature": 0.7,
                      "top_p": 0.5}  # fmt: skip
    # What the engine ran the two turns with.
    assert [(used.temperature, used.top_p, used.top_k, used.max_new_tokens) for used in seen] == [
        (expected["temperature"], expected["top_p"], expected["top_k"], 6),
        (0.7, 0.5, expected["top_k"], 6),
    ]


async def test_chat_page_works_without_recommended_sampling(
    gateway: GatewayServer, golden: dict[str, Any], chromium: BrowserThread
) -> None:
    """A gateway whose /models has no `generation`: the controls show the protocol's defaults
    (greedy) and chat works as before."""
    turn1 = golden["conversations"][0][0]
    problems: list[str] = []
    sent: list[dict[str, Any]] = []

    async def without_generation(route: Route) -> None:
        response = await route.fetch()
        body = await response.json()
        for model in body["models"]:
            del model["generation"]
        await route.fulfill(response=response, json=body)

    async def intercept(page: Page) -> None:
        await page.route("**/models", without_generation)

    async def scenario() -> None:
        assert chromium.browser is not None
        page = await open_page(
            chromium.browser, gateway.port, problems, sent=sent, before_load=intercept
        )
        await expect(page.get_by_test_id("temperature")).to_have_value("0")
        await expect(page.get_by_test_id("sampling-source")).to_have_text("(protocol defaults)")
        turn = await send_turn(page, turn1["new_messages"][0]["content"])
        assert await finished_reply(turn) == turn1["greedy_48_text"].removesuffix("<|im_end|>")
        await expect(page.get_by_test_id("error")).to_be_hidden()
        await page.close()

    await chromium.run(scenario())
    assert problems == []
    defaults = {"temperature": 0, "top_p": 1, "top_k": 0, "repetition_penalty": 1}
    assert sent[0] == {"type": "open", "sampling": defaults}
