"""Persons' sign-in, sign-up and link codes are throttled (429 ``rate-limited`` with ``Retry-After``),
on Redis and without it. Before this, 200 wrong passwords in a row were all answered 401."""

from __future__ import annotations

import pytest

from tests.wallets.conftest import PASSWORD, auth, make_person

pytestmark = pytest.mark.django_db


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "in-process"])
def backend(request, settings) -> str:
    if request.param == "in-process":
        settings.REDIS_URL = ""
    return str(request.param)


def sign_in(client, username: str, password: str, address: str = "203.0.113.7"):
    return client.post(
        "/api/v1/auth/token",
        {"username": username, "password": password},
        content_type="application/json",
        REMOTE_ADDR=address,
    )


def sign_up(client, username: str, address: str = "203.0.113.7", password: str = PASSWORD):
    return client.post(
        "/api/v1/auth/signup",
        {"username": username, "password": password},
        content_type="application/json",
        REMOTE_ADDR=address,
    )


def assert_rate_limited(response, window_seconds: int) -> None:
    assert response.status_code == 429, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["status"], body["type"]) == ("rate-limited", 429, "/problems/rate-limited")
    assert 1 <= int(response["Retry-After"]) <= window_seconds


def test_wrong_passwords_for_one_account_are_refused_after_ten(client, backend, settings):
    make_person("alice")
    statuses = [sign_in(client, "alice", f"wrong {n}").status_code for n in range(10)]
    assert statuses == [401] * 10
    # The eleventh is refused before the password is looked at: the right one does not get in either.
    for password in ("wrong again", PASSWORD):
        assert_rate_limited(sign_in(client, "Alice", password, address="198.51.100.9"), 900)
    # Other accounts, from the same address, are not held up by alice's.
    make_person("bob")
    assert sign_in(client, "bob", PASSWORD).status_code == 200


def test_a_success_forgets_the_accounts_failures(client, backend):
    make_person("alice")
    for _ in range(9):
        assert sign_in(client, "alice", "wrong").status_code == 401
    assert sign_in(client, "alice", PASSWORD).status_code == 200
    for _ in range(9):
        assert sign_in(client, "alice", "wrong").status_code == 401
    assert sign_in(client, "alice", PASSWORD).status_code == 200


def test_failures_from_one_address_are_refused_past_its_limit_whatever_the_account(client, backend, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS = 5
    make_person("alice")
    for n in range(5):
        assert sign_in(client, f"guess-{n}", "wrong").status_code == 401
    assert_rate_limited(sign_in(client, "alice", PASSWORD), 900)
    # Another address is not held up, and its successes do not count as failures.
    for _ in range(10):
        assert sign_in(client, "alice", PASSWORD, address="198.51.100.9").status_code == 200


def test_the_address_behind_a_trusted_proxy_is_the_forwarded_one(client, backend, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS = 2
    settings.HUB_TRUSTED_PROXIES = 1

    def via_proxy(username: str, client_ip: str):
        return client.post(
            "/api/v1/auth/token",
            {"username": username, "password": "wrong"},
            content_type="application/json",
            REMOTE_ADDR="10.0.0.2",
            HTTP_X_FORWARDED_FOR=client_ip,
        )

    assert via_proxy("a", "198.51.100.1").status_code == 401
    assert via_proxy("b", "198.51.100.1").status_code == 401
    assert_rate_limited(via_proxy("c", "198.51.100.1"), 900)
    assert via_proxy("d", "198.51.100.2").status_code == 401  # another client behind the same proxy


def test_the_window_comes_from_the_settings(client, backend, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT = 2
    settings.HUB_SIGNIN_WINDOW_SECONDS = 30
    make_person("alice")
    sign_in(client, "alice", "wrong")
    sign_in(client, "alice", "wrong")
    assert_rate_limited(sign_in(client, "alice", PASSWORD), 30)


def test_sign_ups_from_one_address_are_refused_past_its_limit(client, backend, settings):
    settings.HUB_SIGNUP_MAX_PER_ADDRESS = 3
    assert sign_up(client, "one").status_code == 201
    assert sign_up(client, "one").status_code == 409  # a refused sign-up is an attempt too
    assert sign_up(client, "two", password="short").status_code == 400
    assert_rate_limited(sign_up(client, "three"), 3600)
    assert sign_up(client, "three", address="198.51.100.9").status_code == 201


def test_sign_ups_asking_for_one_username_are_refused_past_its_limit(client, backend, settings):
    settings.HUB_SIGNUP_MAX_PER_ACCOUNT = 2
    assert sign_up(client, "taken").status_code == 201
    assert sign_up(client, "TAKEN", address="198.51.100.1").status_code == 409
    assert_rate_limited(sign_up(client, "Taken", address="198.51.100.2"), 3600)


def test_link_codes_are_refused_past_the_persons_limit(client, backend, settings):
    settings.HUB_LINK_CODE_MAX_PER_PERSON = 3
    settings.HUB_LINK_CODES_LIVE_MAX = 2
    _, token = make_person("alice")
    statuses = [client.post("/api/v1/me/link-codes", headers=auth(token)).status_code for _ in range(3)]
    assert statuses == [201, 201, 429]  # the third is refused for the live codes (too-many-link-codes)
    response = client.post("/api/v1/me/link-codes", headers=auth(token))
    assert_rate_limited(response, 3600)
    _, other = make_person("bob")
    assert client.post("/api/v1/me/link-codes", headers=auth(other)).status_code == 201
