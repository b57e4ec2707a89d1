"""``rows_update``: each row its own values in one statement, optionally only where a row still matches."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from clearinghouse.db import rows_update
from institutions.models import InboxEvent, OutboxMessage
from institutions.outbox import outbox_message
from tests.conftest import make_sender

pytestmark = pytest.mark.django_db


def _messages(n: int) -> list[OutboxMessage]:
    institution = make_sender("shop-a", provider=True).institution
    messages = [outbox_message(institution_id=institution.pk, type="t", data={"n": i}) for i in range(n)]
    for message in messages:
        message.save(force_insert=True)
    return messages


def test_each_row_gets_its_own_values_and_nulls_stay_nulls() -> None:
    one, two, untouched = _messages(3)
    later = timezone.now() + timedelta(minutes=5)
    written = rows_update(
        OutboxMessage,
        [one.pk, two.pk],
        {
            "status": ("text", ["delivered", "failed"]),
            "next_attempt_at": ("timestamptz", [one.next_attempt_at, later]),
            "last_status_code": ("int", [204, None]),
            "last_error": ("text", ["", 'HTTP 500: "quoted", {braces}, back\\\\slash']),
            "delivered_at": ("timestamptz", [later, None]),
        },
    )
    assert written == {one.pk, two.pk}
    rows = {m.pk: m for m in OutboxMessage.objects.all()}
    assert (rows[one.pk].status, rows[one.pk].last_status_code, rows[one.pk].delivered_at) == ("delivered", 204, later)
    assert (rows[two.pk].status, rows[two.pk].last_status_code, rows[two.pk].delivered_at) == ("failed", None, None)
    assert rows[two.pk].next_attempt_at == later
    assert rows[two.pk].last_error == 'HTTP 500: "quoted", {braces}, back\\\\slash'
    assert rows[untouched.pk].status == "pending"


def test_rows_that_no_longer_match_are_left_alone() -> None:
    current, taken_over = _messages(2)
    OutboxMessage.objects.filter(pk=taken_over.pk).update(attempts=2)
    written = rows_update(
        OutboxMessage,
        [current.pk, taken_over.pk],
        {"status": ("text", ["delivered", "delivered"])},
        match={"attempts": ("int", [0, 1])},
    )
    assert written == {current.pk}
    assert dict(OutboxMessage.objects.values_list("pk", "status")) == {
        current.pk: "delivered",
        taken_over.pk: "pending",
    }


def test_json_and_one_value_for_every_row() -> None:
    events = [
        InboxEvent.objects.create(
            institution=make_sender(f"bank-{i}").institution,
            event_id=f"e-{i}",
            type="t",
            source="s",
            content_hash="h",
            webhook_id=f"w-{i}",
        )
        for i in range(2)
    ]
    now = timezone.now()
    rows_update(
        InboxEvent,
        [e.pk for e in events],
        {"outcome": ("jsonb", [{"points": 42, "note": 'a "b"'}, None])},
        same={"processed_at": now},
    )
    assert list(InboxEvent.objects.order_by("pk").values_list("outcome", "processed_at")) == [
        ({"points": 42, "note": 'a "b"'}, now),
        (None, now),
    ]


def test_no_rows_is_no_statement(django_assert_num_queries: object) -> None:
    with django_assert_num_queries(0):  # type: ignore[operator]
        assert rows_update(OutboxMessage, [], {"status": ("text", [])}) == set()
