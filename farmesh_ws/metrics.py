"""Prometheus metrics in the gateway's own registry. Names: farmesh_<noun>_<unit>[_total].

No label ever carries a user, wallet, session or request id: cardinality stays bounded.
Money is not exported: Prometheus values are floats, and $FAR amounts never are.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from farmesh_ws.engine.events import (
    Observer,
    RequestEvent,
    RequestFinished,
    RequestStarted,
    TokensDelivered,
)
from farmesh_ws.mesh.spot_check import IntegrityEvent

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every gateway metric; one instance per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_total = Counter(
            "farmesh_connections_total", "WebSocket connections accepted", registry=r
        )
        self.connections_active = Gauge(
            "farmesh_connections_active", "WebSocket connections open now", registry=r
        )
        self.sessions_active = Gauge(
            "farmesh_sessions_active", "Chat sessions open now", registry=r
        )
        self.reuse_sessions_kept = Gauge(
            "farmesh_reuse_sessions_kept",
            "Mesh sessions kept for the next stateless request of their principal (http.md §9)",
            registry=r,
        )
        self.turns_total = Counter(
            "farmesh_turns_total",
            "Turns and one-shot generations finished, by kind and finish reason",
            ["kind", "finish_reason"],
            registry=r,
        )
        self.turns_started_total = Counter(
            "farmesh_turns_started_total", "Turns started, by kind", ["kind"], registry=r
        )
        self.completion_tokens_total = Counter(
            "farmesh_completion_tokens_total", "Tokens generated", registry=r
        )
        self.prompt_tokens_total = Counter(
            "farmesh_prompt_tokens_total", "New prompt tokens sent to the mesh", registry=r
        )
        self.cached_tokens_total = Counter(
            "farmesh_cached_tokens_total",
            "History tokens reused from the mesh's caches instead of being sent again",
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "farmesh_time_to_first_token_seconds",
            "From turn start to the first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "farmesh_inter_token_seconds",
            "Between consecutive token frames of a turn",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.errors_total = Counter(
            "farmesh_errors_total", "Error frames sent, by code", ["code"], registry=r
        )
        self.mesh_nodes = Gauge(
            "farmesh_mesh_nodes", "Online mesh servers per model", ["model"], registry=r
        )
        self.mesh_blocks_missing = Gauge(
            "farmesh_mesh_blocks_missing", "Blocks no online server holds", ["model"], registry=r
        )

        # Spot checks (README "Verified work"); labels are fixed sets, never a node.
        self.spot_checks_total = Counter(
            "farmesh_spot_checks_total",
            "Spot checks of node outputs, by result (pass, mismatch, unavailable, error, skipped)",
            ["result"],
            registry=r,
        )
        self.spot_check_mismatches_total = Counter(
            "farmesh_spot_check_mismatches_total",
            "Spot-check mismatches, by who was found lying (checked, checker, disputed)",
            ["verdict"],
            registry=r,
        )
        self.spot_check_work_total = Counter(
            "farmesh_spot_check_work_token_blocks_total",
            "Work replicas did for spot checks (tokens x blocks; billed to no one, paid to no one)",
            registry=r,
        )
        self.spot_check_seconds_total = Counter(
            "farmesh_spot_check_seconds_total", "Time spent running spot checks", registry=r
        )
        self.withheld_work_total = Counter(
            "farmesh_withheld_work_token_blocks_total",
            "Unverified work of nodes caught tampering, withheld (tokens x blocks)",
            registry=r,
        )
        self.node_flags_total = Counter(
            "farmesh_node_flags_total",
            "Nodes flagged, by kind (tampered_output, implausible_throughput)",
            ["kind"],
            registry=r,
        )

    def observe_integrity(self, event: IntegrityEvent) -> None:
        """A spot-check outcome or flag (from a mesh thread; the counters are thread-safe)."""
        if event.flag is not None:
            self.node_flags_total.labels(kind=event.flag.kind).inc()
            self.withheld_work_total.inc(event.flag.withheld_work)
            return
        if event.result is not None:
            self.spot_checks_total.labels(result=event.result).inc()
            self.spot_check_work_total.inc(event.work)
            self.spot_check_seconds_total.inc(event.seconds)
        if event.verdict is not None:
            self.spot_check_mismatches_total.labels(verdict=event.verdict).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsObserver(Observer):
    """Feeds request events into :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def notify(self, event: RequestEvent) -> None:
        m = self._metrics
        if isinstance(event, TokensDelivered):  # the hot path: once per token
            if event.inter_token_s is not None:
                m.inter_token_seconds.observe(event.inter_token_s)
        elif isinstance(event, RequestStarted):
            m.turns_started_total.labels(kind=event.context.kind).inc()
        elif isinstance(event, RequestFinished):
            settlement = event.settlement
            kind = event.context.kind
            m.turns_total.labels(kind=kind, finish_reason=settlement.finish_reason).inc()
            m.completion_tokens_total.inc(settlement.completion_tokens)
            m.prompt_tokens_total.inc(settlement.prompt_tokens)
            m.cached_tokens_total.inc(settlement.cached_tokens)
            if event.done.time_to_first_token_s is not None:
                m.time_to_first_token_seconds.observe(event.done.time_to_first_token_s)
        else:
            m.errors_total.labels(code=event.code).inc()
