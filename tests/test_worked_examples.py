"""Worked examples: readable stories told through the real signed intake, dispatcher and books.

Amounts: 1 point = 1 g CO2e = 1,000 mg; the ledger counts milligrams.
"""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from institutions.models import InboxEvent
from ledger.models import Account
from ledger.selectors import ledger_check
from ledger.services import lots_expire
from methodology.models import NormalizedActivity
from tests.conftest import activity, make_sender, post_events
from wallets.models import Membership
from wallets.services import link_code_create, person_signup

pytestmark = pytest.mark.django_db


def send(client, sender, capture, *events):
    """Push events signed by ``sender`` and process them as a worker would; return the inbox rows."""
    with capture(execute=True):
        response = post_events(client, sender, list(events))
    assert response.status_code == 202, response.content
    rows = {r.event_id: r for r in InboxEvent.objects.filter(event_id__in=[e["id"] for e in events])}
    return [rows[e["id"]] for e in events]


def linked(subject, code):
    return {
        "specversion": "1.0",
        "id": f"link-{uuid.uuid4().hex[:8]}",
        "source": "/app",
        "type": "carbon.account.linked",
        "subject": subject,
        "data": {"link_code": code},
    }


def reversed_event(original_id, subject):
    return {
        "specversion": "1.0",
        "id": f"rev-{uuid.uuid4().hex[:8]}",
        "source": "/app",
        "type": "carbon.activity.reversed",
        "subject": subject,
        "data": {"event_id": original_id, "reason": "refunded ticket"},
    }


def wallet_mg(person):
    return sum(Account.objects.filter(kind="wallet_lot", person_id=person.pk).values_list("balance", flat=True))


def holding_mg(sender, subject_ref):
    return sum(
        Account.objects.filter(
            kind="holding_lot", holder_institution_id=sender.institution.pk, subject_ref=subject_ref
        ).values_list("balance", flat=True)
    )


@pytest.fixture
def mei():
    return person_signup(username="mei", password="a long and unusual passphrase").person


def test_three_banks_one_person_small_balances_that_pool(client, mei, django_capture_on_commit_callbacks):
    east, west, metro = make_sender("bank-east"), make_sender("pay-west"), make_sender("metro-card")
    send_ = lambda sender, *events: send(client, sender, django_capture_on_commit_callbacks, *events)  # noqa: E731

    # Mei rides the metro before she ever heard of the hub: Bank East holds the points for her subject.
    (ride,) = send_(east, activity(subject="mei@east", action="transit.metro", quantity="12.5", unit="km"))
    assert ride.outcome["points"] == 585
    assert holding_mg(east, ride.subject_ref) == 585_000

    # She signs up and links all three accounts; Bank East's holding lot pools into her wallet.
    for sender, subject in ((east, "mei@east"), (west, "mei@west"), (metro, "mei@metro")):
        (link,) = send_(sender, linked(subject, link_code_create(person=mei).code))
        assert link.outcome["linked"] is True
    assert holding_mg(east, ride.subject_ref) == 0
    assert wallet_mg(mei) == 585_000

    # Small acts at the other two: none reaches anything alone, together they pool.
    send_(west, activity(subject="mei@west", action="paper.e_bill", quantity="1", unit="bill"))  # 24 g
    send_(metro, activity(subject="mei@metro", action="transit.bus", quantity="1", unit="trip"))  # 80 g
    assert wallet_mg(mei) == 585_000 + 24_000 + 80_000

    lots = Account.objects.filter(kind="wallet_lot", person_id=mei.pk)
    assert sorted(lots.values_list("issuer_id", flat=True)) == sorted(
        [east.institution.pk, west.institution.pk, metro.institution.pk]
    )
    # Points keep their issuer and expire at the end of the month two years after the act (Shanghai time).
    assert set(lots.values_list("expires_on", flat=True)) == {date(2028, 11, 30)}
    assert NormalizedActivity.objects.filter(person=mei).count() == 3
    assert ledger_check() == []


def test_the_same_act_from_two_banks_counts_once(client, mei, django_capture_on_commit_callbacks):
    east, west = make_sender("bank-east"), make_sender("pay-west")
    send_ = lambda sender, *events: send(client, sender, django_capture_on_commit_callbacks, *events)  # noqa: E731
    send_(east, linked("mei@east", link_code_create(person=mei).code))

    # Both her bank and her payment app report the same e-bill (same fingerprint of the real act).
    (first,) = send_(
        east, activity(subject="mei@east", action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11")
    )
    # Pay West reports it too while her Pay West account is still unlinked: held, for now.
    (second,) = send_(
        west, activity(subject="mei@west", action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11")
    )
    assert first.outcome["points"] == 24 and second.outcome["points"] == 24
    assert holding_mg(west, second.subject_ref) == 24_000

    # When she links Pay West, the held duplicate is taken back instead of pooled.
    send_(west, linked("mei@west", link_code_create(person=mei).code))
    assert holding_mg(west, second.subject_ref) == 0
    assert wallet_mg(mei) == 24_000
    assert NormalizedActivity.objects.get(inbox_event=second).reason == "duplicate_act"
    # And a third report of the act after linking is a duplicate at once.
    (third,) = send_(
        west, activity(subject="mei@west", action="paper.e_bill", quantity="1", unit="bill", fingerprint="bill-2026-11")
    )
    assert third.outcome["reason"] == "duplicate_act" and third.outcome["points"] == 0
    assert ledger_check() == []


def test_a_reversal_after_the_points_are_gone_becomes_a_debt_paid_by_the_next_credit(
    client, mei, django_capture_on_commit_callbacks
):
    east = make_sender("bank-east")
    send_ = lambda *events: send(client, east, django_capture_on_commit_callbacks, *events)  # noqa: E731
    send_(linked("mei@east", link_code_create(person=mei).code))
    (ride,) = send_(activity(subject="mei@east", action="transit.metro", quantity="10", unit="km"))  # 468 g
    assert wallet_mg(mei) == 468_000

    # Two years on, the lot lapses; then the bank reverses the ride (a refunded ticket).
    assert lots_expire(today=date(2028, 12, 1)) == 1
    (reversal,) = send_(reversed_event(ride.event_id, "mei@east"))
    assert reversal.status == "processed"
    assert reversal.outcome["reversed_mg"] == 468_000 and reversal.outcome["debt_mg"] == 468_000
    assert NormalizedActivity.objects.get(inbox_event=ride).status == "reversed"

    # Her next credits from Bank East pay the debt first; only the rest reaches her wallet.
    send_(activity(subject="mei@east", action="transit.metro", quantity="12.5", unit="km"))  # 585 g
    assert wallet_mg(mei) == 585_000 - 468_000
    assert Account.objects.get(kind="debt", person_id=mei.pk).balance == 0
    # Reversing twice changes nothing.
    (again,) = send_(reversed_event(ride.event_id, "mei@east"))
    assert again.outcome["reversed_mg"] == 468_000
    assert wallet_mg(mei) == 585_000 - 468_000
    assert ledger_check() == []


def test_a_reversal_of_held_points_takes_them_from_the_holding_lot(client, django_capture_on_commit_callbacks):
    east = make_sender("bank-east")
    send_ = lambda *events: send(client, east, django_capture_on_commit_callbacks, *events)  # noqa: E731
    (ride, _bus) = send_(
        activity(subject="lin@east", action="transit.metro", quantity="10", unit="km"),
        activity(subject="lin@east", action="transit.bus", quantity="1", unit="trip"),
    )
    (reversal,) = send_(reversed_event(ride.event_id, "lin@east"))
    assert reversal.outcome == {
        "reversed_event": ride.event_id,
        "points": 468,
        "reversed_mg": 468_000,
        "from_lots_mg": 468_000,
        "debt_mg": 0,
        "reason": "refunded ticket",
    }
    assert holding_mg(east, ride.subject_ref) == 80_000
    assert not Membership.objects.exists()
    assert ledger_check() == []


def test_a_reversal_of_an_unknown_event_is_quarantined(client, django_capture_on_commit_callbacks):
    east = make_sender("bank-east")
    (reversal,) = send(client, east, django_capture_on_commit_callbacks, reversed_event("never-sent", "lin@east"))
    assert reversal.status == "quarantined" and reversal.last_error == "unknown_event"
