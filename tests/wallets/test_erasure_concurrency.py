"""Erasure beside workers crediting the same person: no point is left in the erased wallet."""

from __future__ import annotations

import threading
import time
from datetime import date

import pytest
from django.db import connection, transaction
from django.test import Client

from institutions import crypto, intake
from institutions.inbox import inbox_drain
from institutions.models import InboxEvent
from ledger.books import owners_lock, person_owner
from ledger.models import Account
from ledger.selectors import ledger_check
from methodology.models import NormalizedActivity
from tests.conftest import activity, make_sender, post_events
from tests.wallets.conftest import credit, make_person
from wallets.models import Membership, Person
from wallets.services import person_erase

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

MAR, JUN = date(2029, 3, 31), date(2029, 6, 30)


def wallet_mg(person: Person) -> int:
    return sum(Account.objects.filter(kind="wallet_lot", person_id=person.pk).values_list("balance", flat=True))


def test_erasure_waits_for_a_batch_that_holds_the_person():
    bank = make_sender("bank-a")
    person, _ = make_person("racing-mei")
    credit(person.pk, bank.institution.pk, MAR, 1_000)
    holding, release = threading.Event(), threading.Event()
    erased: list[object] = []

    def batch() -> None:
        try:
            with transaction.atomic():
                owners_lock([person_owner(person.pk)])
                holding.set()
                release.wait(10)
                credit(person.pk, bank.institution.pk, JUN, 5_000)
        finally:
            connection.close()

    def erase() -> None:
        try:
            erased.append(person_erase(person=person))
        finally:
            connection.close()

    crediting = threading.Thread(target=batch)
    crediting.start()
    assert holding.wait(10)
    erasing = threading.Thread(target=erase)
    erasing.start()
    erasing.join(0.5)
    assert erasing.is_alive()  # waiting for the batch
    release.set()
    crediting.join(10)
    erasing.join(10)

    (result,) = erased
    assert result.forfeited_mg == 6_000  # type: ignore[attr-defined]
    assert wallet_mg(person) == 0
    assert ledger_check() == []


def test_erasure_during_a_stream_of_credits_leaves_nothing_in_the_wallet(monkeypatch, settings):
    monkeypatch.setattr(intake, "_kick_processing", lambda: None)  # store only; the workers below process
    settings.HUB_INBOX_BATCH_SIZE = 4
    bank = make_sender("bank-a")
    person, _ = make_person("streaming-mei")
    Membership.objects.create(
        institution=bank.institution,
        person=person,
        subject_ref=crypto.subject_ref(bank.code, "mei@a"),
        subject_sealed=crypto.seal("mei@a"),
    )
    client = Client()
    for _ in range(8):
        events = [activity(subject="mei@a", quantity="1") for _ in range(10)]  # 46.8 g each
        assert post_events(client, bank, events).status_code == 202

    errors: list[Exception] = []
    start = threading.Barrier(4)

    def run(work) -> None:  # type: ignore[no-untyped-def]
        try:
            start.wait()
            work()
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(inbox_drain,)) for _ in range(3)]

    def erase_once_credits_flow() -> None:
        deadline = time.monotonic() + 30
        while not NormalizedActivity.objects.filter(person=person).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        person_erase(person=person)

    threads.append(threading.Thread(target=run, args=(erase_once_credits_flow,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    inbox_drain()  # whatever the workers left

    assert not errors
    assert InboxEvent.objects.filter(status="processed").count() == 80
    assert Person.objects.get(pk=person.pk).erased_at is not None
    # Credited before the erasure: forfeited with the wallet. After it: held for the subject.
    assert wallet_mg(person) == 0
    held = sum(Account.objects.filter(kind="holding_lot").values_list("balance", flat=True))
    unlinked = NormalizedActivity.objects.filter(person__isnull=True)
    assert held == sum(unlinked.values_list("credited_mg", flat=True))
    assert NormalizedActivity.objects.filter(person=person).count() + unlinked.count() == 80
    assert ledger_check() == []
