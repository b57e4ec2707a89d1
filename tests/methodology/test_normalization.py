"""Worked examples of the unified standard, through the real intake and dispatcher."""

from decimal import Decimal

import pytest

from institutions.models import InboxEvent
from methodology.models import NormalizedActivity
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db

# (action, quantity, unit, expected grams, expected credited milligrams)
WORKED_EXAMPLES = [
    ("transit.metro", "12.5", "km", "585.000", 585000),
    ("transit.metro", "3200", "m", "149.760", 149760),  # metres converted to km
    ("transit.bus_electric", "7.3", "km", "196.370", 196370),
    ("transit.bus", "2", "trip", "160.000", 160000),
    ("mobility.cycling", "1", "trip", "52.000", 52000),
    ("mobility.walking", "8000", "step", "131.200", 131200),
    ("mobility.walking", "6.5", "ksteps", "106.600", 106600),  # thousands of steps to steps
    ("food.clean_plate", "1", "checkin", "144.000", 144000),
    ("food.no_cutlery", "1", "order", "23.000", 23000),
    ("lodging.no_disposables", "2", "stay", "406.400", 406400),
    ("paper.e_bill", "3", "bill", "72.000", 72000),
    ("paper.e_invoice", "1", "invoice", "5.000", 5000),
    ("payment.online_utility", "1", "payment", "89.000", 89000),
    ("packaging.box_return", "2", "box", "74.000", 74000),
    ("reuse.second_hand_phone", "1", "item", "25000.000", 25000000),
    ("energy.electricity_saved", "1500", "Wh", "804.900", 804900),  # Wh to kWh
]


@pytest.mark.parametrize(("action", "quantity", "unit", "grams", "milligrams"), WORKED_EXAMPLES)
def test_worked_example(client, bank, django_capture_on_commit_callbacks, action, quantity, unit, grams, milligrams):
    event = activity(action=action, quantity=quantity, unit=unit)
    event["time"] = "2026-11-24T08:00:00Z"
    with django_capture_on_commit_callbacks(execute=True):
        response = post_events(client, bank, event)
    assert response.status_code == 202
    row = InboxEvent.objects.get(event_id=event["id"])
    assert row.status == "processed", row.last_error
    assert row.outcome is not None
    assert row.outcome["grams"] == grams
    assert row.outcome["credited_mg"] == milligrams
    assert row.outcome["points"] == milligrams // 1000
    measured = NormalizedActivity.objects.get(inbox_event=row)
    assert isinstance(measured.grams, Decimal)
    assert measured.grams == Decimal(grams)
