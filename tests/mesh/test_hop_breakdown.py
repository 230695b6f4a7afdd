"""Cutting traced decode steps into parts (synthetic events with made-up timestamps)."""

from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.mesh import hop_breakdown

CLIENT, HANDLER, RUNTIME = 100, 200, 201


def _step(t0: float, tokens: int) -> list[dict[str, Any]]:
    """One step through one server: every event 1 ms after the previous, compute 20 ms."""
    names = [
        ("emb_start", CLIENT, {}),
        ("emb_end", CLIENT, {}),
        ("ses_start", CLIENT, {"tokens": tokens}),
        ("cli_step", CLIENT, {"node": "n0", "blocks": "0:30"}),
        ("cli_put", CLIENT, {}),
        ("srv_recv", HANDLER, {"node": "n0"}),
        ("srv_submit", HANDLER, {"node": "n0"}),
        ("rt_load", RUNTIME, {"node": "n0"}),
        ("rt_start", RUNTIME, {"node": "n0"}),
        ("rt_end", RUNTIME, {"node": "n0"}),
        ("srv_result", HANDLER, {"node": "n0"}),
        ("srv_send", HANDLER, {"node": "n0"}),
        ("cli_got", CLIENT, {}),
        ("cli_done", CLIENT, {"node": "n0"}),
        ("ses_end", CLIENT, {}),
        ("head_start", CLIENT, {}),
        ("head_end", CLIENT, {}),
        ("accept", CLIENT, {}),
    ]
    events, t = [], t0
    for name, pid, fields in names:
        t += 0.020 if name == "rt_end" else 0.001
        events.append({"e": name, "t": t, "pid": pid, **fields})
    return events


def test_a_decode_step_is_cut_into_parts_that_tile_it() -> None:
    events = _step(0.0, tokens=5) + _step(1.0, tokens=1) + _step(2.0, tokens=1)
    steps = hop_breakdown.decode_steps(events, [(0.0, 3.0)])

    assert len(steps) == 1  # the prefill step and the last step (no next start) are left out
    parts = dict(steps[0])
    assert sum(parts.values()) == pytest.approx(1.0)  # emb_start at 1.001 to the next at 2.001
    assert parts["hop 1 (n0, blocks 0:30): server compute"] == pytest.approx(0.020)
    assert parts["hop 1 (n0, blocks 0:30): request transit to the server's handler"] == (
        pytest.approx(0.001)
    )
    assert parts["client Petals routing + bookkeeping"] == pytest.approx(0.002)
    assert parts["client farmesh attribution + bookkeeping"] == pytest.approx(0.002 + 0.964)


def test_steps_outside_the_windows_are_ignored() -> None:
    events = _step(0.0, tokens=1) + _step(1.0, tokens=1) + _step(2.0, tokens=1)
    assert hop_breakdown.decode_steps(events, [(1.5, 3.0)]) == []
    assert len(hop_breakdown.decode_steps(events, [(0.0, 3.0)])) == 2


def test_summary_adds_the_whole_step_and_the_compute_share() -> None:
    events = [e for t0 in (0.0, 1.0, 2.0) for e in _step(t0, tokens=1)]
    rows = {
        row.label: row
        for row in hop_breakdown.summarise(hop_breakdown.decode_steps(events, [(0.0, 3.0)]))
    }

    assert rows["whole step (token to token)"].mean_ms == pytest.approx(1000.0)
    assert rows["  of which servers' compute"].median_ms == pytest.approx(20.0)
    assert rows["  of which everything else"].mean_ms == pytest.approx(980.0)
    assert hop_breakdown.summarise([]) == []


def test_events_load_from_every_process_file_in_time_order(tmp_path: Path) -> None:
    (tmp_path / "1.jsonl").write_text('{"e": "b", "t": 2.0, "pid": 1}\n')
    (tmp_path / "2.jsonl").write_text('{"e": "a", "t": 1.0, "pid": 2}\n\n')

    assert [e["e"] for e in hop_breakdown.load_events(tmp_path)] == ["a", "b"]
