"""Builders for the settlement tests: four registered institutions (with keys and API tokens), the
worked example's obligations, and confirmations sent through the real signed intake and dispatcher;
for the redemption tests, providers and rewards through the real services, persons through the real
signup, points put in wallet lots with ledger transfers, requests through the real API.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from django.test import Client

from institutions.models import InboxEvent
from ledger.models import Account
from ledger.services import lot_expiry
from settlement.models import Reward
from settlement.services import ObligationSpec, obligations_record, reward_create
from tests.conftest import Sender, make_sender
from tests.wallets.conftest import auth

# A Friday, 20:00 in the standard's time zone (Asia/Shanghai).
T0 = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
CUT = T0 + timedelta(hours=1)

# The worked example of the issue: six gross obligations among four institutions, in minor units.
WORKED = [("A", "B", 100), ("B", "C", 80), ("C", "A", 50), ("A", "D", 30), ("D", "B", 20), ("C", "D", 10)]


@pytest.fixture
def senders(db: None) -> dict[str, Sender]:
    """Institutions A to D (codes bank-a .. bank-d) as they see themselves: keys and API token."""
    return {name: make_sender(f"bank-{name.lower()}") for name in "ABCD"}


def record(
    senders: dict[str, Sender], obligations: list[tuple[str, str, int]], *, at: datetime = T0, tag: str = "test"
) -> None:
    """One source per obligation, as separate redemptions would give."""
    for n, (debtor, creditor, amount) in enumerate(obligations):
        obligations_record(
            source=f"{tag}:{n}",
            obligations=[ObligationSpec(senders[debtor].institution.pk, senders[creditor].institution.pk, amount)],
            now=at,
        )


def bearer(sender: Sender) -> dict[str, str]:
    return {"Authorization": f"Bearer {sender.api_token}"}


def canonical_digest(lines: list[dict[str, Any]]) -> str:
    """The statement digest as an institution recomputes it from the documentation alone."""
    encoded = sorted(
        "|".join(
            [str(x["id"]), x["source"], x["debtor"] or "", x["creditor"] or "", str(x["amount_minor"]), x["currency"]]
        ).encode()
        for x in lines
    )
    return "sha256:" + hashlib.sha256(b"".join(line + b"\n" for line in encoded)).hexdigest()


def confirmed_event(
    instruction_id: str, status: str, reference: str = "REF-1", *, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id or f"conf-{uuid.uuid4().hex[:12]}",
        "source": "/bank/treasury",
        "type": "carbon.settlement.confirmed",
        "data": {"instruction_id": instruction_id, "status": status, "reference": reference},
    }


def outcome(row: InboxEvent) -> dict[str, Any]:
    """The outcome of a row, read again from the database, asserting the dispatcher processed it."""
    row.refresh_from_db()
    assert row.status == InboxEvent.Status.PROCESSED, (row.status, row.last_error)
    assert row.outcome is not None
    return row.outcome


TODAY = date.today()


def month_end(months_ahead: int) -> date:
    """The expiry bucket ``months_ahead`` months from now: always live for the tests' lifetime."""
    first = TODAY.replace(day=1)
    year, month = divmod(first.month - 1 + months_ahead, 12)
    return lot_expiry(date(first.year + year, month + 1, 1))


@pytest.fixture
def provider(db: None) -> Sender:
    return make_sender("coffee-co", provider=True)


def make_reward(provider: Sender, code: str = "coffee", *, points: int = 30, **options: Any) -> Reward:
    return reward_create(
        provider=provider.institution, code=code, title=code.replace("-", " ").title(), points=points, **options
    )


def redeem(
    client: Client,
    token: str,
    reward: str = "coffee",
    quantity: int | None = 1,
    *,
    key: str | None = None,
    **extra: Any,
) -> Any:
    """``POST /api/v1/me/redemptions`` as the person with ``token``; a fresh Idempotency-Key unless given."""
    body: dict[str, Any] = {"reward": reward, **extra}
    if quantity is not None:
        body["quantity"] = quantity
    headers = {**auth(token), "Idempotency-Key": key if key is not None else f"k-{uuid.uuid4()}"}
    return client.post("/api/v1/me/redemptions", data=body, content_type="application/json", headers=headers)


def lot_balances(person_id: int) -> dict[tuple[int, date | None], int]:
    """``{(issuer id, expires_on): balance}`` of the person's wallet lots."""
    return {
        (issuer_id, expires_on): balance
        for issuer_id, expires_on, balance in Account.objects.filter(
            kind="wallet_lot", person_id=person_id
        ).values_list("issuer_id", "expires_on", "balance")
    }


def kind_total(kind: str, **filters: Any) -> int:
    return sum(Account.objects.filter(kind=kind, **filters).values_list("balance", flat=True))
