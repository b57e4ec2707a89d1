"""The throttle service (clearinghouse.throttle): sliding windows in Redis, and in this process when
there is no Redis or it fails; and the client address it counts by."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from clearinghouse import throttle
from clearinghouse.errors import RateLimited
from clearinghouse.throttle import Window, client_address, throttle_acquire, throttle_release, throttle_reset

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "in-process", "redis-failing"])
def backend(request, settings) -> str:
    """Each test runs on the hub's Redis, without Redis (the embedded default), and with a Redis that fails."""
    if request.param == "in-process":
        settings.REDIS_URL = ""
    elif request.param == "redis-failing":
        settings.REDIS_URL = UNREACHABLE_REDIS
    return str(request.param)


def refused(window: Window, subject: str) -> int:
    """The Retry-After of the refusal of one more attempt (failing the test if it is not refused)."""
    with pytest.raises(RateLimited) as refusal:
        throttle_acquire(window, subject)
    assert refusal.value.status == 429 and refusal.value.code == "rate-limited"
    return int(refusal.value.headers["Retry-After"])


def test_the_limit_holds_per_subject_and_a_refusal_counts_nothing(backend):
    window = Window("test-a", 3, 60, "At most {limit} in {seconds} s.")
    for _ in range(3):
        assert throttle_acquire(window, "alice") is not None
    for _ in range(5):  # refusals do not push the window further out
        assert 59 <= refused(window, "alice") <= 60
    assert throttle_acquire(window, "bob") is not None  # another subject has its own window
    assert throttle_acquire(Window("test-b", 3, 60), "alice") is not None  # and another window


def test_released_and_reset_attempts_no_longer_count(backend):
    window = Window("test-release", 2, 60)
    first = throttle_acquire(window, "alice")
    throttle_acquire(window, "alice")
    refused(window, "alice")
    assert first is not None
    throttle_release(first)
    throttle_acquire(window, "alice")
    refused(window, "alice")
    throttle_reset(window, "alice")
    throttle_acquire(window, "alice")
    throttle_acquire(window, "alice")
    refused(window, "alice")


def test_the_window_slides(backend):
    window = Window("test-slide", 2, 1)
    throttle_acquire(window, "alice")
    time.sleep(0.6)
    throttle_acquire(window, "alice")
    assert refused(window, "alice") == 1
    time.sleep(0.5)  # the first attempt has left the window, the second has not
    throttle_acquire(window, "alice")
    refused(window, "alice")


def test_a_limit_of_zero_turns_the_window_off(backend):
    window = Window("test-off", 0, 60)
    for _ in range(100):
        assert throttle_acquire(window, "alice") is None


def test_concurrent_attempts_cannot_pass_the_limit_together(backend):
    window = Window("test-race", 5, 60)
    granted: list[object] = []
    start = threading.Barrier(40)

    def attempt() -> None:
        start.wait(10)
        with contextlib.suppress(RateLimited):
            granted.append(throttle_acquire(window, "alice"))

    threads = [threading.Thread(target=attempt) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(granted) == 5


@pytest.mark.redis
def test_with_redis_the_windows_are_shared_not_kept_in_the_process():
    window = Window("test-shared", 2, 60)
    throttle_acquire(window, "alice")
    throttle_acquire(window, "alice")
    throttle._local.clear()  # what this process alone knows does not matter: another process counts the same
    refused(window, "alice")


def test_subjects_are_not_stored_in_clear(settings):
    key = throttle._key(Window("signin-account", 1, 1), "alice@example.org")
    assert "alice" not in key and key.startswith(f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:")


def test_the_in_process_windows_sweep_out_expired_subjects(settings, monkeypatch):
    settings.REDIS_URL = ""
    monkeypatch.setattr(throttle._LocalWindows, "SWEEP_AT", 10)
    window = Window("test-sweep", 1, 1)
    for n in range(10):
        throttle_acquire(window, f"subject-{n}")
    time.sleep(1.1)
    throttle_acquire(window, "one more")
    assert len(throttle._local._attempts) == 1


# --- The client's address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "meta", "expected"),
    [
        (0, {"REMOTE_ADDR": "203.0.113.7", "HTTP_X_FORWARDED_FOR": "198.51.100.1"}, "203.0.113.7"),
        (1, {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.1"}, "198.51.100.1"),
        # What the client wrote itself stands left of what the proxy appended.
        (1, {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "1.2.3.4, 198.51.100.1"}, "198.51.100.1"),
        (2, {"REMOTE_ADDR": "10.0.0.3", "HTTP_X_FORWARDED_FOR": "1.2.3.4,198.51.100.1, 10.0.0.2"}, "198.51.100.1"),
        # Fewer entries than proxies: not through the proxies, the connection's address counts.
        (2, {"REMOTE_ADDR": "10.0.0.3", "HTTP_X_FORWARDED_FOR": "198.51.100.1"}, "10.0.0.3"),
        (1, {"REMOTE_ADDR": "10.0.0.2"}, "10.0.0.2"),
        (0, {"REMOTE_ADDR": "2001:db8:1:2:3:4:5:6"}, "2001:db8:1:2::/64"),
        (0, {"REMOTE_ADDR": "2001:db8:1:2:ffff::1"}, "2001:db8:1:2::/64"),
        (0, {"REMOTE_ADDR": "::ffff:192.0.2.9"}, "192.0.2.9"),
        (0, {}, ""),
        (1, {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "not-an-address"}, "not-an-address"),
    ],
)
def test_the_client_address(settings, proxies, meta, expected):
    settings.HUB_TRUSTED_PROXIES = proxies
    assert client_address(meta) == expected
