"""Builders for the redemption tests: providers and rewards through the real services, persons through
the real signup, points put in wallet lots with ledger transfers, requests through the real API."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

import pytest
from django.test import Client

from ledger.models import Account
from ledger.services import lot_expiry
from settlement.models import Reward
from settlement.services import reward_create
from tests.conftest import Sender, make_sender
from tests.wallets.conftest import auth

TODAY = date.today()


def month_end(months_ahead: int) -> date:
    """The expiry bucket ``months_ahead`` months from now: always live for the tests' lifetime."""
    first = TODAY.replace(day=1)
    year, month = divmod(first.month - 1 + months_ahead, 12)
    return lot_expiry(date(first.year + year, month + 1, 1))


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


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
