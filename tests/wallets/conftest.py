"""Builders for the wallets tests: persons made through the real signup, link events sent through the
real signed intake and drained by the real dispatcher."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from institutions.models import InboxEvent
from ledger.services import AccountKey, TransferSpec, accounts_ensure, transfers_post
from wallets.models import Person
from wallets.services import person_signup

PASSWORD = "a long and unusual passphrase"


def make_person(username: str) -> tuple[Person, str]:
    """A person signed up through the service, and their API token."""
    signed_up = person_signup(username=username, password=PASSWORD)
    return signed_up.person, signed_up.token


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def new_code(client: Any, token: str) -> str:
    response = client.post("/api/v1/me/link-codes", headers=auth(token))
    assert response.status_code == 201, response.content
    return str(response.json()["code"])


def link_event(code: str, *, subject: str = "cust-77", event_id: str | None = None) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or f"link-{uuid.uuid4().hex[:12]}",
        "source": "/bank",
        "type": "carbon.account.linked",
        "subject": subject,
        "data": {"link_code": code},
    }


def unlink_event(*, subject: str = "cust-77", event_id: str | None = None) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or f"unlink-{uuid.uuid4().hex[:12]}",
        "source": "/bank",
        "type": "carbon.account.unlinked",
        "subject": subject,
        "data": {},
    }


def outcome(row: InboxEvent) -> dict[str, Any]:
    """The outcome of a row, asserting the dispatcher processed it (a refused link is not an error)."""
    assert row.status == InboxEvent.Status.PROCESSED, (row.status, row.last_error)
    assert row.outcome is not None
    return row.outcome


# --- Balances, straight through the ledger's services -------------------------------------------------


def credit(person_id: int, issuer_id: int, expires_on: date, mg: int) -> None:
    """``mg`` from the issuer's outstanding into the person's wallet lot of that month."""
    lot = AccountKey.wallet_lot(person_id=person_id, issuer_id=issuer_id, expires_on=expires_on)
    issuer = AccountKey.issuer_outstanding(issuer_id=issuer_id)
    ids = accounts_ensure(keys=[lot, issuer])
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"test-credit:{uuid.uuid4().hex}",
                kind="credit",
                legs=[(ids[issuer], -mg), (ids[lot], mg)],
            )
        ]
    )


def owe(person_id: int, issuer_id: int, mg: int) -> None:
    """The issuer takes back ``mg`` the person no longer has: a debt."""
    debt = AccountKey.person_debt(person_id=person_id, issuer_id=issuer_id)
    taken_back = AccountKey.reversed(issuer_id=issuer_id)
    ids = accounts_ensure(keys=[debt, taken_back])
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"test-reverse:{uuid.uuid4().hex}",
                kind="reverse",
                legs=[(ids[debt], -mg), (ids[taken_back], mg)],
            )
        ]
    )
