"""What the ledger stores: one record per finished turn, with its node contributions.

Records are plain frozen data with exact money (integer 10⁻⁸ $FAR, see ``money.py``), built
from a request's settlement by :func:`turn_record`, and serialisable to one JSON line for the spool.
"""

from dataclasses import asdict, dataclass
from typing import Any

from farmesh_ws.core.money import to_e8
from farmesh_ws.engine.events import RequestContext, RequestFinished, TokensDelivered


@dataclass(frozen=True, slots=True)
class ContributionRecord:
    """One node's part of a turn; ``payout_wallet``/``payout_bound`` default to unbound so
    spool lines written before payout identity still load."""

    peer_id: str
    public_name: str | None
    start_block: int
    end_block: int
    tokens: int
    replayed_tokens: int
    work: int
    share_far_e8: int
    payout_wallet: str | None = None
    payout_bound: bool = False


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """A finished (or interrupted) turn; ``(session_id, request_id)`` identifies it once.

    ``principal`` and ``client_address_hash`` say who opened the session (see
    :class:`~farmesh_ws.engine.events.RequestContext`); ``hold_id`` names the prepaid hold that
    storing this turn settles for ``cost_far_e8`` (None: nothing was held). The three default
    to None so that spool and checkpoint lines written before they existed still load.
    """

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
    principal: str | None = None
    client_address_hash: str | None = None
    hold_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TurnRecord":
        contributions = tuple(ContributionRecord(**c) for c in data["contributions"])
        return cls(**{**data, "contributions": contributions})


def _who(context: RequestContext) -> dict[str, Any]:
    """The fields of a record that identify its request, its principal and its hold."""
    return {
        "session_id": context.session_id,
        "request_id": context.request_id,
        "kind": context.kind,
        "wallet": context.wallet,
        "model_id": context.model_id,
        "started_at": context.started_at,
        "principal": context.principal_id,
        "client_address_hash": context.address_hash or None,
        "hold_id": None if context.held_far is None else context.hold_id,
    }


def checkpoint_record(event: TokensDelivered, *, now: float) -> TurnRecord:
    """A running request as far as it was delivered: closed as ``interrupted`` if the process
    dies before the request ends (no contributions: the route is not checkpointed). It names
    the request's hold, so recovery settles the hold for the checkpointed cost."""
    return TurnRecord(
        **_who(event.context),
        ended_at=now,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.delivered,
        cached_tokens=0,
        finish_reason="interrupted",
        cost_far_e8=to_e8(event.cost_far),
        ttft_ms=None,
        duration_ms=(now - event.context.started_at) * 1e3,
        contributions=(),
    )


def turn_record(event: RequestFinished, *, ended_at: float) -> TurnRecord:
    """The record of a finished request, from its one settlement."""
    done, settlement = event.done, event.settlement
    return TurnRecord(
        **_who(event.context),
        ended_at=ended_at,
        prompt_tokens=settlement.prompt_tokens,
        completion_tokens=settlement.completion_tokens,
        cached_tokens=settlement.cached_tokens,
        finish_reason=settlement.finish_reason,
        cost_far_e8=to_e8(settlement.cost_far),
        ttft_ms=None if done.time_to_first_token_s is None else done.time_to_first_token_s * 1e3,
        duration_ms=done.duration_s * 1e3,
        contributions=tuple(
            ContributionRecord(
                peer_id=node.contribution.peer_id,
                public_name=node.contribution.public_name,
                start_block=node.contribution.start_block,
                end_block=node.contribution.end_block,
                tokens=node.contribution.tokens,
                replayed_tokens=node.contribution.replayed_tokens,
                work=node.contribution.work,
                share_far_e8=to_e8(node.share_far),
                payout_wallet=node.contribution.payout_wallet,
                payout_bound=node.contribution.payout_bound,
            )
            for node in settlement.nodes
        ),
    )
