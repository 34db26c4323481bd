import pytest

from backlane import Retry, RetryPolicy


def test_exponential_backoff_with_jitter_and_cap() -> None:
    policy = RetryPolicy(retries=5, backoff=2.0, max_backoff=10.0)
    for attempt, full in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (5, 10.0)]:
        delays = {policy.delay_after(attempt, RuntimeError()) for _ in range(50)}
        assert all(full / 2 <= d <= full for d in delays)  # type: ignore[operator]
        assert len(delays) > 1  # jittered
    assert policy.delay_after(6, RuntimeError()) is None


def test_only_listed_exceptions_are_retried() -> None:
    policy = RetryPolicy(retries=3, retry_on=(ConnectionError,))
    assert policy.delay_after(1, ConnectionResetError()) is not None
    assert policy.delay_after(1, ValueError()) is None


def test_retry_signal_sets_its_own_delay() -> None:
    policy = RetryPolicy(retries=1, retry_on=(ConnectionError,))
    assert policy.delay_after(1, Retry(delay=7)) == 7
    assert policy.delay_after(2, Retry(delay=7)) is None


def test_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
