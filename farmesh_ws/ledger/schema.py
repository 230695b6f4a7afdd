"""The ledger schema and its versioned migrations (SQLite and PostgreSQL alike).

Money columns are ``*_far_e8`` BIGINTs: exact integer counts of 10⁻⁸ $FAR (see money.py).
Times are Unix seconds. The views are the contract with the Payment Tracker (README, "Ledger").
Version 2 adds ``api_keys`` (README, "API keys"); version 3 prepaid balances (``balances``,
``balance_holds``, ``balance_credits``: amounts in ``*_e8`` BIGINTs too, see balances.py) and
who opened each session (``inference_sessions.principal``, ``client_address_hash``); version 4
a key's own caps (``api_keys.max_*``, ``requests_per_minute``); version 5 payout identity
(``node_contributions.payout_wallet`` and ``payout_bound``, the ``payout_earnings`` view:
farmesh_ws/payout/); version 6 verified work (``node_flags``, ``node_checks``, the
``contribution_status`` view, and ``payout_earnings`` without withheld work:
farmesh_ws/mesh/spot_check.py, farmesh_ws/ledger/integrity.py).
Migrations are append-only: a database at any version upgrades in place by applying the later
ones. A migration runs in one transaction and records its version, so a restarted or second
process applies nothing twice.
"""

from typing import Any

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS inference_sessions (
                session_id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                wallet TEXT,
                model_id TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                ended_at DOUBLE PRECISION,
                turns INTEGER NOT NULL DEFAULT 0,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                cached_tokens BIGINT NOT NULL DEFAULT 0,
                cost_far_e8 BIGINT NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE IF NOT EXISTS turns (
                session_id TEXT NOT NULL REFERENCES inference_sessions (session_id),
                request_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                wallet TEXT,
                model_id TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                ended_at DOUBLE PRECISION NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                cached_tokens BIGINT NOT NULL,
                finish_reason TEXT NOT NULL,
                cost_far_e8 BIGINT NOT NULL CHECK (cost_far_e8 >= 0),
                ttft_ms DOUBLE PRECISION,
                duration_ms DOUBLE PRECISION,
                PRIMARY KEY (session_id, request_id)
            )""",
            """CREATE TABLE IF NOT EXISTS node_contributions (
                session_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                peer_id TEXT NOT NULL,
                public_name TEXT,
                start_block INTEGER NOT NULL,
                end_block INTEGER NOT NULL,
                tokens BIGINT NOT NULL,
                replayed_tokens BIGINT NOT NULL,
                work BIGINT NOT NULL,
                share_far_e8 BIGINT NOT NULL CHECK (share_far_e8 >= 0),
                PRIMARY KEY (session_id, request_id, peer_id, start_block, end_block),
                FOREIGN KEY (session_id, request_id) REFERENCES turns (session_id, request_id)
            )""",
            "CREATE INDEX IF NOT EXISTS turns_wallet ON turns (wallet)",
            "CREATE INDEX IF NOT EXISTS node_contributions_peer ON node_contributions (peer_id)",
            """CREATE VIEW node_earnings AS
                SELECT peer_id,
                       MAX(public_name) AS public_name,
                       COUNT(*) AS spans,
                       SUM(tokens) AS tokens,
                       SUM(replayed_tokens) AS replayed_tokens,
                       SUM(work) AS work,
                       SUM(share_far_e8) AS earned_far_e8
                FROM node_contributions
                GROUP BY peer_id""",
            """CREATE VIEW wallet_spend AS
                SELECT COALESCE(wallet, '') AS wallet,
                       COUNT(DISTINCT session_id) AS sessions,
                       COUNT(*) AS turns,
                       SUM(prompt_tokens) AS prompt_tokens,
                       SUM(completion_tokens) AS completion_tokens,
                       SUM(cost_far_e8) AS spent_far_e8
                FROM turns
                GROUP BY COALESCE(wallet, '')""",
        ),
    ),
    (
        2,
        (
            # API keys (keys.py): the public key id, the SHA-256 (hex) of the secret, never the
            # key; revoked_at is NULL while the key is active. The primary key is the lookup.
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                secret_sha256 TEXT NOT NULL CHECK (length(secret_sha256) = 64),
                wallet TEXT NOT NULL,
                name TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            "CREATE INDEX IF NOT EXISTS api_keys_wallet ON api_keys (wallet)",
        ),
    ),
    (
        3,
        (
            # Prepaid balances (balances.py). available = balance_e8 - held_e8; a wallet with no
            # row has balance 0. held_e8 is the sum of the wallet's unsettled holds.
            """CREATE TABLE IF NOT EXISTS balances (
                wallet TEXT PRIMARY KEY,
                balance_e8 BIGINT NOT NULL,
                held_e8 BIGINT NOT NULL DEFAULT 0,
                updated_at DOUBLE PRECISION NOT NULL,
                CHECK (0 <= held_e8 AND held_e8 <= balance_e8)
            )""",
            # One hold per request (hold_id = session_id:request_id), settled exactly once:
            # settled_at and charged_e8 stay NULL until then.
            """CREATE TABLE IF NOT EXISTS balance_holds (
                hold_id TEXT PRIMARY KEY,
                wallet TEXT NOT NULL REFERENCES balances (wallet),
                amount_e8 BIGINT NOT NULL CHECK (amount_e8 > 0),
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                settled_at DOUBLE PRECISION,
                charged_e8 BIGINT CHECK (0 <= charged_e8 AND charged_e8 <= amount_e8)
            )""",
            """CREATE INDEX IF NOT EXISTS balance_holds_open ON balance_holds (expires_at)
                WHERE settled_at IS NULL""",
            # Audit trail of every credit, in the transaction that adds it to the balance.
            """CREATE TABLE IF NOT EXISTS balance_credits (
                id TEXT PRIMARY KEY,
                wallet TEXT NOT NULL,
                amount_e8 BIGINT NOT NULL CHECK (amount_e8 > 0),
                note TEXT,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS balance_credits_wallet ON balance_credits (wallet)",
            # Who opened a session: a principal id (key:fk_..., wallet:0x..., anonymous, open)
            # and the keyed hash of the client's address; NULL for sessions stored before v3.
            "ALTER TABLE inference_sessions ADD COLUMN principal TEXT",
            "ALTER TABLE inference_sessions ADD COLUMN client_address_hash TEXT",
        ),
    ),
    (
        4,
        (
            # A key's own caps (keys.py, protocol.md §9); NULL keeps the configured value.
            "ALTER TABLE api_keys ADD COLUMN max_connections INTEGER",
            "ALTER TABLE api_keys ADD COLUMN max_requests INTEGER",
            "ALTER TABLE api_keys ADD COLUMN max_sessions INTEGER",
            "ALTER TABLE api_keys ADD COLUMN max_reserved_tokens INTEGER",
            "ALTER TABLE api_keys ADD COLUMN requests_per_minute DOUBLE PRECISION",
        ),
    ),
    (
        5,
        (
            # The EIP-55 wallet the node proved with its identity key when the turn was settled
            # (payout_bound true), else NULL: the share is owed to the peer id (payout_bound
            # false). Rows stored before version 5 are unbound.
            "ALTER TABLE node_contributions ADD COLUMN payout_wallet TEXT",
            "ALTER TABLE node_contributions ADD COLUMN payout_bound BOOLEAN NOT NULL DEFAULT FALSE",
            """CREATE INDEX IF NOT EXISTS node_contributions_payout
                ON node_contributions (payout_wallet)""",
            # Earnings per payee and peer id: a bound wallet's rows across its peer ids and
            # restarts, and each unbound peer id's rows (payout_wallet NULL).
            """CREATE VIEW payout_earnings AS
                SELECT payout_wallet,
                       peer_id,
                       MAX(public_name) AS public_name,
                       COUNT(*) AS spans,
                       SUM(tokens) AS tokens,
                       SUM(replayed_tokens) AS replayed_tokens,
                       SUM(work) AS work,
                       SUM(share_far_e8) AS earned_far_e8
                FROM node_contributions
                GROUP BY payout_wallet, peer_id""",
        ),
    ),
    (
        6,
        (
            # A node caught by a spot check (kind tampered_output; withheld_since: its last
            # passed check, 0 if none) or whose announced throughput is implausible (kind
            # implausible_throughput; withheld_since NULL: nothing withheld).
            """CREATE TABLE IF NOT EXISTS node_flags (
                flag_id TEXT PRIMARY KEY,
                peer_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                flagged_at DOUBLE PRECISION NOT NULL,
                step BIGINT NOT NULL,
                evidence TEXT NOT NULL,
                withheld_since DOUBLE PRECISION
            )""",
            "CREATE INDEX IF NOT EXISTS node_flags_peer ON node_flags (peer_id)",
            # Passed spot checks per node, and the time of the last one.
            """CREATE TABLE IF NOT EXISTS node_checks (
                peer_id TEXT PRIMARY KEY,
                passed_checks BIGINT NOT NULL,
                last_passed_at DOUBLE PRECISION NOT NULL
            )""",
            # Each contribution's status by its turn's end: withheld (its node was flagged for
            # tampering and the turn ended after the node's last passed check), verified (a
            # later check passed), else unverified.
            """CREATE VIEW contribution_status AS
                SELECT c.*,
                       t.ended_at,
                       CASE
                         WHEN EXISTS (SELECT 1 FROM node_flags f
                                      WHERE f.peer_id = c.peer_id
                                        AND f.withheld_since IS NOT NULL
                                        AND t.ended_at > f.withheld_since) THEN 'withheld'
                         WHEN EXISTS (SELECT 1 FROM node_checks k
                                      WHERE k.peer_id = c.peer_id
                                        AND t.ended_at <= k.last_passed_at) THEN 'verified'
                         ELSE 'unverified'
                       END AS status
                FROM node_contributions c
                JOIN turns t ON t.session_id = c.session_id AND t.request_id = c.request_id""",
            "DROP VIEW payout_earnings",
            # As in version 5, but earned_far_e8 leaves withheld work out (withheld_far_e8).
            """CREATE VIEW payout_earnings AS
                SELECT payout_wallet,
                       peer_id,
                       MAX(public_name) AS public_name,
                       COUNT(*) AS spans,
                       SUM(tokens) AS tokens,
                       SUM(replayed_tokens) AS replayed_tokens,
                       SUM(work) AS work,
                       SUM(CASE WHEN status = 'verified' THEN work ELSE 0 END) AS verified_work,
                       SUM(CASE WHEN status = 'withheld' THEN work ELSE 0 END) AS withheld_work,
                       SUM(CASE WHEN status = 'withheld' THEN 0 ELSE share_far_e8 END)
                         AS earned_far_e8,
                       SUM(CASE WHEN status = 'withheld' THEN share_far_e8 ELSE 0 END)
                         AS withheld_far_e8
                FROM contribution_status
                GROUP BY payout_wallet, peer_id""",
        ),
    ),
)

_CREATE_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)"""


async def migrate(database: Any, now: float) -> list[int]:
    """Apply every migration not applied yet; return the versions applied now."""
    await database.execute(_CREATE_VERSIONS)
    applied = []
    for version, statements in MIGRATIONS:
        async with database.transaction():
            done = await database.fetch_val(
                "SELECT COUNT(*) FROM schema_migrations WHERE version = :version",
                {"version": version},
            )
            if done:
                continue
            for statement in statements:
                await database.execute(statement)
            await database.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (:version, :now)",
                {"version": version, "now": now},
            )
            applied.append(version)
    return applied
