"""The edge's SQL functions, for other apps' SQL, do what their Python twins do.

``institutions_outbox_enqueue`` stores a webhook as ``institutions.outbox.outbox_enqueue`` does, its
CloudEvent byte for byte as ``outbox_event`` builds it; ``institutions_provider`` and
``institutions_codes`` read institutions as ``provider_state`` and ``institution_codes`` do.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection

from institutions.models import Institution, OutboxMessage
from institutions.outbox import outbox_enqueue, outbox_event, outbox_source
from institutions.selectors import institution_codes, provider_state
from tests.conftest import make_sender

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

DATA: dict[str, Any] = {
    "text": 'a "quote", a back\\slash, a new\nline, a\ttab, a bell \x07, ü ✓ 😀 and \u2028',
    "number": 12,
    "nested": {"list": [1, None, True, 2.5], "empty": {}},
    "subject": None,
}


def enqueue_in_sql(institution: Institution, *, now: datetime, subject: str | None, sealed: str = "") -> OutboxMessage:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT institutions_outbox_enqueue(%s, %s, %s::json, %s, %s, %s, %s)",
            [
                institution.pk,
                "carbon.test.happened",
                json.dumps(DATA, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False),
                sealed,
                outbox_source(),
                now,
                subject,
            ],
        )
        (made,) = cursor.fetchone()
    return OutboxMessage.objects.get(pk=made)


@pytest.mark.parametrize(
    "now",
    [datetime(2026, 11, 24, 19, 41, 0, tzinfo=UTC), datetime(2026, 11, 24, 19, 41, 0, 120, tzinfo=UTC)],
    ids=["whole-second", "microseconds"],
)
@pytest.mark.parametrize("subject", [None, 'cust-"7"'])
def test_sql_builds_the_cloudevent_byte_for_byte_as_python_does(now, subject):
    institution = make_sender("bank-a").institution
    stored = enqueue_in_sql(institution, now=now, subject=subject, sealed="sealed-text")
    python = outbox_event(message_id=stored.message_id, type=stored.type, time=now, data=DATA, subject=subject)
    assert stored.body == python
    assert stored.message_id.startswith("msg_") and len(stored.message_id) == 36
    assert json.loads(stored.body)["data"] == DATA


def test_sql_stores_the_row_python_stores():
    institution = make_sender("bank-a").institution
    in_sql = enqueue_in_sql(institution, now=datetime(2026, 11, 24, 19, 41, 0, 5, tzinfo=UTC), subject=None)
    in_python = outbox_enqueue(institution=institution, type="carbon.test.happened", data=DATA)

    def row(message: OutboxMessage) -> dict[str, Any]:
        fields = ("institution_id", "type", "subject_sealed", "status", "attempts", "last_status_code", "last_error")
        return {
            **{name: getattr(message, name) for name in fields},
            "due at once": message.next_attempt_at == message.created_at,
            "delivered_at": message.delivered_at,
        }

    assert row(in_sql) == row(in_python)
    assert in_sql.message_id != in_python.message_id


def test_providers_and_codes_read_in_sql_as_in_python():
    provider = make_sender("coffee-co", provider=True).institution
    suspended = make_sender("tea-co", provider=True).institution
    Institution.objects.filter(pk=suspended.pk).update(status=Institution.Status.SUSPENDED)
    bank = make_sender("bank-a").institution
    with connection.cursor() as cursor:
        for institution in (provider, suspended, bank):
            cursor.execute("SELECT code, providing FROM institutions_provider(%s)", [institution.pk])
            assert cursor.fetchone() == provider_state(institution.pk)
        cursor.execute("SELECT count(*) FROM institutions_provider(%s)", [10**9])
        assert cursor.fetchone()[0] == 0 and provider_state(10**9) is None
        wanted = [bank.pk, provider.pk, 10**9, bank.pk]
        cursor.execute("SELECT id, code FROM institutions_codes(%s::bigint[])", [wanted])
        assert dict(cursor.fetchall()) == institution_codes(wanted) == {bank.pk: "bank-a", provider.pk: "coffee-co"}
    assert [provider_state(i.pk)[1] for i in (provider, suspended, bank)] == [True, False, False]  # type: ignore[index]
