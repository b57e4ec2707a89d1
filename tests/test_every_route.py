"""Every route of the API, found in the URL conf (so a new one is covered without editing this file),
answers OPTIONS without a server error, and the caller it is meant for gets 200 with its ``Allow``.
"""

from __future__ import annotations

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from tests.conftest import make_sender
from tests.wallets.conftest import make_person

pytestmark = pytest.mark.django_db

_PARAMETER = re.compile(r"<(?:\w+:)?(\w+)>")


def routes(patterns: list[URLPattern | URLResolver] | None = None, prefix: str = "") -> list[str]:
    """Every route's pattern, as ``api/v1/institutions/<str:code>/events``."""
    found: list[str] = []
    for entry in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            found += routes(entry.url_patterns, route)
        else:
            found.append(route)
    return found


API_ROUTES = sorted({r for r in routes() if r.startswith("api/")} | {"healthz", "readyz"})


def test_the_url_conf_is_walked():
    assert {"api/v1/me/redemptions", "api/v1/institutions/<str:code>/events", "api/v1/schema/"} <= set(API_ROUTES)


@pytest.mark.parametrize("route", API_ROUTES)
def test_options_never_fails_and_the_intended_caller_gets_200(client, route):
    bank = make_sender("bank-a")
    _, token = make_person("mei")
    values = {"code": bank.code, "event_id": "e1", "institution": bank.code}
    unknown = set(_PARAMETER.findall(route)) - set(values)
    assert not unknown, f"give the parameters {unknown} of {route} a value here"
    path = "/" + _PARAMETER.sub(lambda match: values[match.group(1)], route)
    callers = {
        "anyone": {},
        "person": {"Authorization": f"Token {token}"},
        "institution": {"Authorization": f"Bearer {bank.api_token}"},
    }
    statuses = {}
    for caller, headers in callers.items():
        response = client.options(path, headers=headers)
        statuses[caller] = response.status_code
        assert response.status_code in (200, 401, 403, 405), (caller, response.status_code, response.content)
        if response.status_code == 200:
            assert response.has_header("Allow") or not route.startswith("api/"), response.headers
    assert set(statuses.values()) & {200, 405}, statuses


def test_options_on_redemptions_describes_the_post_body(client):
    _, token = make_person("mei")
    response = client.options("/api/v1/me/redemptions", headers={"Authorization": f"Token {token}"})
    assert response.status_code == 200, response.content
    assert set(response.json()["actions"]["POST"]) == {"reward", "quantity"}
    assert response["Allow"] == "GET, POST, HEAD, OPTIONS"
