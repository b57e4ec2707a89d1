"""Caps and fingerprints hold while several workers normalize one person's events at once."""

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client

from institutions import intake
from institutions.inbox import inbox_drain
from institutions.models import InboxEvent
from methodology.models import NormalizedActivity
from tests.conftest import activity, make_sender, post_events
from wallets.models import Membership, Person

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def link(person, sender, subject):
    from institutions import crypto

    Membership.objects.create(
        institution=sender.institution,
        person=person,
        subject_ref=crypto.subject_ref(sender.code, subject),
        subject_sealed=crypto.seal(subject),
    )


def test_concurrent_workers_respect_caps_and_fingerprints(monkeypatch, settings):
    settings.HUB_INBOX_BATCH_SIZE = 7
    monkeypatch.setattr(intake, "_kick_processing", lambda: None)  # store only; the workers below process
    banks = [make_sender(f"bank-{n}") for n in range(4)]
    person = Person.objects.create(user=get_user_model().objects.create_user("walker", password="x" * 12))
    for bank in banks:
        link(person, bank, f"cust-at-{bank.code}")

    client = Client()
    for bank in banks:
        events = [
            activity(action="food.clean_plate", quantity="1", unit="checkin", subject=f"cust-at-{bank.code}")
            for _ in range(10)
        ] + [
            activity(
                action="paper.e_bill",
                quantity="1",
                unit="bill",
                fingerprint=f"bill-{n}",
                subject=f"cust-at-{bank.code}",
            )
            for n in range(10)
        ]
        assert post_events(client, bank, events).status_code == 202
    assert InboxEvent.objects.filter(status="received").count() == 80

    errors = []
    start = threading.Barrier(4)

    def worker():
        try:
            start.wait()
            inbox_drain()
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert InboxEvent.objects.filter(status="processed").count() == 80

    mine = NormalizedActivity.objects.filter(person=person)
    plates = mine.filter(scenario__code="food.clean_plate")
    assert sum(a.credited_quantity for a in plates) == 3  # 40 check-ins reported, 3 a day credited
    assert plates.filter(reason="cap_reached").count() == 37
    bills = mine.filter(scenario__code="paper.e_bill")
    assert bills.filter(status="credited").count() == 10  # 40 reports of 10 bills, each credited once
    assert bills.filter(reason="duplicate_act").count() == 30
    assert sorted(bills.filter(status="credited").values_list("fingerprint", flat=True)) == sorted(
        f"bill-{n}" for n in range(10)
    )
