"""What a spot check compares (:mod:`.spot_check_run` runs it): a server's steps, each as its
offset in the server session's input history and the hidden states the node returned, and the
same positions of a replica's forward over that history."""

from dataclasses import dataclass, field
from typing import Any

Steps = list[tuple[int, Any]]
"""Checked steps of one server session: (offset of the step's first position in the session's
input history, the hidden states the node returned for it)."""


def relative_difference(outputs: Any, reference: Any) -> float:
    """RMS of ``outputs - reference`` over the RMS of ``reference`` (tensors of one shape)."""
    import torch

    a, b = outputs.to(torch.float64), reference.to(torch.float64)
    scale = float(b.pow(2).mean().sqrt())
    return float((a - b).pow(2).mean().sqrt()) / max(scale, 1e-12)


@dataclass(slots=True)
class DeferredCheck:
    """The sampled steps of one server session, checked together when the turn ends."""

    peer_id: str
    start: int
    end: int
    history: Any = None
    """The latest input history seen; earlier ones are its prefixes (Petals appends by copy)."""
    steps: Steps = field(default_factory=list)


def step_check(session: Any, outputs: Any) -> DeferredCheck:
    """A check of one step of ``session`` (a Petals ``_ServerInferenceSession``), right after
    it returned ``outputs``."""
    span, history = session.span, session.history
    offset = int(history.shape[1]) - int(outputs.shape[1])
    peer_id = span.peer_id.to_base58()
    return DeferredCheck(peer_id, span.start, span.end, history, [(offset, outputs)])


class TurnChecks:
    """The sampled checks of one turn, one per server session."""

    def __init__(self) -> None:
        self.deferred: dict[Any, DeferredCheck] = {}

    def defer(self, session: Any, outputs: Any) -> None:
        check = step_check(session, outputs)
        found = self.deferred.setdefault(session, check)
        if found is not check:
            found.history = check.history
            found.steps += check.steps


def at_positions(steps: Steps, hidden: Any) -> Steps:
    """The positions of ``steps`` in a forward's output over the same history."""
    return [(offset, hidden[:, offset : offset + outputs.shape[1]]) for offset, outputs in steps]


def worst_difference(steps: Steps, reference: Steps) -> float:
    """The largest relative difference between matching steps."""
    return max(relative_difference(a, b) for (_, a), (_, b) in zip(steps, reference, strict=True))
