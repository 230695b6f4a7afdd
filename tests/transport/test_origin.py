"""The origin rule as a pure function (transport/origin.py; RFC 6454)."""

import pytest

from farmesh_ws.config import ConfigError, load_settings
from farmesh_ws.transport.origin import Origin, origin_allowed, parse_authority, parse_origin

INVALID = r"^'.*' (is not|has)"
EXTRA = frozenset({parse_origin("https://chat.example"), parse_origin("http://[::1]:3000")})


def allowed(origin: str | list[str] | None, host: str | list[str] | None = "gw:8100") -> bool:
    origins = [] if origin is None else [origin] if isinstance(origin, str) else origin
    hosts = [] if host is None else [host] if isinstance(host, str) else host
    return origin_allowed(origins, hosts, EXTRA)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://gw:8100", Origin("http", "gw", 8100)),
        ("http://gw", Origin("http", "gw", 80)),
        ("http://gw:80", Origin("http", "gw", 80)),
        ("https://gw", Origin("https", "gw", 443)),
        ("HTTPS://Chat.Example:443", Origin("https", "chat.example", 443)),
        ("http://127.0.0.1:8100", Origin("http", "127.0.0.1", 8100)),
        ("http://[::1]:8100", Origin("http", "[::1]", 8100)),
        ("http://[0:0:0:0:0:0:0:1]", Origin("http", "[::1]", 80)),
        ("http://[2001:DB8::A]", Origin("http", "[2001:db8::a]", 80)),
        ("http://xn--bcher-kva.example", Origin("http", "xn--bcher-kva.example", 80)),
        ("chrome-extension://abcdef", Origin("chrome-extension", "abcdef", None)),
    ],
)
def test_parse_origin(text: str, expected: Origin) -> None:
    assert parse_origin(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "null",
        "",
        "gw:8100",
        "http://",
        "http://gw/",
        "http://gw:8100/ws",
        "http://gw?x",
        "http://user@gw",
        "http://gw:",
        "http://gw:65536",
        "http://gw:123456",
        "http://gw:-1",
        "http://::1",
        "http://[::1",
        "http://[::g]",
        "http://[fe80::1%25eth0]",
        "http://gw http://other",
        " http://gw",
        "http://bücher.example",
        "1http://gw",
        "*",
    ],
)
def test_not_an_origin(text: str) -> None:
    with pytest.raises(ValueError, match=INVALID):
        parse_origin(text)


def test_parse_authority() -> None:
    assert parse_authority("GW:8100") == ("gw", 8100)
    assert parse_authority("gw") == ("gw", None)
    assert parse_authority("[::1]") == ("[::1]", None)
    assert parse_authority("[::FFFF:127.0.0.1]:1") == ("[::ffff:7f00:1]", 1)
    for bad in ("", "gw:x", "gw:8100:1", "::1", "gw/x"):
        with pytest.raises(ValueError, match=INVALID):
            parse_authority(bad)


def test_no_origin_header_is_not_a_browser() -> None:
    assert allowed(None)
    assert allowed(None, host=None)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://gw:8100", "gw:8100"),
        ("http://GW:8100", "gw:8100"),
        ("http://gw:8100", "Gw:8100"),
        ("https://gw:8100", "gw:8100"),  # the scheme is not compared: a TLS proxy
        ("http://gw", "gw"),
        ("http://gw", "gw:80"),
        ("http://gw:80", "gw"),
        ("https://gw", "gw"),
        ("https://gw", "gw:443"),
        ("https://gw:443", "gw"),
        ("http://127.0.0.1:8100", "127.0.0.1:8100"),
        ("http://[::1]:8100", "[::1]:8100"),
        ("http://[::1]", "[0:0::1]"),
        ("http://[::1]:80", "[::1]"),
    ],
)
def test_same_origin_is_allowed(origin: str, host: str) -> None:
    assert allowed(origin, host)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.example", "gw:8100"),
        ("http://gw:8101", "gw:8100"),
        ("http://gw", "gw:8100"),
        ("http://gw:8100", "gw"),
        ("http://gw", "gw:443"),
        ("https://gw", "gw:80"),
        ("https://gw", "gw:8100"),
        ("http://localhost:8100", "127.0.0.1:8100"),
        ("http://127.0.0.1:8100", "localhost:8100"),
        ("http://[::1]:8100", "127.0.0.1:8100"),
        ("http://[::2]:8100", "[::1]:8100"),
        ("http://gw.evil.example:8100", "gw:8100"),
        ("http://gw:8100", "gw.:8100"),
        ("ws://gw:8100", "gw:8100"),
        ("chrome-extension://gw", "gw"),
        ("null", "gw:8100"),
        ("http://gw:8100/", "gw:8100"),
        ("http://gw:8100 http://gw:8100", "gw:8100"),
        ("http://gw:8100", "gw:8100, evil.example"),
        ("http://gw:8100", "user@gw:8100"),
    ],
)
def test_another_origin_is_refused(origin: str, host: str) -> None:
    assert not allowed(origin, host)


def test_the_host_header_must_be_one() -> None:
    assert not allowed("http://gw:8100", host=None)
    assert not allowed("http://gw:8100", host=["gw:8100", "gw:8100"])
    assert not allowed("http://gw:8100", host=["evil.example", "gw:8100"])


def test_more_than_one_origin_header_is_refused() -> None:
    assert not allowed(["http://gw:8100", "http://gw:8100"])
    assert not allowed(["https://chat.example", "http://evil.example"])


@pytest.mark.parametrize(
    "origin",
    [
        "https://chat.example",
        "HTTPS://CHAT.EXAMPLE",
        "https://chat.example:443",
        "http://[::1]:3000",
    ],
)
def test_listed_origins_are_allowed_whatever_the_host(origin: str) -> None:
    assert allowed(origin, host="gw:8100")
    assert allowed(origin, host=None)


@pytest.mark.parametrize(
    "origin", ["http://chat.example", "https://chat.example:8443", "https://sub.chat.example"]
)
def test_listed_origins_match_exactly(origin: str) -> None:
    assert not allowed(origin)


def test_settings_refuse_what_is_not_an_origin() -> None:
    settings = load_settings({"FARMESH_ALLOWED_ORIGINS": "https://chat.example, http://[::1]:3000"})
    assert settings.allowed_origins == ("https://chat.example", "http://[::1]:3000")
    for bad in ("null", "*", "https://chat.example/", "chat.example"):
        with pytest.raises(ConfigError, match=r"^allowed_origins: '.*' is not an origin"):
            load_settings({"FARMESH_ALLOWED_ORIGINS": bad})
