"""Pure parts of the swarm: block spans."""

import pytest

from farmesh_ws.swarm import even_spans, parse_span


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
