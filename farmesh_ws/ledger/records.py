"""What the ledger stores: one record per finished turn, with its node contributions.

Records are plain frozen data with exact money (integer 10⁻⁸ $FAR, see ``money.py``), built
from a turn's end by :func:`turn_record`, and serialisable to one JSON line for the spool.
"""

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from farmesh_ws.ledger.money import split_by_work, to_e8
from farmesh_ws.mesh.base import TurnDone


@dataclass(frozen=True, slots=True)
class ContributionRecord:
    peer_id: str
    public_name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    work: int
    share_far_e8: int


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """A finished (or interrupted) turn; ``(session_id, request_id)`` identifies it once."""

    session_id: str
    request_id: str
    kind: str
    wallet: str | None
    model_id: str
    started_at: float
    ended_at: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str
    cost_far_e8: int
    ttft_ms: float | None
    duration_ms: float | None
    contributions: tuple[ContributionRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TurnRecord":
        contributions = tuple(ContributionRecord(**c) for c in data["contributions"])
        return cls(**{**data, "contributions": contributions})


def turn_record(
    *,
    session_id: str,
    request_id: str,
    kind: str,
    wallet: str | None,
    model_id: str,
    started_at: float,
    ended_at: float,
    done: TurnDone,
    finish_reason: str,
    completion_tokens: int,
    cost: Decimal,
) -> TurnRecord:
    """Build the record of a turn from its end event and its exact cost."""
    shares = split_by_work(cost, [c.work for c in done.contributions])
    return TurnRecord(
        session_id=session_id,
        request_id=request_id,
        kind=kind,
        wallet=wallet,
        model_id=model_id,
        started_at=started_at,
        ended_at=ended_at,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=done.cached_tokens,
        finish_reason=finish_reason,
        cost_far_e8=to_e8(cost),
        ttft_ms=None if done.time_to_first_token_s is None else done.time_to_first_token_s * 1e3,
        duration_ms=done.duration_s * 1e3,
        contributions=tuple(
            ContributionRecord(
                peer_id=c.peer_id,
                public_name=c.public_name,
                start_block=c.start_block,
                end_block=c.end_block,
                tokens=c.tokens,
                replayed_tokens=c.replayed_tokens,
                work=c.work,
                share_far_e8=to_e8(share),
            )
            for c, share in zip(done.contributions, shares, strict=True)
        ),
    )
