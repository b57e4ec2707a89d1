"""The pages' security: CSRF on every form, a Content-Security-Policy without inline code, no framing,
cookies locked down in production, personal pages never cached, nothing of a person in URLs or logs."""

from __future__ import annotations

import logging
import re
import runpy
from pathlib import Path

import pytest
from django.test import Client

from portal.management.commands.portal_messages import PORTAL
from tests.portal.conftest import ZH
from tests.wallets.conftest import PASSWORD

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["/", "/signin/", "/signup/", "/standard/"]
PERSON_PAGES = ["/", "/password/"]


def directives(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}


@pytest.mark.parametrize("path", PAGES)
def test_every_page_sends_a_csp_without_inline_code_and_refuses_framing(client, path):
    response = client.get(path)
    policy = directives(response)
    assert policy["default-src"] == ["'self'"]
    for directive in ("script-src", "style-src"):
        assert policy[directive] == ["'self'"], policy
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]
    assert "'unsafe-inline'" not in response["Content-Security-Policy"]
    assert "'unsafe-eval'" not in response["Content-Security-Policy"]
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"


def test_the_admin_may_have_inline_styles_but_never_inline_scripts(client):
    policy = directives(client.get("/admin/login/"))
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]


def test_no_template_holds_inline_script_style_or_event_handlers():
    for path in Path(PORTAL, "templates").rglob("*.html"):
        source = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", source), f"inline <script> in {path.name}"
        assert not re.search(r"<style\b|\sstyle=", source), f"inline style in {path.name}"
        assert not re.search(r"\son[a-z]+=", source), f"event handler attribute in {path.name}"


def test_every_form_posts_with_its_csrf_token(person_client, client):
    pages = [client.get(path).content.decode() for path in PAGES]
    pages += [person_client.get(path).content.decode() for path in PERSON_PAGES]
    forms = [form for page in pages for form in re.findall(r"<form\b.*?</form>", page, re.DOTALL)]
    assert len(forms) >= 10
    for form in forms:
        assert 'method="post"' in form, form
        assert 'name="csrfmiddlewaretoken"' in form, form


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/signin/", {"username": "mei", "password": PASSWORD}),
        ("/signup/", {"username": "lin", "password1": PASSWORD, "password2": PASSWORD}),
        ("/i18n/setlang/", {"language": "en"}),
        ("/signout/", {}),
    ],
)
def test_a_form_without_its_csrf_token_is_refused_with_a_page_in_the_persons_language(person, path, body):
    browser = Client(enforce_csrf_checks=True)
    response = browser.post(path, body, **ZH)
    assert response.status_code == 403
    assert "页面已过期" in response.content.decode()


def test_changing_the_password_needs_the_csrf_token(person):
    browser = Client(enforce_csrf_checks=True)
    page = browser.get("/signin/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)  # type: ignore[union-attr]
    assert (
        browser.post("/signin/", {"username": "mei", "password": PASSWORD, "csrfmiddlewaretoken": token}).status_code
        == 302
    )
    body = {"old_password": PASSWORD, "new_password1": "x" * 20, "new_password2": "x" * 20}
    assert browser.post("/password/", body).status_code == 403
    person.user.refresh_from_db()
    assert person.user.check_password(PASSWORD)


@pytest.mark.parametrize("path", PERSON_PAGES)
def test_a_persons_pages_are_never_cached(person_client, path):
    cache_control = person_client.get(path)["Cache-Control"]
    assert "no-store" in cache_control and "private" in cache_control


def test_sign_in_pages_are_never_cached(client):
    for path in ("/signin/", "/signup/"):
        assert "no-store" in client.get(path)["Cache-Control"]


def test_nothing_of_a_person_goes_into_a_url_or_a_log_line(client, caplog):
    """Sign up, fail to sign in, sign in, change the password, sign out: the username and the passwords
    appear in no redirect and no log record, at any level."""
    username, wrong, new = "unusual-name-4711", "wrong-secret-0815", "another-secret-passphrase"
    caplog.set_level(logging.DEBUG)
    responses = [
        client.post("/signup/", {"username": username, "password1": PASSWORD, "password2": PASSWORD}),
        client.post("/signout/"),
        client.post("/signin/", {"username": username, "password": wrong}),
        client.post("/signin/", {"username": username, "password": PASSWORD}),
        client.post("/password/", {"old_password": wrong, "new_password1": new, "new_password2": new}),
        client.post("/password/", {"old_password": PASSWORD, "new_password1": new, "new_password2": new}),
        client.post("/signout/"),
        client.get("/no/such/page/"),
    ]
    for response in responses:
        assert not any(secret in response.get("Location", "") for secret in (username, wrong, PASSWORD, new))
    logged = "\n".join(f"{record.getMessage()} {record.args!r}" for record in caplog.records)
    for secret in (username, wrong, PASSWORD, new):
        assert secret not in logged


# --- Cookies in production ----------------------------------------------------------------------------

PRODUCTION = {
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": "x" * 60,
    "DJANGO_ALLOWED_HOSTS": "hub.example.org",
    "HUB_ENCRYPTION_KEYS": "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0zMmJ5dGU=",
    "HUB_SUBJECT_KEY": "subject-key",
}


@pytest.mark.parametrize(("debug", "secure"), [("0", True), ("1", False)])
def test_session_csrf_and_language_cookies_are_locked_down_in_production(monkeypatch, tmp_path, debug, secure):
    monkeypatch.setenv("CLEARINGHOUSE_VAR_DIR", str(tmp_path))
    for name, value in {**PRODUCTION, "DJANGO_DEBUG": debug}.items():
        monkeypatch.setenv(name, value)
    loaded = runpy.run_path(str(ROOT / "clearinghouse" / "settings.py"))
    for cookie in ("SESSION", "CSRF", "LANGUAGE"):
        assert loaded[f"{cookie}_COOKIE_SECURE"] is secure
        assert loaded[f"{cookie}_COOKIE_HTTPONLY"] is True
        assert loaded[f"{cookie}_COOKIE_SAMESITE"] == "Lax"
    assert loaded["X_FRAME_OPTIONS"] == "DENY"
