"""The SMS providers' circuit breaker, on a fake clock: closed → open → half-open → closed/open."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from herald.channels.sms import CircuitBreaker, CircuitState


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(failures: int = 3, reset_s: float = 30.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(failures, reset_s, clock), clock


def test_stays_closed_below_the_threshold() -> None:
    circuit, _ = breaker(failures=3)
    circuit.record_failure()
    circuit.record_failure()
    assert circuit.state is CircuitState.closed
    assert circuit.allow()


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    circuit, _ = breaker(failures=3)
    for _ in range(2):
        circuit.record_failure()
    circuit.record_success()
    for _ in range(2):
        circuit.record_failure()
    assert circuit.state is CircuitState.closed


def test_opens_after_n_consecutive_failures_and_refuses_calls() -> None:
    circuit, clock = breaker(failures=3, reset_s=30.0)
    for _ in range(3):
        circuit.record_failure()
    assert circuit.state is CircuitState.open
    assert not circuit.allow()
    clock.advance(29.9)
    assert not circuit.allow()
    assert circuit.retry_in_s() == pytest.approx(0.1)


def test_half_open_lets_exactly_one_trial_through() -> None:
    circuit, clock = breaker(failures=1, reset_s=30.0)
    circuit.record_failure()
    clock.advance(30.0)
    assert circuit.state is CircuitState.half_open
    assert circuit.retry_in_s() == 0.0
    assert circuit.allow()
    assert not circuit.allow()
    assert not circuit.allow()


def test_a_successful_trial_closes_the_circuit() -> None:
    circuit, clock = breaker(failures=1, reset_s=30.0)
    circuit.record_failure()
    clock.advance(30.0)
    assert circuit.allow()
    circuit.record_success()
    assert circuit.state is CircuitState.closed
    assert all(circuit.allow() for _ in range(5))


def test_a_failed_trial_opens_the_circuit_for_another_period() -> None:
    circuit, clock = breaker(failures=2, reset_s=30.0)
    circuit.record_failure()
    circuit.record_failure()
    clock.advance(31.0)
    assert circuit.allow()
    circuit.record_failure()
    assert circuit.state is CircuitState.open
    clock.advance(29.0)
    assert not circuit.allow()
    clock.advance(1.0)
    assert circuit.allow()


def test_a_trial_that_never_reports_does_not_wedge_the_circuit() -> None:
    """A cancelled caller never records the trial's outcome; another trial comes after reset_s."""
    circuit, clock = breaker(failures=1, reset_s=10.0)
    circuit.record_failure()
    clock.advance(10.0)
    assert circuit.allow()
    clock.advance(9.0)
    assert not circuit.allow()
    clock.advance(1.0)
    assert circuit.allow()


def test_rejects_meaningless_settings() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError, match="reset_s"):
        CircuitBreaker(1, 0.0)


# -- the whole contract, on random histories -------------------------------------------------


@dataclass
class Model:
    """What the breaker promises, stated directly on the history of outcomes and trials."""

    failures: int
    reset_s: float
    consecutive: int = 0
    last_failure_at: float = 0.0
    trial_at: float | None = None  # the last call let through while failing, since the last failure

    def may_call(self, now: float) -> bool:
        if self.consecutive < self.failures:
            return True  # closed: fewer than N failures in a row
        if now - self.last_failure_at < self.reset_s:
            return False  # open: rest for reset_s after the latest failure
        return self.trial_at is None or now - self.trial_at >= self.reset_s  # one trial per reset_s


operations = st.lists(
    st.one_of(
        st.just("allow"),
        st.just("success"),
        st.just("failure"),
        st.floats(min_value=0.0, max_value=25.0, allow_nan=False),
    ),
    max_size=60,
)


@given(failures=st.integers(min_value=1, max_value=4), reset_s=st.sampled_from([1.0, 5.0, 10.0]), ops=operations)
def test_follows_its_contract_on_any_history(failures: int, reset_s: float, ops: list[str | float]) -> None:
    circuit, clock = breaker(failures=failures, reset_s=reset_s)
    model = Model(failures, reset_s)
    for op in ops:
        if isinstance(op, float):
            clock.advance(op)
        elif op == "failure":
            circuit.record_failure()
            model.consecutive += 1
            model.last_failure_at, model.trial_at = clock.now, None
        elif op == "success":
            circuit.record_success()
            model.consecutive, model.trial_at = 0, None
        else:
            expected = model.may_call(clock.now)
            assert circuit.allow() is expected, (op, clock.now, model)
            if expected and model.consecutive >= failures:
                model.trial_at = clock.now
        is_closed = model.consecutive < failures
        assert (circuit.state is CircuitState.closed) is is_closed
        assert (circuit.retry_in_s() == 0.0) is model.may_call(clock.now)
