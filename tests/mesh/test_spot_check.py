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
