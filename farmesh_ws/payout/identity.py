"""A node's persistent libp2p identity: the private key file its p2p daemon runs with.

hivemind 1.1.x (``hivemind.p2p.P2P.create(identity_path=...)``, Petals' ``--identity_path``)
keeps the identity as a serialized libp2p ``PrivateKey`` protobuf whose ``key_type`` is RSA and
whose ``data`` is the 2048-bit key in PKCS#1 DER, mode 0400; the daemon loads it with ``-id``,
so the peer id (SHA-256 multihash of the public key, ``Qm…``) survives restarts. hivemind
creates the file itself when it is missing (``P2P.generate_identity``); this module reads it.
"""

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from google.protobuf.message import DecodeError
from hivemind.proto import crypto_pb2

from farmesh_ws.payout.statement import SigningKey


class IdentityError(ValueError):
    """An identity file that cannot be read as a libp2p RSA or Ed25519 private key."""


def load_identity(path: Path) -> SigningKey:
    """The private key of an identity file: RSA (PKCS#1 DER, as hivemind writes it) or
    Ed25519 (libp2p's 64 bytes: seed then public key). Raises :class:`IdentityError`."""
    try:
        message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise IdentityError(
            f"cannot read the identity file {path} ({type(exc).__name__})"
        ) from None
    try:
        key = _decode(message)
    except ValueError:
        key = None
    if key is None:
        raise IdentityError(f"{path} holds no RSA or Ed25519 libp2p private key")
    return key


def _decode(message: crypto_pb2.PrivateKey) -> SigningKey | None:
    if message.key_type == crypto_pb2.RSA:
        key = serialization.load_der_private_key(message.data, password=None)
        return key if isinstance(key, rsa.RSAPrivateKey) else None
    if message.key_type == crypto_pb2.Ed25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(message.data[:32])
    return None
