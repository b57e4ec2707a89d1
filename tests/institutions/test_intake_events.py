"""What the intake stores for good events, the privacy of subject ids, and the rate limit."""

import json
import time
from datetime import UTC, datetime

import psycopg
import pytest
from django.db import connection
from django.test import override_settings

from institutions import crypto, intake
from institutions.models import InboxEvent
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def event(event_type: str, event_id: str, data: dict, *, subject: str | None = "cust-1") -> dict:
    body = {"specversion": "1.0", "id": event_id, "source": "/bank/app", "type": event_type, "data": data}
    if subject is not None:
        body["subject"] = subject
    return body


EVERY_TYPE = [
    activity("recorded", quantity=3, issuer_points=10, fingerprint="sha256:ab", evidence="upload"),
    event("carbon.activity.reversed", "reversed", {"event_id": "recorded", "reason": "refund"}),
    event("carbon.account.linked", "linked", {"link_code": "K7Q-93XA"}),
    event("carbon.account.unlinked", "unlinked", {}),
    event("carbon.redemption.fulfilled", "fulfilled", {"redemption_id": "r-1", "voucher": "V-1"}, subject=None),
    event("carbon.redemption.rejected", "rejected", {"redemption_id": "r-2", "reason": "out of stock"}, subject=None),
    event(
        "carbon.settlement.confirmed",
        "confirmed",
        {"instruction_id": "i-1", "status": "paid", "reference": "BANKREF-1"},
        subject=None,
    ),
]


def test_every_event_type_of_the_contract_is_accepted(client, bank):
    response = post_events(client, bank, EVERY_TYPE)
    assert response.status_code == 202, response.content
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * len(EVERY_TYPE)
    stored = dict(InboxEvent.objects.values_list("event_id", "type"))
    assert stored == {e["id"]: e["type"] for e in EVERY_TYPE}


def test_a_stored_event_keeps_its_attributes_and_the_webhook_id(client, bank):
    response = post_events(client, bank, activity("e1"), msg_id="msg_abc")
    assert response.status_code == 202
    row = InboxEvent.objects.get()
    assert row.institution_id == bank.institution.pk
    assert (row.type, row.source, row.webhook_id, row.status, row.attempts) == (
        "carbon.activity.recorded",
        "/bank/app",
        "msg_abc",
        "received",
        0,
    )
    assert row.time == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    assert row.data == {"action": "transit.metro", "quantity": "12.5", "unit": "km"}
    assert len(row.content_hash) == 64


@pytest.mark.parametrize(
    ("raw", "stored"),
    [(b"12.5", "12.5"), (b"0.1", "0.1"), (b"3", "3"), (b"1e3", "1000"), (b'"0.30"', "0.30")],
)
def test_quantities_are_stored_as_exact_decimal_strings(client, bank, raw, stored):
    # Built by hand so the JSON number reaches the hub exactly as written, never through a float.
    body = json.dumps(activity("e1", quantity="QUANTITY")).encode().replace(b'"QUANTITY"', raw)
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    assert response.status_code == 202, response.content
    assert InboxEvent.objects.get().data["quantity"] == stored


def test_a_single_event_may_also_come_as_application_json(client, bank):
    assert post_events(client, bank, activity("e1"), content_type="application/json").status_code == 202
    assert post_events(client, bank, [activity("e2")], content_type="application/json").status_code == 202
    assert InboxEvent.objects.count() == 2


# --- Privacy ----------------------------------------------------------------------------------------


def inbox_table_text() -> str:
    """Every column of every inbox row, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {InboxEvent._meta.db_table}")  # noqa: S608 (a fixed table name)
        return "\n".join(repr(row) for row in cursor.fetchall())


def test_subject_ids_are_never_stored_in_clear(client, bank):
    subject = "CUSTOMER-0099887766"
    batch = [
        activity("act", subject=subject),
        event("carbon.account.linked", "link", {"link_code": "K7Q-93XA"}, subject=subject),
    ]
    assert post_events(client, bank, batch).status_code == 202

    assert subject not in inbox_table_text()
    rows = {row.event_id: row for row in InboxEvent.objects.all()}
    expected_ref = crypto.subject_ref(bank.code, subject)
    assert rows["act"].subject_ref == rows["link"].subject_ref == expected_ref
    # Only account events keep an encrypted copy: linking must name the subject back to its institution.
    assert rows["act"].subject_sealed == ""
    assert crypto.unseal(rows["link"].subject_sealed) == subject


def test_the_same_subject_at_two_institutions_gets_two_references(client, bank, other_bank):
    post_events(client, bank, activity("e1", subject="cust-1"))
    post_events(client, other_bank, activity("e1", subject="cust-1"))
    refs = set(InboxEvent.objects.values_list("subject_ref", flat=True))
    assert len(refs) == 2


# --- Rate limit -------------------------------------------------------------------------------------


def start_of_a_second() -> None:
    """Wait for a fresh one-second window so a short burst falls inside one."""
    fraction = time.time() % 1
    if fraction > 0.3:
        time.sleep(1.0 - fraction + 0.01)


def set_rate_limit(sender, per_second: int) -> None:
    sender.institution.rate_limit_per_second = per_second
    sender.institution.save(update_fields=["rate_limit_per_second"])
    intake._local_windows.clear()


def test_requests_over_the_institutions_rate_are_429_with_retry_after(client, bank):
    set_rate_limit(bank, 2)
    start_of_a_second()
    first, second, third = (post_events(client, bank, activity(f"e{i}")) for i in range(3))

    assert (first.status_code, second.status_code) == (202, 202)
    assert third.status_code == 429
    assert third["Content-Type"] == "application/problem+json"
    assert third.json()["code"] == "rate-limited"
    assert 1 <= int(third["Retry-After"]) <= 2
    assert sorted(InboxEvent.objects.values_list("event_id", flat=True)) == ["e0", "e1"]


def test_the_rate_limit_is_per_institution(client, bank, other_bank):
    set_rate_limit(bank, 1)
    start_of_a_second()
    assert post_events(client, bank, activity("e1")).status_code == 202
    assert post_events(client, bank, activity("e2")).status_code == 429
    assert post_events(client, other_bank, activity("e1")).status_code == 202


def test_refused_signatures_do_not_use_up_the_rate(client, bank, other_bank):
    # The rate is counted only for authenticated requests, so a stranger cannot lock a bank out.
    set_rate_limit(bank, 1)
    start_of_a_second()
    body = json.dumps(activity("e1")).encode()
    for _ in range(3):
        forged = client.post(
            bank.url, data=body, content_type="application/cloudevents+json", headers=other_bank.headers(body)
        )
        assert forged.status_code == 401
    assert post_events(client, bank, activity("e1")).status_code == 202


@pytest.mark.redis
def test_an_unreachable_rate_limiter_lets_requests_through(client, bank):
    set_rate_limit(bank, 1)
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        responses = [post_events(client, bank, activity(f"e{i}")).status_code for i in range(3)]
    assert responses == [202, 202, 202]


# --- When the database cannot store -----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_when_the_inbox_cannot_be_written_the_answer_is_503_never_202(client, bank):
    table = InboxEvent._meta.db_table
    database = connection.settings_dict
    # Another session holds the inbox table, and this one gives up waiting after half a second.
    with psycopg.connect(
        host=database["HOST"],
        port=database["PORT"] or 5432,
        user=database["USER"],
        password=database["PASSWORD"] or None,
        dbname=database["NAME"],
        autocommit=False,
    ) as blocker:
        blocker.execute("SET lock_timeout = '5s'")  # fail, never hang, should something else hold it
        blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '500ms'")
        try:
            response = post_events(client, bank, activity("e1"))
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET statement_timeout")
        blocker.rollback()

    assert response.status_code == 503
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "unavailable"
    assert response["Retry-After"] == "5"  # a statement timeout is the database's trouble, not the event's
    assert InboxEvent.objects.count() == 0
    assert post_events(client, bank, activity("e1")).status_code == 202  # and stored once it can
