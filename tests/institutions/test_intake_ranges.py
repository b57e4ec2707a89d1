"""Values the database cannot store and load back are refused at the intake, per event and by field.

Each case here was accepted with 202 once and then failed later: PostgreSQL refused the INSERT (a 503
that never clears, for the good events of the batch too) or stored a value psycopg cannot read back
(a row that crashed the worker). A refused event is the sender's error: the rest of its batch is
stored (202), a batch refused whole is 422, and nothing is written for a refused event.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from institutions.envelope import MAX_BIGINT
from institutions.models import InboxEvent
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db

OUT_OF_RANGE = {"field": "time", "code": "out_of_range"}
NOT_RFC3339 = {"field": "time", "code": "invalid_rfc3339"}


def results_of(client, sender, *events) -> list[dict]:
    """POST ``events`` as one batch after a good one; the good one must always be stored."""
    good = activity("good")
    response = post_events(client, sender, [good, *events])
    assert response.status_code == 202, response.content
    results = response.json()["results"]
    assert results[0] == {"id": "good", "status": "accepted"}
    assert InboxEvent.objects.filter(event_id="good").exists()
    return results[1:]


def refused(client, sender, **change) -> list[dict]:
    """The errors of one activity changed by ``change`` (``time=...`` or data fields), sent beside a
    good event; the changed one must be rejected and not stored."""
    data_change = {k: v for k, v in change.items() if k != "time"}
    event = activity("changed", **data_change)
    if "time" in change:
        event["time"] = change["time"]
    [result] = results_of(client, sender, event)
    assert result["status"] == "rejected", result
    assert not InboxEvent.objects.filter(event_id="changed").exists()
    return result["errors"]


# --- time: the UTC instant ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+14:00",  # 1 BC in UTC: PostgreSQL stores it, psycopg cannot read it back
        "9999-12-31T23:59:59-14:00",  # year 10000 in UTC
        "0001-01-01T00:00:00Z",  # in UTC, but 1 BC in every time zone west of it
        "0001-01-01T23:59:59.999999Z",
        "9999-12-31T00:00:00Z",  # in UTC, but year 10000 east of it
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T10:00:00+09:59",
    ],
)
def test_a_time_outside_years_1_to_9999_with_a_days_margin_is_out_of_range(client, bank, moment):
    assert refused(client, bank, time=moment) == [OUT_OF_RANGE]


@pytest.mark.parametrize(
    "moment",
    ["0001-01-02T00:00:00Z", "0001-01-02T14:00:00+14:00", "9999-12-30T23:59:59.999999Z", "9999-12-30T09:59:59-14:00"],
)
def test_the_first_and_last_instants_accepted(client, bank, moment):
    event = {**activity("edge"), "time": moment}
    assert results_of(client, bank, event) == [{"id": "edge", "status": "accepted"}]


# --- time: the UTC offset ----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", ["+16:00", "-16:00", "+20:00", "+23:59", "-23:59"])
def test_an_offset_postgresql_refuses_is_out_of_range(client, bank, offset):
    # PostgreSQL's limit is under 16 hours ("time zone displacement out of range"); Python takes up to 24.
    assert refused(client, bank, time=f"2026-11-24T08:00:00{offset}") == [OUT_OF_RANGE]


@pytest.mark.parametrize("offset", ["+05:00:00.5", "+05:00:00.000001", "+05:00:30", "-00:00:01"])
def test_an_offset_with_seconds_is_not_rfc3339(client, bank, offset):
    # RFC 3339 offsets are hours and minutes; PostgreSQL refuses a fraction of a second in one.
    assert refused(client, bank, time=f"2026-11-24T08:00:00{offset}") == [NOT_RFC3339]


@pytest.mark.parametrize("offset", ["+15:59", "-15:59", "+14:00", "-12:00", "+05:45", "Z", "+00:00", "-00:00"])
def test_offsets_up_to_15_59_are_accepted_and_stored_as_the_same_instant(client, bank, offset):
    event = {**activity("offset"), "time": f"2026-11-24T08:00:00{offset}"}
    assert results_of(client, bank, event) == [{"id": "offset", "status": "accepted"}]
    stored = InboxEvent.objects.get(event_id="offset").time
    assert stored == datetime.fromisoformat(event["time"])


# --- numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("points", [MAX_BIGINT + 1, 10**30, 2**64])
def test_issuer_points_past_the_bigint_column_are_out_of_range(client, bank, points):
    assert refused(client, bank, issuer_points=points) == [{"field": "data.issuer_points", "code": "out_of_range"}]


def test_the_largest_issuer_points_the_column_holds_are_accepted(client, bank):
    event = activity("max-points", issuer_points=MAX_BIGINT)
    assert results_of(client, bank, event) == [{"id": "max-points", "status": "accepted"}]


@pytest.mark.parametrize(
    "quantity",
    ["1000000000000.000000000001", "1e13", 10**30, "9" * 40, "1E+400", "0.0000000000001", "1e-400"],
)
def test_a_huge_or_too_fine_quantity_is_out_of_range(client, bank, quantity):
    assert refused(client, bank, quantity=quantity) == [{"field": "data.quantity", "code": "out_of_range"}]


@pytest.mark.parametrize("quantity", ["1e12", "999999999999.999999999999", "0.000000000001"])
def test_quantities_at_the_edges_are_accepted(client, bank, quantity):
    event = activity("edge-quantity", quantity=quantity)
    assert results_of(client, bank, event) == [{"id": "edge-quantity", "status": "accepted"}]


# --- the whole request -------------------------------------------------------------------------------


def test_a_batch_of_only_unstorable_events_is_422_and_stores_nothing(client, bank):
    batch = [
        {**activity("bc"), "time": "0001-01-01T00:00:00+14:00"},
        {**activity("y10k"), "time": "9999-12-31T23:59:59-14:00"},
        {**activity("offset"), "time": "2026-11-24T08:00:00+23:59"},
        {**activity("fraction"), "time": "2026-11-24T08:00:00+05:00:00.5"},
        activity("points", issuer_points=10**20),
    ]
    response = post_events(client, bank, batch)
    assert response.status_code == 422, response.content
    problem = response.json()
    assert problem["code"] == "invalid-events"
    assert [(r["id"], r["status"], r["errors"][0]["field"]) for r in problem["results"]] == [
        ("bc", "rejected", "time"),
        ("y10k", "rejected", "time"),
        ("offset", "rejected", "time"),
        ("fraction", "rejected", "time"),
        ("points", "rejected", "data.issuer_points"),
    ]
    assert not InboxEvent.objects.exists()


def test_a_reversal_with_an_unstorable_time_is_refused_too(client, bank):
    # ``time`` is optional outside activities, but checked the same wherever it is sent.
    reversal = {
        "specversion": "1.0",
        "id": "rev",
        "source": "/bank/app",
        "type": "carbon.activity.reversed",
        "subject": "cust-1",
        "time": "2026-11-24T08:00:00+20:00",
        "data": {"event_id": "good", "reason": "refund"},
    }
    [result] = results_of(client, bank, reversal)
    assert result == {"id": "rev", "status": "rejected", "errors": [OUT_OF_RANGE]}
