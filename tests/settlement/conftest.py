"""Builders for the settlement tests: four registered institutions (with keys and API tokens), the
worked example's obligations, and confirmations sent through the real signed intake and dispatcher."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from institutions.models import InboxEvent
from settlement.services import ObligationSpec, obligations_record
from tests.conftest import Sender, make_sender, post_events

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


Deliver = Callable[..., list[InboxEvent]]


@pytest.fixture
def deliver(client: Any, django_capture_on_commit_callbacks: Any) -> Deliver:
    """Send events signed by ``sender`` (one request; a batch when several) and return their inbox rows
    after the dispatcher drained them on commit."""

    def send(sender: Sender, *events: dict[str, Any]) -> list[InboxEvent]:
        with django_capture_on_commit_callbacks(execute=True):
            response = post_events(client, sender, list(events) if len(events) > 1 else events[0])
        assert response.status_code == 202, response.content
        return [InboxEvent.objects.get(institution=sender.institution, event_id=e["id"]) for e in events]

    return send
