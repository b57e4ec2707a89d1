"""Builders for the persons' pages' tests."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.wallets.conftest import PASSWORD, make_person
from wallets.models import Person

# Request headers of a browser set to simplified Chinese, and to English (Any: the test client's **extra).
ZH: dict[str, Any] = {"HTTP_ACCEPT_LANGUAGE": "zh-CN,zh;q=0.9"}
EN: dict[str, Any] = {"HTTP_ACCEPT_LANGUAGE": "en-GB,en;q=0.9"}


@pytest.fixture
def person(db: None) -> Person:
    return make_person("mei")[0]


@pytest.fixture
def person_client(person: Person) -> Client:
    """A browser signed in as ``person`` through the sign-in page."""
    browser = Client()
    response = browser.post("/signin/", {"username": "mei", "password": PASSWORD})
    assert response.status_code == 302, response.content
    return browser


def signed_in(client: Client, username: str, password: str = PASSWORD, **headers: Any) -> Client:
    response = client.post("/signin/", {"username": username, "password": password}, **headers)
    assert response.status_code == 302, response.content
    return client
