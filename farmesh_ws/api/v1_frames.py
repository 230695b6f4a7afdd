"""Protocol v1 frames built from what the engine reports (protocol.md §4.3-§4.6)."""

from farmesh_ws import protocol as p
from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.errors import FarmeshError, QuotaExceeded, RateLimited, SessionElsewhere

_RETRY_LATER = (RateLimited, QuotaExceeded, SessionElsewhere)


def error_frame(error: FarmeshError, request_id: str | None) -> p.Error:
    """§4.6; ``retry_after_s`` for the codes that say when to retry."""
    return p.Error(
        code=error.code,
        message=error.message,
        retryable=error.retryable,
        request_id=request_id,
        retry_after_s=error.retry_after_s if isinstance(error, _RETRY_LATER) else None,
    )


def settled_frames(active: ActiveRequest, settlement: Settlement) -> list[p.ServerMessage]:
    """A settled request's last frames, in order: its ``error`` if it failed, then ``done`` and
    ``contribution`` (for ``generate``, §3.3: the contribution, then a final ``done``)."""
    request_id = active.request_id
    frames: list[p.ServerMessage] = [
        _done_frame(active, settlement),
        _contribution_frame(request_id, settlement),
    ]
    if active.context.kind == "generate":
        frames.reverse()
    if settlement.error is not None:
        frames.insert(0, error_frame(settlement.error, request_id))
    return frames


def _done_frame(active: ActiveRequest, settlement: Settlement) -> p.Done:
    result = active.result
    if result is None:
        raise FarmeshError("a request was reported before it settled")
    ttft = result.time_to_first_token_s
    return p.Done(
        request_id=active.request_id,
        finish_reason=settlement.finish_reason,
        usage=p.Usage(
            prompt_tokens=settlement.prompt_tokens,
            completion_tokens=settlement.completion_tokens,
            cached_tokens=settlement.cached_tokens,
            cost_far=far_text(settlement.cost_far),
        ),
        position=result.position,
        max_length=result.max_length,
        duration_ms=round(result.duration_s * 1000, 3),
        time_to_first_token_ms=None if ttft is None else round(ttft * 1000, 3),
        error=settlement.error.code if settlement.error is not None else None,
        rewound=active.rewound,
    )


def _contribution_frame(request_id: str, settlement: Settlement) -> p.ContributionReport:
    return p.ContributionReport(
        request_id=request_id,
        cost_far=far_text(settlement.cost_far),
        nodes=p.node_shares(settlement),
    )
