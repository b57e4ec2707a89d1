"""Every cursor-paginated list answers a cursor it did not give out with ``400 invalid-cursor``: not a
404 (DRF's answer, which reads as "no such list"), and not a 500 for a crafted cursor whose position
the ordering field cannot hold."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import make_sender
from tests.settlement.conftest import bearer
from tests.wallets.conftest import auth, make_person

pytestmark = pytest.mark.django_db


def crafted(query: str) -> str:
    """A cursor as DRF encodes one: base64 of a query string (o offset, r reverse, p position)."""
    return base64.b64encode(query.encode()).decode()


CURSORS = [
    "not-a-cursor",
    "s\x18ñ",  # what schemathesis sent first
    crafted("o=-1"),
    crafted("r=x"),
    crafted("p=not-a-position"),
    crafted("p=99999999999999999999999999"),
    crafted("p=9999-12-31T23:59:59-14:00"),
    crafted("p=0001-01-01T00:00:00%2B14:00"),
    crafted("p=2026-01-01%00"),
]


@pytest.fixture
def lists(client) -> list[tuple[str, dict[str, str]]]:
    _, token = make_person("mei")
    bank = make_sender("bank-a")
    return [
        ("/api/v1/me/activities", auth(token)),
        ("/api/v1/me/redemptions", auth(token)),
        (f"/api/v1/institutions/{bank.code}/settlements", bearer(bank)),
    ]


@pytest.mark.parametrize("cursor", CURSORS)
def test_a_cursor_the_list_did_not_give_out_is_400_invalid_cursor(client, lists, cursor):
    for path, headers in lists:
        response = client.get(path, {"cursor": cursor}, headers=headers)
        assert response.status_code == 400, (path, response.content)
        assert response["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "invalid-cursor"


def test_the_cursors_the_lists_give_out_still_work(client, lists):
    for path, headers in lists:
        first = client.get(path, headers=headers)
        assert first.status_code == 200, first.content
        # A position of the ordering field's own kind is accepted, whatever page it leads to.
        for position in ("p=2026-11-24+08%3A00%3A00%2B00%3A00", "p=17", "o=5"):
            response = client.get(path, {"cursor": crafted(position)}, headers=headers)
            assert response.status_code in (200, 400), response.content
        assert client.get(path, {"cursor": crafted("o=1")}, headers=headers).status_code == 200
