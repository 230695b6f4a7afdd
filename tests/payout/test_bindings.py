"""The coordinator's binding cache: TTL, freshness, newest wins, bad statements ignored."""

import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from farmesh_ws.payout.bindings import BindingPolicy, PayoutBindings
from farmesh_ws.payout.statement import sign_statement

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
OTHER_WALLET = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"
NOW = 1_800_000_000.0
POLICY = BindingPolicy(ttl_s=60, fetch_timeout_s=1, max_age_s=3600, max_clock_skew_s=300)


class Source:
    """What the DHT would hold, as stored values; counts fetches."""

    def __init__(self, *values: object) -> None:
        self.values = list(values)
        self.fetches = 0
        self.fail = False

    def __call__(self, timeout_s: float) -> list[object]:
        assert timeout_s == POLICY.fetch_timeout_s
        self.fetches += 1
        if self.fail:
            raise TimeoutError("no answer")
        return list(self.values)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


KEY = ed25519.Ed25519PrivateKey.generate()


def _statement(wallet: str = WALLET, issued_at: float = NOW) -> dict[str, object]:
    return sign_statement(KEY, wallet, int(issued_at)).to_json()


def test_bindings_are_fetched_once_per_ttl() -> None:
    source, clock = Source(_statement()), Clock()
    bindings = PayoutBindings(source, POLICY, clock=clock)
    peer = str(_statement()["peer_id"])
    assert bindings.wallets([peer, "QmUnbound"]) == {peer: WALLET}
    clock.now += 59
    source.values = [_statement(OTHER_WALLET, clock.now)]
    assert bindings.wallets([peer]) == {peer: WALLET}
    assert source.fetches == 1
    clock.now += 1
    assert bindings.wallets([peer]) == {peer: OTHER_WALLET}
    assert source.fetches == 2


def test_the_newest_statement_of_a_peer_wins() -> None:
    older, newer = _statement(OTHER_WALLET, NOW - 10), _statement(WALLET, NOW - 5)
    bindings = PayoutBindings(Source(newer, older), POLICY, clock=Clock())
    assert bindings.wallets([str(older["peer_id"])]) == {str(older["peer_id"]): WALLET}


@pytest.mark.parametrize("issued_at", [NOW - 3601, NOW + 301])
def test_a_statement_outside_the_freshness_window_proves_nothing(issued_at: float) -> None:
    bindings = PayoutBindings(Source(_statement(issued_at=issued_at)), POLICY, clock=Clock())
    assert bindings.wallets([str(_statement()["peer_id"])]) == {}


def test_a_binding_expires_with_max_age_even_without_a_new_fetch() -> None:
    source, clock = Source(_statement()), Clock()
    bindings = PayoutBindings(source, POLICY, clock=clock)
    peer = str(_statement()["peer_id"])
    assert bindings.wallets([peer]) == {peer: WALLET}
    source.fail = True
    clock.now += 3601
    assert bindings.wallets([peer]) == {}


def test_a_failed_fetch_keeps_the_verified_bindings(caplog: pytest.LogCaptureFixture) -> None:
    source, clock = Source(_statement()), Clock()
    bindings = PayoutBindings(source, POLICY, clock=clock)
    peer = str(_statement()["peer_id"])
    bindings.wallets([peer])
    source.fail, clock.now = True, clock.now + 60
    with caplog.at_level(logging.WARNING, "farmesh_ws.payout.bindings"):
        assert bindings.wallets([peer]) == {peer: WALLET}
    assert "TimeoutError" in caplog.text


def test_a_forged_statement_is_ignored_and_logged_once_without_key_material(
    caplog: pytest.LogCaptureFixture,
) -> None:
    genuine = _statement()
    forged = {**genuine, "wallet": OTHER_WALLET}
    source, clock = Source(forged, "not a statement"), Clock()
    bindings = PayoutBindings(source, POLICY, clock=clock)
    with caplog.at_level(logging.WARNING, "farmesh_ws.payout.bindings"):
        assert bindings.wallets([str(genuine["peer_id"])]) == {}
        clock.now += 60
        assert bindings.wallets([str(genuine["peer_id"])]) == {}
    assert source.fetches == 2
    warnings = [r.getMessage() for r in caplog.records if "signature" in r.getMessage()]
    assert len(warnings) == 1
    assert str(genuine["peer_id"]) in warnings[0]
    assert str(genuine["signature"]) not in caplog.text
    assert str(genuine["public_key"]) not in caplog.text
