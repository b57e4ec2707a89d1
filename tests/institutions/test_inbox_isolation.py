"""One event's trouble is its own: whatever a row does in the worker, every other row is processed.

The reported case: an activity dated ``0001-01-01T00:00:00+14:00`` (1 BC in UTC) was accepted,
PostgreSQL stored it, psycopg could not read it back. Claimed in a batch with another institution's
50 good events, it failed the batch; the failure handler read the row again, raised again and killed
the drain; the 50 stayed leased, were claimed again until their attempts ran out and ended ``dead``.
The intake refuses such times now, so these tests plant the rows with SQL, as stored before.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client, override_settings
from django.utils import timezone

from institutions import crypto, inbox, tasks
from institutions.models import InboxEvent
from ledger.models import Transfer
from methodology.models import ActionMapping, NormalizedActivity, Scenario
from methodology.services import standard_changed
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def plant(sender, event_id: str, *, time: str | None, data: dict | None = None, subject: str = "cust-bad") -> int:
    """Insert an activity row as the intake used to, with ``time`` given to PostgreSQL as text."""
    data = data or {"action": "transit.metro", "quantity": "3", "unit": "km"}
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO {InboxEvent._meta.db_table}
                    (institution_id, event_id, type, source, subject_ref, subject_sealed, time, data, content_hash,
                     webhook_id, received_at, status, attempts, available_at, last_error)
                VALUES (%s, %s, 'carbon.activity.recorded', '/bank/app', %s, '', %s::timestamptz, %s::jsonb, %s,
                        'msg_planted', now(), 'received', 0, now(), '')
                RETURNING id""",  # noqa: S608 (the table name only)
            [
                sender.institution.pk,
                event_id,
                crypto.subject_ref(sender.code, subject),
                time,
                json.dumps(data),
                uuid.uuid4().hex * 2,
            ],
        )
        return int(cursor.fetchone()[0])


def send(client, sender, events: list[dict]) -> None:
    response = post_events(client, sender, events)
    assert response.status_code == 202, response.content
    assert {r["status"] for r in response.json()["results"]} == {"accepted"}


def status_of(event_id: str) -> tuple[str, int, str]:
    return InboxEvent.objects.filter(event_id=event_id).values_list("status", "attempts", "last_error").get()


def credited(sender) -> int:
    """How many of ``sender``'s events have a credited activity and their ledger transfer."""
    ids = list(InboxEvent.objects.filter(institution=sender.institution).values_list("id", flat=True))
    activities = NormalizedActivity.objects.filter(inbox_event_id__in=ids, status="credited", credited_mg__gt=0)
    transfers = Transfer.objects.filter(idempotency_key__in=[f"activity:{i}" for i in ids])
    assert activities.count() == transfers.count()
    return activities.count()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("moment", "stored_as"),
    [("0001-01-01T00:00:00+14:00", "0001-12-31 10:00:00+00 BC"), ("9999-12-31T23:59:59-14:00", "10000-01-01")],
)
def test_an_unreadable_row_dies_alone_and_another_institutions_50_events_are_credited(
    client, bank, other_bank, moment, stored_as
):
    good = [activity(f"good-{i}", subject=f"cust-{i}") for i in range(50)]
    send(client, other_bank, good[:25])
    plant(bank, "bad", time=moment)  # in the middle of the other institution's events: one batch
    send(client, other_bank, good[25:])

    tally = tasks.inbox_drain()  # returns: the drain task does not die on the row

    assert tally == {"processed": 50, "dead": 1}
    assert credited(other_bank) == 50
    assert set(InboxEvent.objects.filter(institution=other_bank.institution).values_list("status", flat=True)) == {
        "processed"
    }
    status, attempts, error = status_of("bad")
    assert (status, attempts) == ("dead", 1)  # the database cannot hold it: no point in trying again
    assert error.startswith("DataError: timestamp too ")
    # The value is moved into the note and the column emptied, so the row can be read from now on.
    assert stored_as in error and "was cleared" in error
    assert InboxEvent.objects.get(event_id="bad").time is None

    follow = client.get(
        f"/api/v1/institutions/{bank.code}/events/bad", headers={"Authorization": f"Bearer {bank.api_token}"}
    )
    assert follow.status_code == 200
    assert follow.json()["status"] == "dead" and "timestamp too" in follow.json()["outcome"]["reason"]


@pytest.mark.postgres
def test_an_unreadable_row_can_be_followed_before_the_worker_reaches_it(client, bank):
    plant(bank, "bad", time="0001-01-01T00:00:00+14:00")
    follow = client.get(
        f"/api/v1/institutions/{bank.code}/events/bad", headers={"Authorization": f"Bearer {bank.api_token}"}
    )
    assert follow.status_code == 200 and follow.json()["status"] == "received"


@pytest.mark.postgres
def test_a_time_without_a_local_date_in_the_standards_zone_is_quarantined(client, bank, other_bank):
    # Readable in UTC, but 10000-01-01 in Asia/Shanghai: the standard's day cannot be worked out.
    plant(bank, "edge", time="9999-12-31T20:00:00Z")
    send(client, other_bank, [activity("good")])
    assert tasks.inbox_drain() == {"processed": 1, "quarantined": 1}
    event = InboxEvent.objects.get(event_id="edge")
    assert (event.status, event.last_error) == ("quarantined", "out_of_range")
    assert event.outcome == {"reason": "out_of_range", "detail": "The act's time has no local date in Asia/Shanghai."}
    assert credited(other_bank) == 1


def test_measures_past_the_columns_are_quarantined_with_their_reason_and_the_batch_is_credited(client, bank):
    # Institutions' own units worth 10^11 and 10^5 km: the intake cannot know them, normalization can.
    metro = Scenario.objects.get(code="transit.metro")
    ActionMapping.objects.create(
        institution=bank.institution, action_code="tera", scenario=metro, unit="100Gm", multiplier=10**11
    )
    ActionMapping.objects.create(
        institution=bank.institution, action_code="hecto", scenario=metro, unit="100Mm", multiplier=10**5
    )
    standard_changed()
    events = [
        activity("good-1", subject="s1"),
        activity("quantity", action="tera", unit="100Gm", quantity="1000000000000"),  # 10^23 km
        activity("grams", action="hecto", unit="100Mm", quantity="1000000000000"),  # 10^17 km x 46.8 g
        activity("milligrams", action="energy.electricity_saved", unit="MWh", quantity="999999999999"),
        {**activity("expiry"), "time": "9999-06-01T00:00:00Z"},  # 24 months of validity end in 10001
        activity("good-2", subject="s2"),
    ]
    send(client, bank, events)

    assert tasks.inbox_drain() == {"processed": 2, "quarantined": 4}
    quarantined = {
        e.event_id: (e.last_error, (e.outcome or {}).get("detail"), e.attempts)
        for e in InboxEvent.objects.filter(status="quarantined")
    }
    assert quarantined == {
        "quantity": ("out_of_range", "1.000E+23 in the scenario's unit is more than the hub stores (under 1E+18).", 1),
        "grams": ("out_of_range", "4.680E+18 g is more than the hub stores (under 1E+18 g).", 1),
        "milligrams": (
            "out_of_range",
            "5.366E+20 mg is more than one credit may be (at most 1E+12 mg, a thousand tonnes).",
            1,
        ),
        "expiry": ("out_of_range", "Its points, earned on 9999-06-01, would expire after 9999-12-31.", 1),
    }
    assert credited(bank) == 2
    assert not NormalizedActivity.objects.filter(inbox_event__event_id__in=quarantined).exists()


def test_a_credit_at_the_ledgers_limit_is_credited_and_one_past_it_quarantined(client, bank):
    # transit.bus: 80 g a trip, so 12,500,000 trips are exactly 10^12 mg, the ledger's largest leg.
    send(
        client,
        bank,
        [
            activity("at-limit", subject="s1", action="transit.bus", unit="trip", quantity="12500000"),
            activity("past-limit", subject="s2", action="transit.bus", unit="trip", quantity="12500000.0000125"),
            # Self-declared acts count half: twice the trips fit.
            activity(
                "half", subject="s3", action="transit.bus", unit="trip", quantity="25000000", evidence="self_declared"
            ),
        ],
    )
    assert tasks.inbox_drain() == {"processed": 2, "quarantined": 1}
    assert NormalizedActivity.objects.get(inbox_event__event_id="at-limit").credited_mg == 10**12
    assert NormalizedActivity.objects.get(inbox_event__event_id="half").credited_mg == 10**12
    past = InboxEvent.objects.get(event_id="past-limit")
    assert (past.status, past.last_error) == ("quarantined", "out_of_range")
    assert (past.outcome or {})["detail"].startswith("1.000E+12 mg is more than one credit may be")
    assert credited(bank) == 2


def test_a_capped_act_is_checked_on_what_it_credits(client, bank):
    # Five e-invoices a day are credited (5 g each); a day's sixth-and-beyond, however many, credits 0.
    send(client, bank, [activity("cap", action="paper.e_invoice", unit="invoice", quantity="999999999999")])
    assert tasks.inbox_drain() == {"processed": 1}
    assert NormalizedActivity.objects.get(inbox_event__event_id="cap").credited_mg == 5 * 5000


def test_a_row_the_handler_cannot_handle_fails_alone_and_goes_dead_after_its_attempts(client, bank, other_bank):
    plant(
        bank, "garbled", time="2026-11-24T08:00:00Z", data={"action": "transit.metro", "quantity": "lots", "unit": "km"}
    )
    send(client, other_bank, [activity(f"good-{i}") for i in range(10)])
    with override_settings(HUB_INBOX_MAX_ATTEMPTS=2):
        assert inbox.inbox_drain() == {"processed": 10, "received": 1}
        status, attempts, error = status_of("garbled")
        assert (status, attempts) == ("received", 1) and error.startswith("InvalidOperation")
        InboxEvent.objects.filter(event_id="garbled").update(available_at=timezone.now())
        assert inbox.inbox_drain() == {"dead": 1}
    assert status_of("garbled")[:2] == ("dead", 2)
    assert credited(other_bank) == 10


def test_runs_are_halved_so_a_failing_row_costs_a_few_runs_not_one_per_row(client, bank, activity_handler):
    runs: list[list[str]] = []

    def counting(events):
        runs.append([event.event_id for event in events])
        return activity_handler(events)

    from institutions import handlers

    handlers.unregister("carbon.activity.recorded")
    handlers.register("carbon.activity.recorded")(counting)
    activity_handler.fail.add("e37")
    send(client, bank, [activity(f"e{i}") for i in range(64)])

    assert inbox.inbox_drain() == {"processed": 63, "received": 1}
    assert len(runs) <= 1 + 2 * 6  # the whole run, then two halves per level of 64 = 2^6; not 1 + 64
    # The runs that went through, in the order they ran, hold the rows in arrival order.
    succeeded = [event_id for run in runs if "e37" not in run for event_id in run]
    assert succeeded == [f"e{i}" for i in range(64) if i != 37]


def test_two_failing_rows_in_one_run_are_found_and_the_rest_is_processed(client, bank, activity_handler):
    activity_handler.fail.update({"e0", "e9"})
    send(client, bank, [activity(f"e{i}") for i in range(10)])
    assert inbox.inbox_drain() == {"processed": 8, "received": 2}
    assert set(InboxEvent.objects.filter(status="received").values_list("event_id", flat=True)) == {"e0", "e9"}


@pytest.mark.postgres
def test_a_failure_note_the_database_refuses_is_replaced_by_a_shorter_one(client, bank, activity_handler):
    # A real refusal: a trigger (dropped with the test's transaction) refuses notes naming "poison".
    with connection.cursor() as cursor:
        cursor.execute(
            """CREATE FUNCTION pg_temp.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.last_error LIKE '%%poison%%' THEN RAISE EXCEPTION 'no poison here'; END IF;
                 RETURN NEW;
               END $$"""
        )
        cursor.execute(
            f"CREATE TRIGGER refuse_poison BEFORE UPDATE ON {InboxEvent._meta.db_table} "
            "FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse_poison()"
        )
    activity_handler.fail.add("poison")
    send(client, bank, [activity("ok-1"), activity("poison"), activity("ok-2")])
    assert inbox.inbox_drain() == {"processed": 2, "received": 1}
    assert status_of("poison") == ("received", 1, "RuntimeError (its message could not be stored)")


@pytest.mark.postgres
def test_a_failure_that_cannot_be_recorded_at_all_leaves_the_row_to_its_lease(client, bank, activity_handler):
    with connection.cursor() as cursor:
        cursor.execute(
            """CREATE FUNCTION pg_temp.refuse_notes() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.last_error <> '' THEN RAISE EXCEPTION 'no notes'; END IF;
                 RETURN NEW;
               END $$"""
        )
        cursor.execute(
            f"CREATE TRIGGER refuse_notes BEFORE UPDATE ON {InboxEvent._meta.db_table} "
            "FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse_notes()"
        )
    activity_handler.fail.add("stuck")
    send(client, bank, [activity("ok-1"), activity("stuck"), activity("ok-2")])
    assert inbox.inbox_drain() == {"processed": 2, "received": 1}
    status, attempts, _ = status_of("stuck")
    assert (status, attempts) == ("received", 1)  # claimed again when its lease runs out
    assert InboxEvent.objects.get(event_id="stuck").available_at > timezone.now()


def test_a_failure_message_with_a_nul_is_stored_readably(client, bank, activity_handler):
    class Odd(Exception):
        pass

    def handler(events):
        raise Odd("bad value \x00 and \ud800")

    from institutions import handlers

    handlers.unregister("carbon.activity.recorded")
    handlers.register("carbon.activity.recorded")(handler)
    send(client, bank, [activity("odd")])
    assert inbox.inbox_drain() == {"received": 1}
    assert status_of("odd")[2] == "Odd: bad value \\x00 and \\ud800"


def test_the_limits_follow_the_columns():
    from methodology import services

    assert Decimal("999999999999999999.9999999999995") == services.QUANTITY_LIMIT  # numeric(30, 12)
    assert Decimal("999999999999999999.9999999999999999995") == services.GRAMS_LIMIT  # numeric(36, 18)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_row_whose_handler_loses_the_connection_fails_alone_and_the_drain_reconnects(activity_handler, monkeypatch):
    from institutions import handlers, intake
    from tests.conftest import make_sender

    monkeypatch.setattr(intake, "_kick_processing", lambda: None)  # the drain runs below, not in the request

    def handler(events):
        if any(event.event_id == "killer" for event in events):
            with connection.cursor() as cursor:  # the server ends this session mid-run
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return activity_handler(events)

    handlers.unregister("carbon.activity.recorded")
    handlers.register("carbon.activity.recorded")(handler)
    sender = make_sender("bank-a")
    client = Client()
    send(client, sender, [activity(f"e{i}") for i in range(5)] + [activity("killer")] + [activity("e5")])

    assert inbox.inbox_drain() == {"processed": 6, "received": 1}
    status, attempts, error = status_of("killer")
    assert (status, attempts) == ("received", 1) and error.startswith("OperationalError")
    assert set(InboxEvent.objects.exclude(event_id="killer").values_list("status", flat=True)) == {"processed"}
