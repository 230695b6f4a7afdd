"""The spot-check rules without a mesh: sampling, its detection bound, verdicts, withholding,
plausibility (farmesh_ws/mesh/spot_check.py)."""

import pytest

from farmesh_ws.mesh.spot_check import IntegrityEvent, IntegrityMonitor, SpotCheckPolicy


def _checked_steps(monitor: IntegrityMonitor, peer: str, steps: int) -> list[int]:
    """Steps (1-based) the monitor chose, passing every chosen check."""
    chosen = []
    for step in range(1, steps + 1):
        if monitor.on_step(peer, work=15):
            chosen.append(step)
            monitor.passed(peer, work=15, seconds=0.0, difference=0.0)
    return chosen


def test_first_steps_are_always_checked_then_one_step_per_window() -> None:
    policy = SpotCheckPolicy(rate=0.1, first_steps=3)
    monitor = IntegrityMonitor(policy)
    chosen = _checked_steps(monitor, "peer", 1000)
    assert chosen[:3] == [1, 2, 3]
    window = policy.window
    assert window == 10
    for start in range(window, 1000, window):  # every full window after the first: exactly one
        assert len([s for s in chosen if start < s <= start + window]) == 1


def test_compulsory_checks_repeat_until_passed() -> None:
    monitor = IntegrityMonitor(SpotCheckPolicy(rate=0.01, first_steps=2))
    assert [monitor.on_step("peer", 1) for _ in range(5)] == [True] * 5  # none passed yet
    monitor.passed("peer", work=1, seconds=0.0, difference=0.0)
    monitor.passed("peer", work=1, seconds=0.0, difference=0.0)
    assert monitor.record("peer").passed == 2


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5, 1.0])
def test_a_node_tampering_from_any_step_is_checked_within_2w_minus_1_steps(rate: float) -> None:
    policy = SpotCheckPolicy(rate=rate, first_steps=3)
    bound = policy.detection_bound_steps
    assert bound == 2 * policy.window - 1
    for trial in range(200):
        monitor = IntegrityMonitor(policy)
        onset = 4 + trial % 50  # first tampered step, after the compulsory checks
        caught = None
        for step in range(1, onset + 3 * policy.window):
            if monitor.on_step("liar", work=1):
                if step >= onset:
                    caught = step
                    break
                monitor.passed("liar", work=1, seconds=0.0, difference=0.0)
        assert caught is not None
        assert caught - onset + 1 <= bound


def test_a_caught_node_is_flagged_once_excluded_and_its_unverified_work_withheld() -> None:
    times = iter([100.0, 200.0, 300.0])
    monitor = IntegrityMonitor(SpotCheckPolicy(rate=1.0, first_steps=1), clock=lambda: next(times))
    heard: list[IntegrityEvent] = []
    monitor.subscribe(heard.append)
    monitor.on_step("liar", work=30)
    monitor.passed("liar", work=30, seconds=0.1, difference=1e-7)  # at 100.0
    monitor.on_step("liar", work=15)
    monitor.on_step("liar", work=15)
    flag = monitor.mismatch("liar", "checked", "rel 5e-2", work=450, seconds=0.2)  # at 200.0
    assert flag is not None
    assert (flag.step, flag.withheld_since, flag.withheld_work, flag.flagged_at) == (
        3,
        100.0,
        30,
        200.0,
    )
    assert monitor.excluded == {"liar"}
    assert not monitor.on_step("liar", work=15)  # never checked (nor routed to) again
    assert monitor.mismatch("liar", "checked", "again", work=1, seconds=0.0) is None
    assert monitor.counters.checks == {"pass": 1, "mismatch": 2}
    assert monitor.counters.withheld_work == 30
    assert [e.result for e in heard if e.flag is None] == ["pass", "mismatch", "mismatch"]
    assert [e.flag.kind for e in heard if e.flag is not None] == ["tampered_output"]


def test_verdicts_with_and_without_a_third_opinion() -> None:
    monitor = IntegrityMonitor(SpotCheckPolicy())
    assert monitor.judge("a", ("b",), (False, True)) == "checked"
    assert monitor.judge("a", ("b",), (True, False)) == "checker"
    assert monitor.judge("a", ("b", "c"), (True, False)) == "disputed"  # which of b, c?
    assert monitor.judge("a", ("b",), (False, False)) == "disputed"
    # No third replica: fewer passed checks lose, the checked node on a tie.
    assert monitor.judge("a", ("b",), None) == "checked"
    monitor.passed("a", work=1, seconds=0.0, difference=0.0)
    assert monitor.judge("a", ("b",), None) == "checker"
    monitor.passed("b", work=1, seconds=0.0, difference=0.0)
    assert monitor.judge("a", ("b",), None) == "checked"


def test_an_implausible_throughput_claim_is_flagged_once_without_withholding() -> None:
    monitor = IntegrityMonitor(SpotCheckPolicy(plausibility_factor=10, plausibility_min_samples=5))
    # 15 blocks in 75 ms: 5 ms per block, 200 steps/s per block.
    assert not any(monitor.on_latency("honest", 15, 0.075, 300.0) for _ in range(50))
    verdicts = [monitor.on_latency("boaster", 15, 0.075, 3000.0) for _ in range(50)]
    assert verdicts == [False] * 4 + [True] + [False] * 45
    assert monitor.measured_rps("boaster") == pytest.approx(200.0)
    flag = monitor.flag("boaster", "implausible_throughput", "claimed 3000, measured 200")
    assert flag is not None
    assert flag.withheld_work == 0
    assert monitor.excluded == frozenset()  # routed by its measured speed, not excluded


def test_rate_zero_or_paused_checks_nothing() -> None:
    off = IntegrityMonitor(SpotCheckPolicy(rate=0.0))
    assert not any(off.on_step("peer", 1) for _ in range(10))
    paused = IntegrityMonitor(SpotCheckPolicy(rate=1.0))
    paused.paused = True
    assert not any(paused.on_step("peer", 1) for _ in range(10))


def test_tolerance_fits_the_dtype_unless_set() -> None:
    assert SpotCheckPolicy().tolerance_for("float32") == 1e-3
    assert SpotCheckPolicy().tolerance_for("bfloat16") == 3e-2
    assert SpotCheckPolicy(tolerance=0.5).tolerance_for("float32") == 0.5


def test_a_skipped_sampled_check_is_counted_and_the_next_step_is_checked() -> None:
    monitor = IntegrityMonitor(SpotCheckPolicy(rate=0.05, first_steps=0))
    heard: list[IntegrityEvent] = []
    monitor.subscribe(heard.append)
    step = next(s for s in range(1, 100) if monitor.on_step("peer", work=15))
    monitor.skipped("peer")  # the cap was full
    assert monitor.on_step("peer", work=15)  # owed: step + 1 is checked instead
    assert monitor.counters.checks == {"skipped": 1}
    assert [e.result for e in heard] == ["skipped"]
    assert not monitor.record("peer").owed
    assert step <= monitor.policy.window


def test_sampled_steps_of_a_turn_are_compared_at_their_own_positions() -> None:
    import torch

    from farmesh_ws.mesh.spot_check_steps import TurnChecks, at_positions, worst_difference

    class Span:
        peer_id = type("Peer", (), {"to_base58": lambda self: "peer"})()
        start, end = 15, 30

    class Session:
        span = Span()
        history = torch.zeros(1, 0, 4)

    torch.manual_seed(0)
    truth = torch.randn(1, 12, 4)  # what an honest span returns at each position
    session, turn = Session(), TurnChecks()
    for position, width in ((0, 5), (5, 1), (6, 1), (7, 1), (8, 1)):  # a prompt, then tokens
        session.history = torch.zeros(1, position + width, 4)
        if position in (0, 7):
            outputs = truth[:, position : position + width].clone()
            if position == 7:
                outputs *= 1.01  # this step was tampered with
            turn.defer(session, outputs)
    (deferred,) = turn.deferred.values()
    assert [offset for offset, _ in deferred.steps] == [0, 7]
    assert deferred.history.shape[1] == 8  # the prefix up to the last sampled step
    reference = at_positions(deferred.steps, truth)
    assert worst_difference(deferred.steps, reference) == pytest.approx(0.01, rel=1e-4)
    assert worst_difference(deferred.steps[:1], reference[:1]) == 0.0
