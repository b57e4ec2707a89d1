"""Signing up and obtaining a token: a username and a password, nothing else."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from tests.wallets.conftest import PASSWORD, auth, make_person
from wallets.models import Person

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"


def test_signup_creates_a_pseudonymous_person_and_a_working_token(client):
    response = client.post(
        "/api/v1/auth/signup", {"username": "alice", "password": PASSWORD}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    token = response.json()["token"]
    assert list(response.json()) == ["token"]
    person = Person.objects.get(user__username="alice")
    assert person.pseudonym.startswith("p_") and "alice" not in person.pseudonym
    assert person.user is not None and person.user.check_password(PASSWORD)
    assert client.get("/api/v1/me/links", headers=auth(token)).json() == []


def test_taken_username_is_409_even_in_another_case(client):
    make_person("alice")
    for username in ("alice", "Alice"):
        response = client.post(
            "/api/v1/auth/signup", {"username": username, "password": PASSWORD}, content_type="application/json"
        )
        assert response.status_code == 409
        assert response["Content-Type"] == PROBLEM
        assert response.json()["code"] == "username-taken"
    assert get_user_model().objects.count() == 1


@pytest.mark.parametrize("password", ["short", "password123", "1234567890123", "bobbytables1"])
def test_weak_password_is_refused_with_the_validators_reasons(client, password):
    response = client.post(
        "/api/v1/auth/signup", {"username": "bobbytables", "password": password}, content_type="application/json"
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid-password"
    assert body["errors"] and all(e["field"] == "password" for e in body["errors"])
    assert not get_user_model().objects.exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"username": "has space", "password": PASSWORD},
        {"username": "x" * 151, "password": PASSWORD},
        {"password": PASSWORD},
        {"username": "carol"},
    ],
)
def test_malformed_signup_is_400_naming_the_field(client, payload):
    response = client.post("/api/v1/auth/signup", payload, content_type="application/json")
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid-request"
    assert {e["field"] for e in body["errors"]} <= {"username", "password"}


def test_token_returns_the_persons_token(client):
    _, token = make_person("alice")
    response = client.post(
        "/api/v1/auth/token", {"username": "alice", "password": PASSWORD}, content_type="application/json"
    )
    assert response.status_code == 200
    assert response.json() == {"token": token}


@pytest.mark.parametrize(("username", "password"), [("alice", "wrong password!"), ("nobody", PASSWORD)])
def test_bad_credentials_are_401_alike(client, username, password):
    make_person("alice")
    response = client.post(
        "/api/v1/auth/token", {"username": username, "password": password}, content_type="application/json"
    )
    assert response.status_code == 401
    assert response["Content-Type"] == PROBLEM
    assert response.json()["code"] == "invalid-credentials"
    assert response.json()["detail"] == "Unknown username or wrong password."


def test_an_operator_is_not_a_person(client):
    operator = get_user_model().objects.create_superuser("root", password=PASSWORD)
    response = client.post(
        "/api/v1/auth/token", {"username": "root", "password": PASSWORD}, content_type="application/json"
    )
    assert response.status_code == 401
    token = Token.objects.create(user=operator)
    response = client.get("/api/v1/me/links", headers=auth(token.key))
    assert response.status_code == 403
    assert response.json()["code"] == "not-a-person"


def test_me_needs_a_token(client):
    for method, path in [
        ("get", "/api/v1/me/links"),
        ("post", "/api/v1/me/link-codes"),
        ("delete", "/api/v1/me/links/bank-a"),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 401, path
        assert response.json()["code"] == "not-authenticated"
    response = client.get("/api/v1/me/links", headers=auth("not-a-token"))
    assert response.status_code == 401
    assert response.json()["code"] == "authentication-failed"


def test_the_person_comes_with_the_token_in_one_query(client, django_assert_num_queries):
    """Token, user and person in one query; then the view's own (the links)."""
    _person, token = make_person("mei")
    with django_assert_num_queries(2):
        response = client.get("/api/v1/me/links", headers=auth(token))
    assert response.status_code == 200


def test_an_inactive_users_token_is_refused(client):
    person, token = make_person("mei")
    assert person.user is not None
    get_user_model().objects.filter(pk=person.user.pk).update(is_active=False)
    response = client.get("/api/v1/me/links", headers=auth(token))
    assert response.status_code == 401
    assert response.json()["code"] == "authentication-failed"


def test_a_session_user_is_found_as_a_person_too(client):
    person, _token = make_person("mei")
    client.force_login(person.user)
    assert client.get("/api/v1/me/links").status_code == 200
