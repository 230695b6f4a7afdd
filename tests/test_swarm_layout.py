"""Pure parts of the swarm: block spans, payout wallets per server."""

from pathlib import Path

import pytest

from farmesh_ws.swarm import SwarmConfig, SwarmModel, even_spans, parse_span
from farmesh_ws.swarm_command import parse_payout_wallets


def test_even_split_of_30_blocks() -> None:
    assert even_spans(30, 2) == ["0:15", "15:30"]
    assert even_spans(30, 4) == ["0:8", "8:16", "16:23", "23:30"]


@pytest.mark.parametrize("servers", [0, 31])
def test_impossible_split_is_refused(servers: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        even_spans(30, servers)


@pytest.mark.parametrize("span", ["0-15", "a:b", "15:15", "20:31", "-1:3"])
def test_bad_spans_are_refused(span: str) -> None:
    with pytest.raises(ValueError, match="span"):
        parse_span(span, 30)


WALLET = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
OTHER = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"


def test_payout_wallets_for_every_server_and_per_server() -> None:
    pairs = parse_payout_wallets([WALLET.lower(), f"server1={OTHER}"])
    assert pairs == (("", WALLET), ("server1", OTHER))
    config = SwarmConfig(Path("m"), "p", 30, Path("logs"), payout_wallets=pairs)
    assert [config.payout_wallet(name) for name in ("server0", "server1")] == [WALLET, OTHER]
    assert SwarmConfig(Path("m"), "p", 30, Path("logs")).payout_wallet("server0") is None
    assert config.identity_dir == Path("logs/identities")


@pytest.mark.parametrize("values", [["server0=far1"], [WALLET, OTHER]])
def test_bad_payout_wallets_are_refused(values: list[str]) -> None:
    with pytest.raises(ValueError, match=r"Ethereum address|twice"):
        parse_payout_wallets(values)


def test_another_model_gets_one_server_for_all_its_blocks_unless_spans_say() -> None:
    model = SwarmModel(Path("/m"), "tiny", 6)
    assert model.server_spans() == ["0:6"]
    assert SwarmModel(Path("/m"), "tiny", 6, ("0:3", "3:6")).server_spans() == ["0:3", "3:6"]
    with pytest.raises(ValueError, match="outside"):
        SwarmModel(Path("/m"), "tiny", 6, ("0:7",)).server_spans()
