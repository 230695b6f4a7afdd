"""Settings: environment variables, overridden by CLI flags, frozen once read.

Every limit lives here with its unit in its name, and each maps to one environment
variable (``FARMESH_<NAME>`` unless a seed name is listed). A bad value raises
:class:`ConfigError` with one readable line; the CLI prints it and exits with code 2.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from eth_utils.address import is_address

from farmesh_ws.config_values import PARSERS, is_loopback
from farmesh_ws.core.money import Prices
from farmesh_ws.models import BUNDLED_MODEL_ID
from farmesh_ws.models.catalog import BUNDLED_TERMS, CatalogError, ModelTerms, load_catalog
from farmesh_ws.transport.compression import COMPRESSION_MODES
from farmesh_ws.transport.origin import parse_origin

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Seed names kept as they are; every other setting reads FARMESH_<UPPER_NAME>.
_SEED_ENV_NAMES = {
    "default_model_id": ("DEFAULT_MODEL_ID",),
    "price_per_token_far": ("PRICE_PER_TOKEN_FAR",),
    "dht_bootstrap": ("FAR_MESH_DHT_BOOTSTRAP",),
    "database_url": ("POSTGRES_URL", "DATABASE_URL"),
    "redis_url": ("REDIS_URL",),
    "log_level": ("LOG_LEVEL",),
}


AUTH_MODES = ("required", "optional", "off")
BALANCE_MODES = ("prepaid", "off")
_CAPS = (
    "max_connections_per_address",
    "max_pending_auth_per_address",
    "max_connections_per_principal",
    "max_requests_per_principal",
    "max_sessions_per_principal",
    "max_reserved_tokens_per_principal",
    "anonymous_max_connections",
    "anonymous_max_requests",
    "anonymous_max_sessions",
    "anonymous_max_reserved_tokens",
)


class ConfigError(ValueError):
    """A setting has a value farmesh_ws cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Defaults run the embedded local mesh on 127.0.0.1:8100."""

    host: str = "127.0.0.1"
    port: int = 8100
    http_port: int = -1
    """The OpenAI-compatible HTTP API's port (http.md); -1: the WebSocket port + 1 (0 when
    that is 0: any free port)."""
    default_model_id: str = BUNDLED_MODEL_ID
    models_file: str = ""
    """A TOML file of served models with their own prices and limits (models/catalog.py)."""
    models: tuple[ModelTerms, ...] = field(default=(BUNDLED_TERMS,), metadata={"env": False})
    """Read from ``models_file`` (not an environment variable of its own)."""
    price_per_token_far: Decimal = Decimal("0.0001")
    price_per_prompt_token_far: Decimal = Decimal(0)
    dht_bootstrap: tuple[str, ...] = ()
    database_url: str = field(default="", repr=False)
    redis_url: str = field(default="", repr=False)
    log_level: str = "INFO"
    allowed_origins: tuple[str, ...] = ()
    local_servers: int = 2
    max_connections: int = 1000
    max_frame_bytes: int = 65536
    max_text_chars: int = 16000
    max_consecutive_errors: int = 50
    # permessage-deflate on WebSocket connections (transport/compression.py; README "Settings").
    ws_compression: str = "deflate"
    ws_deflate_window_bits: int = 9
    ws_deflate_mem_level: int = 1
    requests_per_minute: float = 120.0
    requests_burst: int = 20
    default_max_length: int = 2048
    max_length_limit: int = 2048
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 1024
    max_concurrent_turns: int = 256
    idle_timeout_s: float = 300.0
    open_timeout_s: float = 30.0
    shutdown_grace_s: float = 30.0
    mesh_status_refresh_s: float = 5.0
    mesh_max_retries: int = 4
    mesh_min_backoff_s: float = 0.25
    mesh_request_timeout_s: float = 30.0
    mesh_connect_timeout_s: float = 5.0
    # Payout identity (README "Getting paid: binding a payout wallet").
    payout_binding_ttl_s: float = 60.0
    payout_fetch_timeout_s: float = 2.0
    payout_statement_max_age_s: float = 86400.0
    payout_max_clock_skew_s: float = 300.0
    local_payout_wallet: str = ""
    # Spot checks and plausibility (README "Verified work").
    spot_check_rate: float = 0.05
    spot_check_first_steps: int = 3
    spot_check_tolerance: float = 0.0
    spot_check_timeout_s: float = 30.0
    spot_check_max_background: int = 4
    plausibility_factor: float = 10.0
    plausibility_min_samples: int = 20
    # Identity and admission (README "Authentication and limits").
    auth: str = ""
    insecure_no_auth: bool = False
    auth_timeout_s: float = 10.0
    credential_recheck_s: float = 30.0
    address_hash_key: str = field(default="", repr=False)
    siwe_domain: str = ""
    siwe_chain_id: int = 1
    siwe_nonce_ttl_s: float = 300.0
    siwe_session_ttl_s: float = 3600.0
    siwe_nonces_per_minute: float = 30.0
    balances: str = "prepaid"
    balance_hold_ttl_s: float = 3600.0
    max_connections_per_address: int = 64
    max_pending_auth_per_address: int = 8
    max_connections_per_principal: int = 32
    max_requests_per_principal: int = 8
    max_sessions_per_principal: int = 16
    max_reserved_tokens_per_principal: int = 8192
    anonymous_max_connections: int = 8
    anonymous_max_requests: int = 2
    anonymous_max_sessions: int = 4
    anonymous_max_reserved_tokens: int = 4096
    anonymous_requests_per_minute: float = 30.0
    anonymous_tokens_per_day: int = 50000
    anonymous_max_cache_share: float = 0.5
    # Reuse of the mesh's attention caches for stateless requests (http.md §9).
    reuse_sessions_per_principal: int = 4
    reuse_max_sessions: int = 64
    reuse_ttl_s: float = 120.0
    reuse_max_length: int = 1024
    reuse_max_cache_share: float = 0.25
    # Sessions that outlive their connection (protocol.md §2.2).
    resume_grace_s: float = 60.0
    resume_outbox_frames: int = 2048
    # Sessions that move between gateways sharing the state store (protocol.md §2.3).
    coordinator_lease_s: float = 10.0

    @property
    def embedded_mesh(self) -> bool:
        """True when no bootstrap is configured: start the local swarm."""
        return not self.dht_bootstrap

    @property
    def loopback_bind(self) -> bool:
        """True when ``host`` accepts connections from this machine only."""
        return is_loopback(self.host)

    @property
    def auth_mode(self) -> str:
        """``required``, ``optional`` or ``off``: ``auth`` if set, else ``optional`` on a
        loopback bind (the quick start) and ``required`` on any other."""
        if self.auth:
            return self.auth
        return "optional" if self.loopback_bind else "required"

    @property
    def http_listen_port(self) -> int:
        """``http_port``, or the WebSocket port + 1 when it is not set (-1)."""
        if self.http_port >= 0:
            return self.http_port
        return self.port + 1 if self.port else 0

    @property
    def prices(self) -> Prices:
        """The gateway-wide prices: a model's own prices replace them (:meth:`prices_for`)."""
        return Prices(self.price_per_token_far, self.price_per_prompt_token_far)

    def _terms(self, model_id: str) -> ModelTerms:
        found = (terms for terms in self.models if terms.model_id == model_id)
        return next(found, ModelTerms(model_id, ""))

    def prices_for(self, model_id: str) -> Prices:
        """$FAR per generated and per prompt token of ``model_id`` (its own, else the
        gateway-wide prices)."""
        terms = self._terms(model_id)
        per_token, per_prompt = terms.price_per_token_far, terms.price_per_prompt_token_far
        return Prices(
            self.price_per_token_far if per_token is None else per_token,
            self.price_per_prompt_token_far if per_prompt is None else per_prompt,
        )

    def max_length_limit_for(self, model_id: str) -> int:
        """A session's longest ``max_length`` on ``model_id``: its own limit, never above
        the gateway-wide ``max_length_limit``."""
        own = self._terms(model_id).max_length_limit
        return min(own or self.max_length_limit, self.max_length_limit)

    def max_new_tokens_limit_for(self, model_id: str) -> int:
        """The most ``max_new_tokens`` of one request on ``model_id`` (as above)."""
        own = self._terms(model_id).max_new_tokens_limit
        return min(own or self.max_new_tokens_limit, self.max_new_tokens_limit)

    def with_overrides(self, **overrides: Any) -> "Settings":
        """Apply CLI overrides (``None`` means "not given"), then validate."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return _validated(replace(self, **given))


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables that set ``name``, in order of precedence."""
    return _SEED_ENV_NAMES.get(name, (f"FARMESH_{name.upper()}",))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the environment (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in fields(Settings):
        if setting.metadata.get("env") is False:
            continue
        for env_name in env_names(setting.name):
            raw = environ.get(env_name)
            if raw is None or raw == "":
                continue
            parser = PARSERS[setting.type]
            try:
                values[setting.name] = parser(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{env_name}: {exc}") from None
            break
    if values.get("models_file"):
        try:
            values["models"] = load_catalog(Path(values["models_file"]))
        except CatalogError as exc:
            raise ConfigError(f"FARMESH_MODELS_FILE: {exc}") from None
    return _validated(Settings(**values))


def _validated(settings: Settings) -> Settings:
    checks: list[tuple[bool, str]] = [
        (0 <= settings.port <= 65535, "port must be 0..65535"),
        (-1 <= settings.http_port <= 65535, "http_port must be 0..65535 (-1: port + 1)"),
        (settings.http_listen_port <= 65535, "port is 65535: set http_port"),
        (settings.price_per_token_far >= 0, "price_per_token_far must not be negative"),
        (
            settings.price_per_prompt_token_far >= 0,
            "price_per_prompt_token_far must not be negative",
        ),
        (settings.log_level.upper() in LOG_LEVELS, f"log_level must be one of {LOG_LEVELS}"),
        (settings.local_servers >= 1, "local_servers must be at least 1"),
        (settings.max_connections >= 1, "max_connections must be at least 1"),
        (settings.max_frame_bytes >= 1024, "max_frame_bytes must be at least 1024"),
        (settings.max_text_chars >= 1, "max_text_chars must be at least 1"),
        (settings.max_consecutive_errors >= 1, "max_consecutive_errors must be at least 1"),
        (
            settings.ws_compression in COMPRESSION_MODES,
            f"ws_compression must be one of {COMPRESSION_MODES}",
        ),
        (9 <= settings.ws_deflate_window_bits <= 15, "ws_deflate_window_bits must be 9..15"),
        (1 <= settings.ws_deflate_mem_level <= 9, "ws_deflate_mem_level must be 1..9"),
        (settings.requests_per_minute > 0, "requests_per_minute must be positive"),
        (settings.requests_burst >= 1, "requests_burst must be at least 1"),
        (settings.max_length_limit >= 16, "max_length_limit must be at least 16"),
        (
            1 <= settings.default_max_length <= settings.max_length_limit,
            "default_max_length must be between 1 and max_length_limit",
        ),
        (settings.max_new_tokens_limit >= 1, "max_new_tokens_limit must be at least 1"),
        (
            1 <= settings.default_max_new_tokens <= settings.max_new_tokens_limit,
            "default_max_new_tokens must be between 1 and max_new_tokens_limit",
        ),
        (settings.max_concurrent_turns >= 1, "max_concurrent_turns must be at least 1"),
        (settings.idle_timeout_s > 0, "idle_timeout_s must be positive"),
        (settings.open_timeout_s > 0, "open_timeout_s must be positive"),
        (settings.shutdown_grace_s >= 0, "shutdown_grace_s must not be negative"),
        (settings.mesh_status_refresh_s > 0, "mesh_status_refresh_s must be positive"),
        (settings.mesh_max_retries >= 1, "mesh_max_retries must be at least 1"),
        (settings.mesh_min_backoff_s >= 0, "mesh_min_backoff_s must not be negative"),
        (settings.mesh_request_timeout_s > 0, "mesh_request_timeout_s must be positive"),
        (settings.mesh_connect_timeout_s > 0, "mesh_connect_timeout_s must be positive"),
        (settings.payout_binding_ttl_s > 0, "payout_binding_ttl_s must be positive"),
        (settings.payout_fetch_timeout_s > 0, "payout_fetch_timeout_s must be positive"),
        (
            settings.payout_statement_max_age_s > 0,
            "payout_statement_max_age_s must be positive",
        ),
        (settings.payout_max_clock_skew_s >= 0, "payout_max_clock_skew_s must not be negative"),
        (
            not settings.local_payout_wallet or is_address(settings.local_payout_wallet),
            "local_payout_wallet must be an Ethereum address (0x and 40 hex digits)",
        ),
        (0 <= settings.spot_check_rate <= 1, "spot_check_rate must be between 0 and 1"),
        (settings.spot_check_first_steps >= 0, "spot_check_first_steps must not be negative"),
        (settings.spot_check_tolerance >= 0, "spot_check_tolerance must not be negative"),
        (settings.spot_check_timeout_s > 0, "spot_check_timeout_s must be positive"),
        (settings.spot_check_max_background >= 1, "spot_check_max_background must be at least 1"),
        (settings.plausibility_factor > 1, "plausibility_factor must be above 1"),
        (settings.plausibility_min_samples >= 1, "plausibility_min_samples must be at least 1"),
        (settings.auth in (*AUTH_MODES, ""), f"auth must be one of {AUTH_MODES}"),
        (settings.balances in BALANCE_MODES, f"balances must be one of {BALANCE_MODES}"),
        (settings.auth_timeout_s > 0, "auth_timeout_s must be positive"),
        (settings.balance_hold_ttl_s > 0, "balance_hold_ttl_s must be positive"),
        (settings.credential_recheck_s > 0, "credential_recheck_s must be positive"),
        (settings.siwe_chain_id >= 1, "siwe_chain_id must be at least 1"),
        (settings.siwe_nonce_ttl_s > 0, "siwe_nonce_ttl_s must be positive"),
        (settings.siwe_session_ttl_s > 0, "siwe_session_ttl_s must be positive"),
        (settings.siwe_nonces_per_minute > 0, "siwe_nonces_per_minute must be positive"),
        (
            settings.anonymous_requests_per_minute > 0,
            "anonymous_requests_per_minute must be positive",
        ),
        (settings.anonymous_tokens_per_day >= 0, "anonymous_tokens_per_day must not be negative"),
        (
            0 < settings.anonymous_max_cache_share <= 1,
            "anonymous_max_cache_share must be above 0 and at most 1",
        ),
        *((getattr(settings, name) >= 1, f"{name} must be at least 1") for name in _CAPS),
        (settings.reuse_sessions_per_principal >= 0, "reuse_sessions_per_principal must be >= 0"),
        (settings.reuse_max_sessions >= 0, "reuse_max_sessions must not be negative"),
        (settings.reuse_ttl_s > 0, "reuse_ttl_s must be positive"),
        (settings.reuse_max_length >= 1, "reuse_max_length must be at least 1"),
        (settings.resume_grace_s >= 0, "resume_grace_s must not be negative"),
        (settings.resume_outbox_frames >= 16, "resume_outbox_frames must be at least 16"),
        (settings.coordinator_lease_s >= 1, "coordinator_lease_s must be at least 1"),
        (
            0 < settings.reuse_max_cache_share <= 1,
            "reuse_max_cache_share must be above 0 and at most 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for origin in settings.allowed_origins:
        try:
            parse_origin(origin)
        except ValueError as exc:
            raise ConfigError(f"allowed_origins: {exc}") from None
    return replace(settings, log_level=settings.log_level.upper())
