"""Factor versions over time, quarantine and replay, caps and cross-institution de-duplication."""

from datetime import date
from decimal import Decimal

import pytest

from institutions.inbox import inbox_replay
from institutions.models import InboxEvent
from methodology.models import ActionMapping, Cap, FactorVersion, NormalizedActivity, Scenario
from methodology.services import standard_changed
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def push(client, sender, events, capture):
    with capture(execute=True):
        response = post_events(client, sender, events)
    assert response.status_code == 202, response.content
    ids = [e["id"] for e in (events if isinstance(events, list) else [events])]
    rows = {r.event_id: r for r in InboxEvent.objects.filter(institution=sender.institution, event_id__in=ids)}
    return [rows[i] for i in ids]


def at(event, moment):
    event["time"] = moment
    return event


def test_factor_version_follows_event_time(client, bank, django_capture_on_commit_callbacks):
    metro = Scenario.objects.get(code="transit.metro")
    FactorVersion.objects.create(scenario=metro, grams_per_unit=Decimal("40"), valid_from=date(2026, 6, 1), source="t")
    standard_changed()
    before, after = push(
        client,
        bank,
        [
            at(activity(action="transit.metro", quantity="10", unit="km"), "2026-05-31T15:59:59Z"),  # 23:59 Shanghai
            at(activity(action="transit.metro", quantity="10", unit="km"), "2026-05-31T16:00:00Z"),  # 00:00 Shanghai
        ],
        django_capture_on_commit_callbacks,
    )
    assert before.outcome["factor_version"] == "transit.metro@2021-01-01"
    assert before.outcome["grams"] == "468.000"
    assert after.outcome["factor_version"] == "transit.metro@2026-06-01"
    assert after.outcome["grams"] == "400.000"


@pytest.mark.parametrize(
    ("data", "moment", "reason"),
    [
        ({"action": "teleport", "quantity": "1", "unit": "trip"}, "2026-11-24T08:00:00Z", "unknown_action"),
        ({"action": "transit.metro", "quantity": "1", "unit": "kg"}, "2026-11-24T08:00:00Z", "unit_mismatch"),
        (
            {"action": "energy.electricity_saved", "quantity": "1", "unit": "kWh"},
            "2020-01-01T00:00:00Z",
            "no_factor_in_force",
        ),
    ],
)
def test_unmeasurable_events_are_quarantined_with_reason(
    client, bank, django_capture_on_commit_callbacks, data, moment, reason
):
    (row,) = push(client, bank, at(activity(**data), moment), django_capture_on_commit_callbacks)
    assert row.status == "quarantined"
    assert row.last_error == reason
    assert row.outcome["reason"] == reason
    assert not NormalizedActivity.objects.exists()


def test_operator_fixes_mapping_and_replays(client, bank, django_capture_on_commit_callbacks):
    rows = push(
        client,
        bank,
        [
            activity(action="METRO_RIDE", quantity="5000", unit="m"),
            activity(action="METRO_RIDE", quantity="2", unit="km"),
        ],
        django_capture_on_commit_callbacks,
    )
    assert [r.status for r in rows] == ["quarantined", "quarantined"]

    ActionMapping.objects.create(
        institution=bank.institution, action_code="METRO_RIDE", scenario=Scenario.objects.get(code="transit.metro")
    )
    standard_changed()
    with django_capture_on_commit_callbacks(execute=True):
        assert inbox_replay(ids=[r.pk for r in rows]) == 2
    for row in rows:
        row.refresh_from_db()
    assert [r.status for r in rows] == ["processed", "processed"]
    assert [r.outcome["grams"] for r in rows] == ["234.000", "93.600"]


def test_mapping_with_its_own_unit(client, bank, django_capture_on_commit_callbacks):
    ActionMapping.objects.create(
        institution=bank.institution,
        action_code="WALK_500",
        scenario=Scenario.objects.get(code="mobility.walking"),
        unit="halfk",
        multiplier=Decimal(500),
    )
    standard_changed()
    (row,) = push(
        client, bank, activity(action="WALK_500", quantity="2", unit="halfk"), django_capture_on_commit_callbacks
    )
    assert row.outcome["quantity"] == "1000"
    assert row.outcome["grams"] == "16.400"


def test_daily_cap_credits_partially_then_nothing(client, bank, django_capture_on_commit_callbacks):
    rows = push(
        client,
        bank,
        [
            activity(action="food.clean_plate", quantity="2", unit="checkin"),
            activity(action="food.clean_plate", quantity="2", unit="checkin"),  # only 1 fits (cap 3 a day)
            activity(action="food.clean_plate", quantity="1", unit="checkin"),
        ],
        django_capture_on_commit_callbacks,
    )
    assert [r.outcome["credited_mg"] for r in rows] == [288000, 144000, 0]
    assert [r.outcome["reason"] for r in rows] == [None, "cap_reached", "cap_reached"]
    assert [r.outcome["status"] for r in rows] == ["credited", "credited", "capped"]
    # Grams measured stay the full act; only the credit is capped.
    assert rows[1].outcome["grams"] == "288.000"
    # The next local day has a fresh cap.
    (tomorrow,) = push(
        client,
        bank,
        at(activity(action="food.clean_plate", quantity="1", unit="checkin"), "2026-11-25T08:00:00Z"),
        django_capture_on_commit_callbacks,
    )
    assert tomorrow.outcome["credited_mg"] == 144000


def test_monthly_and_yearly_caps(client, bank, django_capture_on_commit_callbacks):
    def utility(day):
        return at(
            activity(action="payment.online_utility", quantity="4", unit="payment"), f"2026-03-{day:02d}T04:00:00Z"
        )

    rows = push(client, bank, [utility(1), utility(2), utility(3)], django_capture_on_commit_callbacks)
    assert [r.outcome["credited_mg"] for r in rows] == [356000, 356000, 178000]  # 10 a month: 4 + 4 + 2
    (april,) = push(client, bank, utility(1) | {"time": "2026-04-01T04:00:00Z"}, django_capture_on_commit_callbacks)
    assert april.outcome["credited_mg"] == 356000

    phones = [
        at(activity(action="reuse.second_hand_phone", quantity="3", unit="item"), "2026-01-10T04:00:00Z"),
        at(activity(action="reuse.second_hand_phone", quantity="3", unit="item"), "2026-08-10T04:00:00Z"),
        at(activity(action="reuse.second_hand_phone", quantity="1", unit="item"), "2027-01-10T04:00:00Z"),
    ]
    rows = push(client, bank, phones, django_capture_on_commit_callbacks)
    assert [r.outcome["credited_mg"] for r in rows] == [75_000_000, 25_000_000, 25_000_000]  # 4 a year


def test_caps_count_per_owner_across_institutions_once_linked(
    client, bank, other_bank, django_capture_on_commit_callbacks
):
    from methodology.services import owner_key

    # Unlinked subjects at two institutions are two owners: each has its own cap.
    a = push(
        client,
        bank,
        activity(action="food.clean_plate", quantity="3", unit="checkin"),
        django_capture_on_commit_callbacks,
    )[0]
    b = push(
        client,
        other_bank,
        activity(action="food.clean_plate", quantity="3", unit="checkin"),
        django_capture_on_commit_callbacks,
    )[0]
    assert a.outcome["credited_mg"] == b.outcome["credited_mg"] == 432000
    activity_a = NormalizedActivity.objects.get(inbox_event=a)
    assert activity_a.owner_key == owner_key(
        person_id=None, institution_id=bank.institution.pk, subject_ref=a.subject_ref
    )


def test_fingerprint_credited_once_per_owner(client, bank, django_capture_on_commit_callbacks):
    first, again, other_subject = push(
        client,
        bank,
        [
            activity(action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11"),
            activity(action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11"),
            activity(action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11", subject="cust-2"),
        ],
        django_capture_on_commit_callbacks,
    )
    assert first.outcome["credited_mg"] == 24000 and first.outcome["reason"] is None
    assert again.outcome["credited_mg"] == 0 and again.outcome["reason"] == "duplicate_act"
    assert other_subject.outcome["credited_mg"] == 24000


def test_replayed_row_is_not_measured_twice(client, bank, django_capture_on_commit_callbacks):
    (row,) = push(
        client, bank, activity(action="paper.e_bill", quantity="1", unit="bill"), django_capture_on_commit_callbacks
    )
    InboxEvent.objects.filter(pk=row.pk).update(status="quarantined")
    with django_capture_on_commit_callbacks(execute=True):
        inbox_replay(ids=[row.pk])
    row.refresh_from_db()
    assert row.status == "processed"
    assert NormalizedActivity.objects.filter(inbox_event=row).count() == 1


def test_evidence_tier_weights_the_credit(client, bank, django_capture_on_commit_callbacks):
    (row,) = push(
        client,
        bank,
        activity(action="paper.e_bill", quantity="1", unit="bill", evidence="self_declared"),
        django_capture_on_commit_callbacks,
    )
    assert row.outcome["grams"] == "24.000"
    assert row.outcome["credited_mg"] == 12000


def test_cap_rows_seeded_from_csv():
    assert Cap.objects.get(scenario__code="mobility.walking", period="day").max_quantity == 18000
