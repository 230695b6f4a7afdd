"""Settings from the environment and flags; a bad value is one clear line and exit code 2."""

import subprocess
import sys
from decimal import Decimal

import pytest

from farmesh_ws.config import ConfigError, Settings, load_settings


def test_defaults_run_the_embedded_mesh_on_port_8100() -> None:
    settings = load_settings({})
    assert settings.port == 8100
    assert settings.host == "127.0.0.1"
    assert settings.embedded_mesh
    assert settings.price_per_token_far == Decimal("0.0001")


def test_seed_names_are_read() -> None:
    settings = load_settings(
        {
            "DEFAULT_MODEL_ID": "m",
            "PRICE_PER_TOKEN_FAR": "0.25",
            "FAR_MESH_DHT_BOOTSTRAP": "/ip4/10.0.0.1/tcp/1/p2p/A, /ip4/10.0.0.2/tcp/1/p2p/B",
            "DATABASE_URL": "postgresql://u:secret@db/far",
            "REDIS_URL": "redis://:secret@cache:6379/0",
            "LOG_LEVEL": "debug",
            "FARMESH_MAX_FRAME_BYTES": "4096",
        }
    )
    assert settings.default_model_id == "m"
    assert settings.price_per_token_far == Decimal("0.25")
    assert settings.dht_bootstrap == ("/ip4/10.0.0.1/tcp/1/p2p/A", "/ip4/10.0.0.2/tcp/1/p2p/B")
    assert not settings.embedded_mesh
    assert settings.log_level == "DEBUG"
    assert settings.max_frame_bytes == 4096
    assert "secret" not in repr(settings)


def test_postgres_url_wins_over_database_url() -> None:
    settings = load_settings({"POSTGRES_URL": "postgresql://a", "DATABASE_URL": "postgresql://b"})
    assert settings.database_url == "postgresql://a"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FARMESH_PORT": "abc"}, "FARMESH_PORT"),
        ({"FARMESH_PORT": "70000"}, "port"),
        ({"PRICE_PER_TOKEN_FAR": "cheap"}, "PRICE_PER_TOKEN_FAR"),
        ({"PRICE_PER_TOKEN_FAR": "-1"}, "negative"),
        ({"PRICE_PER_TOKEN_FAR": "NaN"}, "finite"),
        ({"LOG_LEVEL": "LOUD"}, "log_level"),
        ({"FARMESH_IDLE_TIMEOUT_S": "inf"}, "finite"),
        ({"FARMESH_DEFAULT_MAX_LENGTH": "5000"}, "default_max_length"),
        ({"FARMESH_REUSE_MAX_LENGTH": "0"}, "reuse_max_length"),
        ({"FARMESH_REUSE_TTL_S": "0"}, "reuse_ttl_s"),
        ({"FARMESH_REUSE_MAX_CACHE_SHARE": "1.5"}, "reuse_max_cache_share"),
        ({"FARMESH_REUSE_SESSIONS_PER_PRINCIPAL": "-1"}, "reuse_sessions_per_principal"),
    ],
)
def test_bad_values_raise_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_flags_override_the_environment() -> None:
    settings = load_settings({"FARMESH_PORT": "9000"}).with_overrides(port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == Settings().host


def test_serve_with_a_bad_value_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "serve"],
        env={"FARMESH_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "farmesh-ws: configuration error: FARMESH_PORT: 'not-a-port' is not an integer"
    ]


def test_env_example_documents_every_setting() -> None:
    from dataclasses import fields
    from pathlib import Path

    from farmesh_ws.config import env_names

    example = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line}
    settable = [f for f in fields(Settings) if f.metadata.get("env") is not False]
    missing = [f.name for f in settable if env_names(f.name)[0] not in documented]
    assert missing == []
    assert load_settings({}) == Settings()


def test_the_http_api_port_defaults_to_the_websocket_port_plus_one() -> None:
    assert Settings().http_listen_port == 8101
    assert load_settings({"FARMESH_PORT": "9000"}).http_listen_port == 9001
    assert load_settings({"FARMESH_HTTP_PORT": "9500"}).http_listen_port == 9500
    assert Settings(port=0).http_listen_port == 0  # tests: any free port
    with pytest.raises(ConfigError, match="set http_port"):
        load_settings({"FARMESH_PORT": "65535"})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FARMESH_LOCAL_PAYOUT_WALLET", "far1wallet", "local_payout_wallet"),
        ("FARMESH_PAYOUT_BINDING_TTL_S", "0", "payout_binding_ttl_s"),
        ("FARMESH_PAYOUT_FETCH_TIMEOUT_S", "-1", "payout_fetch_timeout_s"),
        ("FARMESH_PAYOUT_STATEMENT_MAX_AGE_S", "0", "payout_statement_max_age_s"),
        ("FARMESH_PAYOUT_MAX_CLOCK_SKEW_S", "-1", "payout_max_clock_skew_s"),
    ],
)
def test_payout_settings_are_checked(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({name: value})
    assert load_settings({"FARMESH_LOCAL_PAYOUT_WALLET": "0x" + "ab" * 20}).local_payout_wallet
