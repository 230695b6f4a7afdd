"""``rewind`` and ``regenerate`` (protocol.md §3.8, §3.9) on the scripted mesh."""

import asyncio
from decimal import Decimal
from typing import Any

from farmesh_ws.mesh.fake import IM_START, FakeBackend, FakeSession
from tests.engine.support import Harness, harness, release


async def turn(h: Harness, request_id: str, text: str) -> dict[str, Any]:
    await h.send({"type": "turn", "request_id": request_id, "text": text})
    await h.finish_running()
    (done,) = [f for f in h.of_type("done") if f["request_id"] == request_id]
    return done


def mesh(h: Harness) -> FakeSession:
    (session,) = h.backend.sessions
    return session


def replies(prompt: str) -> str:
    """Each reply names the last user message, so a wrong history shows in the text."""
    return "re:" + prompt.rsplit("user\n", 1)[-1].split("<|im_end|>")[0]


async def test_rewind_drops_the_last_turns_and_the_next_turn_continues_from_there() -> None:
    h = harness(FakeBackend(reply=replies))
    await h.send({"type": "open"})
    first = await turn(h, "a", "one")
    after_first = list(mesh(h).sent)
    await turn(h, "b", "two")
    await turn(h, "c", "three")
    await h.send({"type": "rewind", "turns": 2})
    (rewound,) = h.of_type("rewound")
    assert rewound == {
        "type": "rewound",
        "seq": rewound["seq"],
        "turns": 2,
        "position": first["position"],
        "method": "replay",
    }
    assert mesh(h).sent == after_first
    again = await turn(h, "d", "four")
    assert again["usage"]["cached_tokens"] == first["position"]
    tokens = [f["token"] for f in h.of_type("token") if f["request_id"] == "d"]
    assert "".join(tokens) == "re:four"


async def test_a_rewind_outside_the_history_or_while_busy_changes_nothing() -> None:
    gate = asyncio.Semaphore(0)
    h = harness(FakeBackend(reply="ok", gate=gate))
    await h.send({"type": "rewind", "turns": 1})
    await h.send({"type": "open"})
    await h.send({"type": "rewind", "turns": 1})
    await h.send({"type": "rewind", "turns": 0})
    await h.send({"type": "turn", "request_id": "a", "text": "hi"})
    await h.send({"type": "rewind", "turns": 1})
    codes = [f["code"] for f in h.of_type("error")]
    assert codes == ["no_session", "invalid_request", "invalid_message", "busy"]
    release(gate, 5)
    await h.finish_running()
    assert h.of_type("rewound") == []


async def test_regenerate_replaces_the_last_reply_and_bills_only_what_it_generates() -> None:
    h = harness(FakeBackend(reply=replies), price_per_prompt_token_far=Decimal("0.001"))
    await h.send({"type": "open"})
    await turn(h, "a", "one")
    original = await turn(h, "b", "two")
    await h.send({"type": "regenerate", "request_id": "b2"})
    await h.finish_running()
    (done,) = [f for f in h.of_type("done") if f["request_id"] == "b2"]
    assert done["rewound"] == "replay"
    assert done["position"] == original["position"]
    assert done["usage"]["cached_tokens"] == original["usage"]["cached_tokens"]
    billed = Decimal("0.0001") * done["usage"]["completion_tokens"]
    assert Decimal(done["usage"]["cost_far"]) == billed
    tokens = [f["token"] for f in h.of_type("token") if f["request_id"] == "b2"]
    assert "".join(tokens) == "re:two"
    await h.send({"type": "rewind", "turns": 2})  # the regenerated turn replaced the old one
    assert h.of_type("rewound")[0]["position"] == 0


async def test_regenerate_with_no_turn_or_refused_leaves_the_session_as_it_was() -> None:
    h = harness(FakeBackend(reply="ok"))
    await h.send({"type": "open"})
    await h.send({"type": "regenerate", "request_id": "r0"})
    await turn(h, "a", "one")
    before = list(mesh(h).sent)
    await h.send({"type": "regenerate", "request_id": "r1", "max_cost_far": "0.00000001"})
    codes = [f["code"] for f in h.of_type("error")]
    assert codes == ["invalid_request", "budget_exceeded"]
    assert mesh(h).sent == before


async def test_a_rewind_to_the_start_sends_the_system_prompt_again() -> None:
    h = harness(FakeBackend(reply="ok"))
    await h.send({"type": "open", "system_prompt": "Be brief."})
    await turn(h, "a", "one")
    await h.send({"type": "rewind", "turns": 1})
    assert mesh(h).sent == []
    await turn(h, "b", "two")
    assert mesh(h).decode(mesh(h).sent).startswith("<|im_start|>system\nBe brief.")
    assert mesh(h).sent.count(IM_START) == 3
