"""Breaker, budget and backoff rules, driven by an explicit clock (the real classes, a controllable time source)."""

from __future__ import annotations

import random

from app.settings import BreakerPolicy, RetryPolicy
from app.upstream.breaker import BreakerState, CircuitBreaker
from app.upstream.retry import RetryBudget, backoff_s, parse_retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_rate_opens_the_breaker() -> None:
    clock = Clock()
    transitions: list[BreakerState] = []
    breaker = CircuitBreaker(
        BreakerPolicy(consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=10),
        on_transition=transitions.append,
        clock=clock,
    )
    for i in range(9):
        assert breaker.try_acquire()
        (breaker.record_failure if i % 2 else breaker.record_success)()
    assert breaker.state is BreakerState.CLOSED  # 4/9 failed, and fewer than min_calls
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN  # 5/10 = 50 %
    assert transitions == [BreakerState.OPEN]


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=100, min_calls=4, window_s=10), clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 11
    breaker.record_failure()
    breaker.record_success()
    breaker.record_success()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_open_half_open_closed_cycle_and_probe_release() -> None:
    clock = Clock()
    transitions: list[BreakerState] = []
    breaker = CircuitBreaker(
        BreakerPolicy(consecutive_failures=2, open_ms=500, half_open_probes=1),
        on_transition=transitions.append,
        clock=clock,
    )
    breaker.record_failure()
    breaker.record_failure()
    assert not breaker.try_acquire()
    assert 0.49 < breaker.retry_after_s() <= 0.5
    clock.now += 0.5
    assert breaker.try_acquire()  # the one probe
    assert not breaker.try_acquire()
    breaker.release_probe()  # the probe was cancelled without an outcome
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_retry_budget_is_a_fraction_of_calls() -> None:
    clock = Clock()
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_min_retries=1, budget_window_s=10), clock=clock)
    for _ in range(10):
        budget.record_call()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    clock.now += 11  # the window slid past those calls and retries
    assert budget.try_spend()
    assert not budget.try_spend()


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(backoff_initial_ms=10, backoff_max_ms=50)
    for retry, ceiling in ((1, 0.01), (2, 0.02), (3, 0.04), (4, 0.05), (9, 0.05)):
        samples = [backoff_s(policy, retry, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # jitter spans the range, not a constant


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-1") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("100000") == 60.0
