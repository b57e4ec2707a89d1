"""Signing up, in and out, and changing the password on the persons' pages: the same accounts as the API,
the same throttles, Django's field names and the autocomplete values password managers look for."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from tests.portal.conftest import EN, ZH, signed_in
from tests.wallets.conftest import PASSWORD, make_person
from wallets.models import Person

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "bamboo shoots in the spring rain"


def inputs(html: str) -> dict[str, str]:
    """``{name: the whole <input> tag}`` of a page."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<input[^>]*\bname="([^"]+)"[^>]*>', html)}


def test_the_sign_up_form_keeps_djangos_field_names_and_autocomplete_values(client):
    fields = inputs(client.get("/signup/").content.decode())
    assert 'autocomplete="username"' in fields["username"]
    assert 'autocomplete="new-password"' in fields["password1"]
    assert 'autocomplete="new-password"' in fields["password2"]
    assert 'type="password"' in fields["password1"]


def test_the_sign_in_form_keeps_djangos_field_names_and_autocomplete_values(client):
    fields = inputs(client.get("/signin/").content.decode())
    assert 'autocomplete="username"' in fields["username"]
    assert 'autocomplete="current-password"' in fields["password"]


def test_signing_up_makes_a_person_with_an_api_token_and_signs_them_in(client):
    response = client.post("/signup/", {"username": "lin", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    person = Person.objects.get(user__username="lin")
    home = client.get("/")
    assert home.status_code == 200 and home.context["summary"].points == 0
    # The same account signs in to the API.
    token = Client().post(
        "/api/v1/auth/token", {"username": "lin", "password": PASSWORD}, content_type="application/json"
    )
    assert token.status_code == 200, token.content
    assert person.user is not None and person.user.auth_token.key == token.json()["token"]


def test_an_account_made_through_the_api_signs_in_on_the_pages(client):
    made = Client().post(
        "/api/v1/auth/signup", {"username": "wei", "password": PASSWORD}, content_type="application/json"
    )
    assert made.status_code == 201, made.content
    response = client.post("/signin/", {"username": "wei", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").context["user"].username == "wei"


def test_a_wrong_password_is_said_plainly_and_signs_nobody_in(client, person):
    response = client.post("/signin/", {"username": "mei", "password": "not the password"}, **ZH)
    assert response.status_code == 200
    assert "用户名或密码不正确。" in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert client.get("/password/").status_code == 302  # still signed out


def test_an_empty_form_is_refused_with_errors_on_its_fields(client):
    response = client.post("/signin/", {"username": "", "password": ""}, **EN)
    html = response.content.decode()
    assert response.status_code == 200
    assert 'aria-invalid="true"' in inputs(html)["username"]
    assert 'aria-describedby="id_username_errors"' in inputs(html)["username"]
    assert 'id="id_username_errors"' in html


def test_the_username_is_taken_in_any_case(client, person):
    response = client.post("/signup/", {"username": "MEI", "password1": PASSWORD, "password2": PASSWORD}, **EN)
    assert response.status_code == 200
    assert "This username is taken." in response.content.decode()
    assert 'aria-invalid="true"' in inputs(response.content.decode())["username"]
    assert Person.objects.count() == 1


def test_a_weak_password_is_refused_on_its_field_in_the_pages_language(client):
    response = client.post("/signup/", {"username": "lin", "password1": "12345", "password2": "12345"}, **ZH)
    html = response.content.decode()
    assert response.status_code == 200
    password1 = inputs(html)["password1"]
    assert 'aria-invalid="true"' in password1
    assert "id_password1_help id_password1_errors" in password1
    errors = re.search(r'<ul class="field__errors" id="id_password1_errors">(.*?)</ul>', html, re.DOTALL)
    assert errors is not None and "密码" in errors.group(1)  # Django's validators, in Chinese
    assert not Person.objects.exists()


def test_after_sign_in_the_page_asked_for_and_never_another_site(client, person):
    response = client.get("/password/")
    assert response.status_code == 302 and response["Location"] == "/signin/?next=/password/"
    response = client.post("/signin/", {"username": "mei", "password": PASSWORD, "next": "/password/"})
    assert response["Location"] == "/password/"
    client.post("/signout/")
    response = client.post("/signin/", {"username": "mei", "password": PASSWORD, "next": "https://evil.example/"})
    assert response["Location"] == "/"


def test_sign_out_is_a_post(person_client):
    assert person_client.get("/signout/").status_code == 405
    assert person_client.get("/password/").status_code == 200  # a GET signed nobody out
    response = person_client.post("/signout/")
    assert response.status_code == 302 and response["Location"] == "/"
    assert person_client.get("/password/").status_code == 302


def test_changing_the_password_keeps_this_session_and_ends_the_others(person, person_client):
    other_browser = signed_in(Client(), "mei")
    response = person_client.post(
        "/password/", {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert person_client.get("/password/").status_code == 200
    assert other_browser.get("/password/").status_code == 302
    assert Client().post("/signin/", {"username": "mei", "password": PASSWORD}).status_code == 200  # refused
    signed_in(Client(), "mei", NEW_PASSWORD)


def test_a_wrong_current_password_changes_nothing(person, person_client):
    response = person_client.post(
        "/password/", {"old_password": "wrong", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}, **ZH
    )
    assert response.status_code == 200
    assert "当前密码不正确。" in response.content.decode()
    person.user.refresh_from_db()
    assert person.user.check_password(PASSWORD)


# --- Throttles: the same windows as the API's --------------------------------------------------------


def test_failed_sign_ins_are_throttled_per_account_with_a_translated_message(client, person, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT = 3
    for _ in range(3):
        assert client.post("/signin/", {"username": "mei", "password": "wrong"}).status_code == 200
    response = client.post("/signin/", {"username": "mei", "password": PASSWORD}, **ZH)
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert "尝试次数过多" in response.content.decode() and "分钟后再试" in response.content.decode()
    assert "_auth_user_id" not in client.session
    # The API's token counts in the same window: it is refused too.
    api = Client().post(
        "/api/v1/auth/token", {"username": "mei", "password": PASSWORD}, content_type="application/json"
    )
    assert api.status_code == 429


def test_failures_through_the_api_throttle_the_page_too(client, person, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT = 2
    for _ in range(2):
        api = Client().post("/api/v1/auth/token", {"username": "mei", "password": "x"}, content_type="application/json")
        assert api.status_code == 401
    response = client.post("/signin/", {"username": "MEI", "password": PASSWORD}, **EN)
    assert response.status_code == 429
    assert "Too many attempts." in response.content.decode()


def test_failed_sign_ins_are_throttled_per_address(client, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS = 3
    make_person("mei")
    for name in ("a1", "a2", "a3"):
        assert (
            client.post("/signin/", {"username": name, "password": "x"}, REMOTE_ADDR="203.0.113.9").status_code == 200
        )
    refused = client.post("/signin/", {"username": "mei", "password": PASSWORD}, REMOTE_ADDR="203.0.113.9")
    assert refused.status_code == 429
    allowed = client.post("/signin/", {"username": "mei", "password": PASSWORD}, REMOTE_ADDR="203.0.113.10")
    assert allowed.status_code == 302


def test_sign_ups_are_throttled_per_address(client, settings):
    settings.HUB_SIGNUP_MAX_PER_ADDRESS = 2
    for name in ("s1", "s2"):
        body = {"username": name, "password1": PASSWORD, "password2": PASSWORD}
        assert Client().post("/signup/", body, REMOTE_ADDR="203.0.113.7").status_code == 302
    body = {"username": "s3", "password1": PASSWORD, "password2": PASSWORD}
    response = client.post("/signup/", body, REMOTE_ADDR="203.0.113.7", **EN)
    assert response.status_code == 429 and "Too many attempts." in response.content.decode()
    assert not get_user_model().objects.filter(username="s3").exists()


def test_guessing_the_current_password_counts_as_failed_sign_ins(person, person_client, settings):
    settings.HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT = 2
    body = {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    for guess in ("one", "two"):
        assert person_client.post("/password/", {"old_password": guess, **body}).status_code == 200
    response = person_client.post("/password/", {"old_password": PASSWORD, **body}, **ZH)
    assert response.status_code == 429 and "尝试次数过多" in response.content.decode()
    person.user.refresh_from_db()
    assert person.user.check_password(PASSWORD)
    assert Client().post("/signin/", {"username": "mei", "password": PASSWORD}).status_code == 429


# --- Operators on the persons' pages -----------------------------------------------------------------


@pytest.fixture
def operator(db):
    return get_user_model().objects.create_user("ops", password=PASSWORD, is_staff=True)


def test_an_operator_signed_in_through_the_admin_gets_a_page_not_an_error(client, operator):
    client.force_login(operator)
    for path in ("/", "/password/"):
        response = client.get(path, **EN)
        assert response.status_code == 403, path
        assert "This account has no carbon account" in response.content.decode()
        assert 'href="/admin/"' in response.content.decode()
    assert client.get("/standard/").status_code == 200


def test_an_operator_cannot_sign_in_on_the_persons_pages(client, operator):
    response = client.post("/signin/", {"username": "ops", "password": PASSWORD}, **EN)
    assert response.status_code == 200 and "The username or the password is not right." in response.content.decode()
