"""Payout statements: a node's libp2p identity key binds a payout wallet to its peer id.

A statement is the JSON-compatible mapping (version 1)::

    {"version": 1, "peer_id": "Qm…" | "12D3KooW…", "wallet": "0x…" (EIP-55),
     "public_key": base64 of the libp2p ``PublicKey`` protobuf, "issued_at": Unix seconds (int),
     "signature": base64}

The signature covers ``SIGNING_DOMAIN`` followed by the canonical JSON (sorted keys, no
spaces) of the four fields ``peer_id``, ``wallet``, ``public_key`` and ``issued_at``; the
domain keeps a statement from ever being a valid signature of anything else. Keys and
signatures follow the libp2p peer-id spec (github.com/libp2p/specs, ``peer-ids/peer-ids.md``):

- ``PublicKey`` is the protobuf ``{key_type, data}``; RSA ``data`` is the DER
  SubjectPublicKeyInfo (at least 2048 bits), Ed25519 ``data`` the 32 raw bytes;
- RSA signs with RSASSA-PKCS1-v1_5 over SHA-256, Ed25519 as RFC 8032 does;
- the peer id is the multihash of the serialized ``PublicKey``: the identity multihash when it is
  at most 42 bytes (Ed25519: ``12D3KooW…``), else SHA-256 (RSA, what hivemind's identity files
  hold: ``Qm…``), in base58btc.

Signatures are made and checked by the ``cryptography`` package; the protobuf is hivemind's.
"""

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from google.protobuf.message import DecodeError
from hivemind.proto import crypto_pb2

from farmesh_ws.payout.wallet import checksum_wallet

STATEMENT_VERSION = 1
SIGNING_DOMAIN = b"farmesh-payout-binding/v1\n"
MIN_RSA_BITS = 2048  # libp2p peer-ids spec: "RSA keys ... MUST be at least 2048 bits"
_MAX_INLINE_KEY_BYTES = 42  # peer-ids spec: longer serialized keys are hashed with SHA-256
# multihash codes (github.com/multiformats/multicodec): identity and sha2-256; both lengths
# here are below 128, so each varint of the multihash header is one byte.
_IDENTITY_MULTIHASH = 0x00
_SHA2_256_MULTIHASH = 0x12

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class InvalidStatement(ValueError):
    """A payout statement that proves nothing: malformed, a key type other than RSA or Ed25519,
    a public key that does not derive the peer id, or a signature that does not verify. The
    message names the check that failed, never key material."""


@dataclass(frozen=True, slots=True)
class PayoutStatement:
    """A signed binding of ``wallet`` (EIP-55) to ``peer_id`` (base58); ``public_key`` is the
    serialized libp2p ``PublicKey``, ``signature`` its signature of :meth:`signed_bytes`."""

    peer_id: str
    wallet: str
    public_key: bytes
    issued_at: int
    signature: bytes

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.peer_id, self.wallet, self.public_key, self.issued_at)

    def to_json(self) -> dict[str, Any]:
        """The wire form (the module docstring's mapping), storable in the DHT as it is."""
        return {
            "version": STATEMENT_VERSION,
            "peer_id": self.peer_id,
            "wallet": self.wallet,
            "public_key": base64.b64encode(self.public_key).decode(),
            "issued_at": self.issued_at,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, data: object) -> "PayoutStatement":
        """Parse the wire form; raises :class:`InvalidStatement` for any other shape."""
        if not isinstance(data, Mapping) or data.get("version") != STATEMENT_VERSION:
            raise InvalidStatement("not a version 1 payout statement")
        peer_id, wallet, issued_at = data.get("peer_id"), data.get("wallet"), data.get("issued_at")
        if not (isinstance(peer_id, str) and isinstance(wallet, str)):
            raise InvalidStatement("peer_id and wallet must be strings")
        if not isinstance(issued_at, int) or isinstance(issued_at, bool):
            raise InvalidStatement("issued_at must be an integer")
        return cls(
            peer_id=peer_id,
            wallet=wallet,
            public_key=_b64(data.get("public_key"), "public_key"),
            issued_at=issued_at,
            signature=_b64(data.get("signature"), "signature"),
        )


def signed_bytes(peer_id: str, wallet: str, public_key: bytes, issued_at: int) -> bytes:
    """The exact bytes a statement's signature covers (module docstring)."""
    fields = {
        "issued_at": issued_at,
        "peer_id": peer_id,
        "public_key": base64.b64encode(public_key).decode(),
        "wallet": wallet,
    }
    return SIGNING_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def public_key_bytes(key: SigningKey | VerifyingKey) -> bytes:
    """The serialized libp2p ``PublicKey`` protobuf of a key (or of a private key's public half)."""
    public = key.public_key() if isinstance(key, SigningKey) else key
    if isinstance(public, rsa.RSAPublicKey):
        key_type, data = (
            crypto_pb2.RSA,
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    else:
        key_type, data = (
            crypto_pb2.Ed25519,
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        )
    message = crypto_pb2.PublicKey(key_type=key_type, data=data)
    return bytes(message.SerializeToString(deterministic=True))


def peer_id_of(public_key: bytes) -> str:
    """The base58 peer id a serialized libp2p ``PublicKey`` derives (peer-ids spec)."""
    if len(public_key) <= _MAX_INLINE_KEY_BYTES:
        code, digest = _IDENTITY_MULTIHASH, public_key
    else:
        code, digest = _SHA2_256_MULTIHASH, hashlib.sha256(public_key).digest()
    return str(base58.b58encode(bytes([code, len(digest)]) + digest).decode())


def sign_statement(key: SigningKey, wallet: str, issued_at: int) -> PayoutStatement:
    """A statement binding ``wallet`` to the peer id of ``key``, issued at ``issued_at`` (Unix
    seconds). Raises ValueError for a wallet that is not an Ethereum address."""
    wallet = checksum_wallet(wallet)
    public_key = public_key_bytes(key)
    peer_id = peer_id_of(public_key)
    message = signed_bytes(peer_id, wallet, public_key, issued_at)
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(message)
    return PayoutStatement(peer_id, wallet, public_key, issued_at, signature)


def verify_statement(statement: PayoutStatement) -> None:
    """Check that the public key derives the peer id, that the wallet is in EIP-55 form and
    that the signature verifies; raises :class:`InvalidStatement` otherwise. Freshness is the
    caller's rule (:class:`~farmesh_ws.payout.bindings.PayoutBindings`)."""
    if peer_id_of(statement.public_key) != statement.peer_id:
        raise InvalidStatement("the public key does not derive the peer id")
    try:
        canonical = checksum_wallet(statement.wallet)
    except ValueError:
        raise InvalidStatement("the wallet is not an Ethereum address") from None
    if canonical != statement.wallet:
        raise InvalidStatement("the wallet is not in its EIP-55 checksummed form")
    key = _load_public_key(statement.public_key)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(
                statement.signature, statement.signed_bytes(), padding.PKCS1v15(), hashes.SHA256()
            )
        else:
            key.verify(statement.signature, statement.signed_bytes())
    except InvalidSignature:
        raise InvalidStatement("the signature does not verify") from None


def _load_public_key(serialized: bytes) -> VerifyingKey:
    try:
        message = crypto_pb2.PublicKey.FromString(serialized)
    except DecodeError:
        raise InvalidStatement("the public key is not a libp2p PublicKey protobuf") from None
    try:
        if message.key_type == crypto_pb2.Ed25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(message.data)
        if message.key_type == crypto_pb2.RSA:
            key = serialization.load_der_public_key(message.data)
            if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
                return key
            raise InvalidStatement(f"the RSA key is not a key of at least {MIN_RSA_BITS} bits")
    except ValueError as exc:
        if isinstance(exc, InvalidStatement):
            raise
        raise InvalidStatement("the public key data does not decode") from None
    raise InvalidStatement("the key type is neither RSA nor Ed25519")


def _b64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidStatement(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise InvalidStatement(f"{name} is not valid base64") from None
