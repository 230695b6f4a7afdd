"""API keys bound to a wallet, stored hashed in the ledger database (issue 9, identity).

A key looks like ``fmk_fk_0123456789abcdef_<43 characters>``: the prefix ``fmk_``, the public
key id (``fk_`` and 16 hex digits, the ``api_keys`` primary key) and ``_``, then a 256-bit secret
from :func:`secrets.token_urlsafe` (43 URL-safe base64 characters). Every part has a fixed
length, so the secret may itself contain ``_`` or ``-`` and the key still splits one way only.
The plaintext key is returned once by :func:`create_key` and never stored or logged.

The secret is stored as its SHA-256 (hex), compared with :func:`hmac.compare_digest`. A fast
hash is right for a random 256-bit token, and a slow salted password hash would buy nothing:

- OWASP's Password Storage Cheat Sheet asks for Argon2id/scrypt/bcrypt because stolen hashes of
  human-chosen passwords are brute-forced offline, so each guess must be made expensive; 2²⁵⁶
  random secrets cannot be enumerated at any hash speed.
- NIST SP 800-63B-3 §5.1.2.2: look-up secrets of at least 112 bits of entropy "SHALL be hashed
  with an approved one-way function"; only weaker ones need a salted key derivation function
  (look-up secrets are single-use, so this is the closest rule NIST states, not the same case).
- GitHub stores the SHA-256 digest of OAuth tokens while hashing passwords with bcrypt
  (developer.github.com/changes/2014-12-08-removing-authorizations-token); its token prefixes with
  a ``_`` separator ("Behind GitHub's new authentication token formats", 2021) are why keys start
  ``fmk_``, which secret scanners can recognise.

A fast hash also keeps :func:`authenticate` to one primary-key lookup plus one digest per request.

A key may carry its own caps (:class:`~farmesh_ws.core.principal.Limits`: connections,
running requests, sessions, reserved context tokens, requests per minute), which replace the
configured per-principal ones for that key (protocol.md §9). Which key opened a session is
recorded (``inference_sessions.principal``, ``key:<key id>``), so a wallet's charges can be
listed by key (``balances.charges``, ``farmesh-ws ledger charges``).

Errors: a bad wallet, name or key id raises :class:`KeyRequestError` (an unknown key id,
:class:`UnknownKey`); a database failure raises :class:`LedgerUnavailable`.
"""

import hashlib
import hmac
import math
import re
import secrets
import time
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from farmesh_ws.core.principal import NO_LIMITS, Limits
from farmesh_ws.ledger.store import Ledger, guarded
from farmesh_ws.protocol import Wallet

KEY_PREFIX = "fmk_"
_KEY_ID = re.compile(r"fk_[0-9a-f]{16}")
_KEY = re.compile(r"fmk_(fk_[0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_SECRET_BYTES = 32
_NAME_MAX_CHARS = 128
_LIMIT_COLUMNS = tuple(field.name for field in fields(Limits))
_COLUMNS = "key_id, wallet, name, created_at, revoked_at, " + ", ".join(_LIMIT_COLUMNS)


class KeyRequestError(ValueError):
    """A keys request the store refuses; the message is one line and never holds a secret."""


class UnknownKey(KeyRequestError):
    """No key has this id."""


@dataclass(frozen=True, slots=True)
class KeyPrincipal:
    """Who presented a valid, unrevoked key: the key id, the wallet it bills to, its caps."""

    key_id: str
    wallet: str
    name: str | None
    limits: Limits = NO_LIMITS


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One stored key without its secret; times are Unix seconds, ``revoked_at`` None if active."""

    key_id: str
    wallet: str
    name: str | None
    created_at: float
    revoked_at: float | None
    limits: Limits = NO_LIMITS


async def create_key(
    ledger: Ledger,
    wallet: str,
    name: str | None = None,
    *,
    limits: Limits = NO_LIMITS,
    now: float | None = None,
) -> tuple[str, str]:
    """Store a new key for ``wallet`` with its own ``limits``; return ``(key_id, plaintext_key)``.

    The plaintext is returned here only; the database keeps the SHA-256 of the secret. A key id
    collision (64 random bits) is refused by the primary key rather than overwriting a key.
    Raises KeyRequestError for a bad wallet, name or limit (each must be positive),
    LedgerUnavailable if the write fails.
    """
    _check_wallet(wallet)
    for limit_name in _LIMIT_COLUMNS:
        value = getattr(limits, limit_name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise KeyRequestError(f"{limit_name} must be positive")
    if name is not None and not (0 < len(name) <= _NAME_MAX_CHARS and name.isprintable()):
        raise KeyRequestError(f"name must be 1-{_NAME_MAX_CHARS} printable characters")
    key_id = f"fk_{secrets.token_hex(8)}"
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    async with guarded("write"):
        await ledger.database.execute(
            f"""INSERT INTO api_keys (key_id, secret_sha256, wallet, name, created_at,
                                     {", ".join(_LIMIT_COLUMNS)})
               VALUES (:key_id, :secret_sha256, :wallet, :name, :created_at,
                       {", ".join(":" + column for column in _LIMIT_COLUMNS)})""",
            {
                "key_id": key_id,
                "secret_sha256": _digest(secret),
                "wallet": wallet,
                "name": name,
                "created_at": time.time() if now is None else now,
                **{column: getattr(limits, column) for column in _LIMIT_COLUMNS},
            },
        )
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


async def list_keys(ledger: Ledger, wallet: str | None = None) -> list[KeyInfo]:
    """Every key (or ``wallet``'s), oldest first, without secrets or their hashes.

    Raises KeyRequestError for a bad wallet, LedgerUnavailable if the query fails.
    """
    query = f"SELECT {_COLUMNS} FROM api_keys"
    values: dict[str, Any] = {}
    if wallet is not None:
        _check_wallet(wallet)
        query += " WHERE wallet = :wallet"
        values["wallet"] = wallet
    async with guarded("query"):
        rows = await ledger.database.fetch_all(query + " ORDER BY created_at, key_id", values)
    return [_info(row) for row in rows]


async def revoke_key(ledger: Ledger, key_id: str, *, now: float | None = None) -> KeyInfo:
    """Revoke ``key_id`` so it no longer authenticates; return the key as stored now.

    Revoking a revoked key changes nothing (``revoked_at`` keeps its first value). Raises
    KeyRequestError if ``key_id`` is not of the form ``fk_`` + 16 hex digits (the argument is
    not echoed: it might be a whole key), UnknownKey if no key has that id, LedgerUnavailable if
    the write fails.
    """
    if not _KEY_ID.fullmatch(key_id):
        raise KeyRequestError("not a key id (expected fk_ and 16 hex digits)")
    async with guarded("write"):
        row = await ledger.database.fetch_one(
            f"""UPDATE api_keys SET revoked_at = COALESCE(revoked_at, :now)
                WHERE key_id = :key_id RETURNING {_COLUMNS}""",
            {"key_id": key_id, "now": time.time() if now is None else now},
        )
    if row is None:
        raise UnknownKey(f"unknown key id {key_id}")
    return _info(row)


async def authenticate(ledger: Ledger, presented_key: str) -> KeyPrincipal | None:
    """The principal of a valid, unrevoked key, else None (malformed, unknown, wrong, revoked).

    One primary-key lookup by the key id parsed from the key, then a constant-time comparison of
    the secret's SHA-256. Whether a key id exists is not hidden (key ids are public). Raises
    LedgerUnavailable if the database cannot answer, so a caller can tell "refused" from "down".
    """
    match = _KEY.fullmatch(presented_key)
    if match is None:
        return None
    key_id, secret = match.groups()
    async with guarded("query"):
        row = await ledger.database.fetch_one(
            f"""SELECT secret_sha256, {_COLUMNS} FROM api_keys
               WHERE key_id = :key_id AND revoked_at IS NULL""",
            {"key_id": key_id},
        )
    if row is None or not hmac.compare_digest(row["secret_sha256"], _digest(secret)):
        return None
    return KeyPrincipal(key_id=key_id, wallet=row["wallet"], name=row["name"], limits=_limits(row))


def _check_wallet(wallet: str) -> None:
    """Protocol v1's wallet rule (``^[A-Za-z0-9_.:\\-]{1,128}\\Z``); 0x addresses match it."""
    try:
        msgspec.convert(wallet, Wallet)
    except msgspec.ValidationError:
        raise KeyRequestError(
            "wallet must be 1-128 characters of A-Z a-z 0-9 _ . : - (e.g. a 0x address)"
        ) from None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _info(row: Any) -> KeyInfo:
    revoked_at = row["revoked_at"]
    return KeyInfo(
        key_id=row["key_id"],
        wallet=row["wallet"],
        name=row["name"],
        created_at=float(row["created_at"]),
        revoked_at=None if revoked_at is None else float(revoked_at),
        limits=_limits(row),
    )


def _limits(row: Any) -> Limits:
    """A row's caps; a count comes back as an int, the rate as a float."""
    values = {column: row[column] for column in _LIMIT_COLUMNS}
    rate = values.pop("requests_per_minute")
    counts = {column: None if value is None else int(value) for column, value in values.items()}
    return Limits(**counts, requests_per_minute=None if rate is None else float(rate))
