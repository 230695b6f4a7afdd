"""Spending allowances in admission: prepaid holds on a wallet's balance and the anonymous
free tokens (engine/allowances.py), on the scripted mesh."""

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.engine.events import RequestFinished
from farmesh_ws.errors import InsufficientBalance
from farmesh_ws.mesh.fake import FakeBackend
from tests.engine.support import harness

WALLET = "0xAb5801a7D398351b8bE11C439e05C5B3259aeC9B"
KEYED = Principal(PrincipalKind.KEY, "fk_test", WALLET, "addr")


@dataclass
class Balances:
    """Holds on an in-memory balance with the ledger's rule (min(maximum, available))."""

    balance: Decimal
    holds: dict[str, Decimal] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

    async def take(
        self, *, wallet: str, hold_id: str, minimum: Decimal, maximum: Decimal
    ) -> Decimal:
        available = self.balance - sum(self.holds.values())
        if available < minimum:
            raise InsufficientBalance(f"balance {available} $FAR available")
        self.holds[hold_id] = held = min(maximum, available)
        return held

    async def release(self, hold_id: str) -> None:
        self.holds.pop(hold_id)
        self.released.append(hold_id)


async def test_a_hold_covers_the_most_a_request_can_cost_and_bounds_it() -> None:
    balances = Balances(Decimal("0.0005"))  # 5 tokens at PRICE, no prompt price
    h = harness(FakeBackend(reply="abcdefghij"), principal=KEYED, holds=balances, auth="required")
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi", "max_new_tokens": 8})
    await h.finish_running()
    (finished,) = h.recorder.of(RequestFinished)
    assert finished.context.held_far == Decimal("0.0005")
    assert finished.context.wallet == WALLET
    assert finished.settlement.completion_tokens == 5  # stopped by the hold, not at 8
    assert h.of_type("done")[0]["finish_reason"] == "budget"
    (stopped,) = h.of_type("error")
    assert stopped["message"] == "the request used up the prepaid balance held for it"


async def test_an_empty_balance_is_refused_before_the_mesh() -> None:
    h = harness(principal=KEYED, holds=Balances(Decimal(0)), auth="required")
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi"})
    assert [f["code"] for f in h.of_type("error")] == ["insufficient_balance"]
    assert h.backend.sessions[0].tokens_sent == 0
    assert h.recorder.started_or_finished == []


async def test_a_hold_is_given_back_when_admission_fails_after_it() -> None:
    balances = Balances(Decimal(1))
    h = harness(principal=KEYED, holds=balances, auth="required")
    take = balances.take

    async def take_then_stop(**kwargs: Any) -> Decimal:
        held = await take(**kwargs)
        h.engine.sessions.stopping = True  # shutdown begins during admission
        return held

    balances.take = take_then_stop  # type: ignore[method-assign]
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "t", "text": "hi"})
    assert [f["code"] for f in h.of_type("error")] == ["shutting_down"]
    assert (balances.holds, len(balances.released)) == ({}, 1)


async def test_anonymous_use_has_a_daily_free_quota() -> None:
    h = harness(FakeBackend(reply="abcdefghij"), auth="optional", anonymous_tokens_per_day=70)
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "1", "text": "hi", "max_new_tokens": 100})
    await h.finish_running()
    done = h.of_type("done")[0]
    used = done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    assert done["finish_reason"] == "length"  # max_new_tokens was cut to what was left
    assert used == 70  # a 65-token prompt plus the 5 tokens left
    await h.engine.free_tokens.aclose()  # the usage is counted in the background
    h.take()
    await h.send({"type": "turn", "request_id": "2", "text": "hi"})
    (refused,) = h.of_type("error")
    assert refused["code"] == "quota_exceeded"
    assert 0 < refused["retry_after_s"] <= 86400
    (finished,) = h.recorder.of(RequestFinished)
    assert (finished.context.wallet, finished.context.principal_id) == (None, "anonymous")


async def test_a_request_refused_for_its_balance_uses_no_rate_token() -> None:
    balances = Balances(Decimal(0))
    h = harness(principal=KEYED, holds=balances, auth="required", requests_burst=1)
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "a", "text": "hi"})
    balances.balance = Decimal(1)  # `farmesh-ws ledger credit`
    await h.send({"type": "turn", "request_id": "b", "text": "hi"})
    await h.finish_running()
    assert [f["code"] for f in h.of_type("error")] == ["insufficient_balance"]
    assert h.of_type("done")[0]["request_id"] == "b"


async def test_a_rate_limited_request_gives_its_hold_back() -> None:
    balances = Balances(Decimal(1))
    h = harness(principal=KEYED, holds=balances, auth="required", requests_burst=1)
    await h.send({"type": "open"})
    await h.send({"type": "turn", "request_id": "a", "text": "hi", "max_new_tokens": 1})
    await h.finish_running()
    await h.send({"type": "turn", "request_id": "b", "text": "hi"})
    assert [f["code"] for f in h.of_type("error")] == ["rate_limited"]
    assert list(balances.holds) == [h.recorder.of(RequestFinished)[0].context.hold_id]
    assert len(balances.released) == 1
