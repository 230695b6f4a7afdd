"""Where a mesh decode step's time goes, from the events :mod:`farmesh_ws.mesh.hop_trace` wrote.

A decode step runs from one ``emb_start`` of the client to the next, and its parts tile it
exactly, so their means add up to the mean step (medians need not). Per step, in order:

* client embed; farmesh's own code around Petals (attribution recorder, transcript, token
  events, the turn loop); Petals' client code outside the hops (routing, history);
* per hop, in route order: client pack + serialise + hand-off to hivemind's event-loop thread;
  request transit (that thread → p2pd → p2pd → the server's connection handler); handler
  deserialisation; the task pool's hand-off from the handler process to the runtime's prefetch
  thread, then to its compute thread; the server's compute of its blocks; the result's way
  back to the handler process; handler wake-up and serialisation; response transit back to
  the client; client deserialisation and checks;
* client final norm + LM head; sampling.

All figures are milliseconds measured on ``time.perf_counter()`` (``CLOCK_MONOTONIC``).
"""

import itertools
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Event = dict[str, Any]
HOP_PARTS = (
    ("cli_step", "cli_put", "client pack + serialise + hand-off"),
    ("cli_put", "srv_recv", "request transit to the server's handler"),
    ("srv_recv", "srv_submit", "handler deserialise + prioritise"),
    ("srv_submit", "rt_load", "task pool: handler process -> runtime prefetch thread"),
    ("rt_load", "rt_start", "runtime prefetch thread -> compute thread"),
    ("rt_start", "rt_end", "server compute"),
    ("rt_end", "srv_result", "result: shared memory + future -> handler process"),
    ("srv_result", "srv_send", "handler wake-up + serialise"),
    ("srv_send", "cli_got", "response transit to the client"),
    ("cli_got", "cli_done", "client deserialise + checks"),
)
SERVER_EVENTS = (
    "srv_recv",
    "srv_submit",
    "rt_load",
    "rt_start",
    "rt_end",
    "srv_result",
    "srv_send",
)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the breakdown: mean and median over decode steps, in milliseconds."""

    label: str
    mean_ms: float
    median_ms: float


def load_events(directory: Path) -> list[Event]:
    """Every event of every process in a trace directory, in time order."""
    events: list[Event] = []
    for path in sorted(directory.glob("*.jsonl")):
        events.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    events.sort(key=lambda event: float(event["t"]))
    return events


def _first(events: Iterable[Event], name: str, after: float = float("-inf")) -> Event:
    return next(e for e in events if e["e"] == name and e["t"] >= after)


def step_parts(step: Sequence[Event], next_start: float) -> list[tuple[str, float]]:
    """The parts (label, seconds) of one decode step: ``step`` holds every event from its
    ``emb_start`` up to ``next_start`` (the next step's), servers' events included."""
    client_pid = step[0]["pid"]
    mine = [e for e in step if e["pid"] == client_pid]
    emb_start, emb_end = _first(mine, "emb_start"), _first(mine, "emb_end")
    ses_start, ses_end = _first(mine, "ses_start"), _first(mine, "ses_end")
    head_start, head_end = _first(mine, "head_start"), _first(mine, "head_end")
    accept = _first(mine, "accept", head_end["t"])
    hops, hop_total = [], 0.0
    for index, hop_start in enumerate(e for e in mine if e["e"] == "cli_step"):
        node = hop_start["node"]
        stamps = {name: _first(mine, name, hop_start["t"])["t"] for name in ("cli_put", "cli_got")}
        stamps["cli_step"] = hop_start["t"]
        stamps["cli_done"] = _first(mine, "cli_done", hop_start["t"])["t"]
        server = [e for e in step if e.get("node") == node and e["pid"] != client_pid]
        for name in SERVER_EVENTS:
            stamps[name] = _first(server, name, ses_start["t"])["t"]
        label = f"hop {index + 1} ({node}, blocks {hop_start['blocks']})"
        hops += [(f"{label}: {text}", stamps[b] - stamps[a]) for a, b, text in HOP_PARTS]
        hop_total += stamps["cli_done"] - stamps["cli_step"]
    ours = (ses_start["t"] - emb_end["t"]) + (head_start["t"] - ses_end["t"])
    ours += next_start - accept["t"]
    return [
        ("client embed", emb_end["t"] - emb_start["t"]),
        ("client farmesh attribution + bookkeeping", ours),
        ("client Petals routing + bookkeeping", ses_end["t"] - ses_start["t"] - hop_total),
        *hops,
        ("client final norm + LM head", head_end["t"] - head_start["t"]),
        ("client sampling", accept["t"] - head_end["t"]),
    ]


def decode_steps(
    events: Sequence[Event], windows: Sequence[tuple[float, float]]
) -> list[list[tuple[str, float]]]:
    """The parts of every one-token step inside the given (start, end) time windows; the
    last step of a window (no next step to end it) and prefill steps are left out."""
    steps = []
    for begin, end in windows:
        inside = [e for e in events if begin <= e["t"] <= end]
        starts = [i for i, e in enumerate(inside) if e["e"] == "emb_start"]
        for first, following in itertools.pairwise(starts):
            step = inside[first:following]
            if _first(step, "ses_start")["tokens"] == 1:
                steps.append(step_parts(step, inside[following]["t"]))
    return steps


def summarise(steps: Sequence[Sequence[tuple[str, float]]]) -> list[Row]:
    """Mean and median per part over steps with the same route, plus the whole step, the
    servers' compute and everything else (all in ms)."""
    if not steps:
        return []
    labels = [label for label, _ in steps[0]]
    same_route = [step for step in steps if [label for label, _ in step] == labels]
    columns = [[seconds * 1000 for _, seconds in step] for step in same_route]
    totals = [sum(column) for column in columns]
    compute_at = [i for i, label in enumerate(labels) if label.endswith(": server compute")]
    compute = [sum(column[i] for i in compute_at) for column in columns]
    rows = [_row(label, [column[i] for column in columns]) for i, label in enumerate(labels)]
    rows.append(_row("whole step (token to token)", totals))
    rows.append(_row("  of which servers' compute", compute))
    rest = [total - part for total, part in zip(totals, compute, strict=True)]
    rows.append(_row("  of which everything else", rest))
    return rows


def _row(label: str, values: Sequence[float]) -> Row:
    return Row(label, round(statistics.fmean(values), 2), round(statistics.median(values), 2))
