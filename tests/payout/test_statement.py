"""Payout statements: what verifies, and every way one must not (libp2p peer-id spec)."""

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hivemind.p2p import P2P, PeerID

from farmesh_ws.payout.identity import IdentityError, load_identity
from farmesh_ws.payout.statement import (
    InvalidStatement,
    PayoutStatement,
    peer_id_of,
    public_key_bytes,
    sign_statement,
    verify_statement,
)

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"
OTHER_WALLET = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity") / "server.key"
    P2P.generate_identity(str(path))
    return path


@pytest.fixture(scope="module")
def rsa_key(identity_file: Path) -> rsa.RSAPrivateKey:
    key = load_identity(identity_file)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def test_a_hivemind_identity_file_keeps_its_peer_id(identity_file: Path) -> None:
    """The file is hivemind's own (P2P.generate_identity), and the peer id we derive is the
    one hivemind derives for it, however often it is read."""
    derived = peer_id_of(public_key_bytes(load_identity(identity_file)))
    assert derived == PeerID.from_identity(identity_file.read_bytes()).to_base58()
    assert derived.startswith("Qm")
    assert peer_id_of(public_key_bytes(load_identity(identity_file))) == derived


def test_a_statement_signed_by_the_identity_key_verifies(rsa_key: rsa.RSAPrivateKey) -> None:
    statement = sign_statement(rsa_key, WALLET.lower(), issued_at=1_800_000_000)
    parsed = PayoutStatement.from_json(statement.to_json())
    verify_statement(parsed)
    assert (parsed.wallet, parsed.issued_at) == (WALLET, 1_800_000_000)


def test_an_ed25519_statement_verifies_with_an_inline_peer_id() -> None:
    statement = sign_statement(ed25519.Ed25519PrivateKey.generate(), WALLET, issued_at=1)
    verify_statement(PayoutStatement.from_json(statement.to_json()))
    assert statement.peer_id.startswith("12D3KooW")


def test_a_signature_by_another_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    genuine = sign_statement(rsa_key, WALLET, issued_at=1)
    intruder = sign_statement(rsa.generate_private_key(65537, 2048), WALLET, issued_at=1)
    forged = dataclasses.replace(genuine, signature=intruder.signature)
    with pytest.raises(InvalidStatement, match="signature"):
        verify_statement(forged)


def test_a_tampered_wallet_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    genuine = sign_statement(rsa_key, WALLET, issued_at=1)
    with pytest.raises(InvalidStatement, match="signature"):
        verify_statement(dataclasses.replace(genuine, wallet=OTHER_WALLET))
    with pytest.raises(InvalidStatement, match="signature"):
        verify_statement(dataclasses.replace(genuine, issued_at=2))


def test_a_peer_id_the_key_does_not_derive_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """A valid statement of one key, claimed for another peer id: however the attacker signs,
    the public key must hash to the peer id."""
    victim = sign_statement(rsa_key, WALLET, issued_at=1).peer_id
    attacker = rsa.generate_private_key(65537, 2048)
    claimed = sign_statement(attacker, OTHER_WALLET, issued_at=1)
    with pytest.raises(InvalidStatement, match="derive"):
        verify_statement(dataclasses.replace(claimed, peer_id=victim))
    swapped_key = dataclasses.replace(claimed, public_key=public_key_bytes(rsa_key))
    with pytest.raises(InvalidStatement, match="derive"):
        verify_statement(swapped_key)


def test_a_wallet_not_in_eip55_form_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    statement = sign_statement(rsa_key, WALLET, issued_at=1)
    with pytest.raises(InvalidStatement, match="EIP-55"):
        verify_statement(dataclasses.replace(statement, wallet=WALLET.lower()))


def test_a_short_rsa_key_is_refused_as_the_spec_requires() -> None:
    weak = sign_statement(rsa.generate_private_key(65537, 1024), WALLET, issued_at=1)
    with pytest.raises(InvalidStatement, match="2048"):
        verify_statement(weak)


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"version": 2},
        {"version": 1, "peer_id": 1, "wallet": WALLET},
        {"version": 1, "peer_id": "Qm", "wallet": WALLET, "issued_at": "1"},
        {"version": 1, "peer_id": "Qm", "wallet": WALLET, "issued_at": 1, "public_key": "%%"},
        {
            "version": 1,
            "peer_id": "Qm",
            "wallet": WALLET,
            "issued_at": 1,
            "public_key": "AAAA",
            "signature": None,
        },
    ],
)
def test_malformed_statements_are_refused(value: object) -> None:
    with pytest.raises(InvalidStatement):
        PayoutStatement.from_json(value)


def test_a_garbage_public_key_is_refused() -> None:
    statement = PayoutStatement("Qm", WALLET, b"\x08\x07\x12\x00", 1, b"")
    with pytest.raises(InvalidStatement):
        verify_statement(dataclasses.replace(statement, peer_id=peer_id_of(statement.public_key)))


def test_a_bad_wallet_cannot_be_signed(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="Ethereum address"):
        sign_statement(rsa_key, "far1wallet", issued_at=1)


def test_an_unreadable_identity_file_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_bytes(b"\xff\xfe not a key")
    with pytest.raises(IdentityError):
        load_identity(tmp_path / "bad.key")
