"""Redemptions under real concurrency on PostgreSQL: threads, each with its own database connection."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test import Client

from institutions.models import OutboxMessage
from ledger.models import Account, Transfer
from ledger.selectors import ledger_check
from settlement.exceptions import InsufficientPoints, OutOfStock, RedemptionRefused
from settlement.models import Redemption, RedemptionAllocation, RedemptionRequest, Reward
from settlement.services import (
    RedemptionAnswer,
    redemption_hold,
    redemption_locked,
    redemption_reject,
    redemption_request,
    redemption_request_hash,
    redemptions_expire,
)
from tests.conftest import make_sender, run_together
from tests.settlement.conftest import kind_total, lot_balances, make_reward, month_end, redeem
from tests.wallets.conftest import credit, make_person

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def run_at_once(count: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(i)`` in ``count`` threads released together; the first error raised in any is raised here."""
    results, errors = run_together(count, work)
    if errors:
        raise errors[0]
    return results


def test_fifty_concurrent_redemptions_against_a_wallet_that_affords_ten():
    provider = make_sender("coffee-co", provider=True)
    banks = [make_sender("bank-a").institution, make_sender("bank-b").institution]
    person, token = make_person("mei")
    # 100 points in six lots of two issuers and three months; each redemption takes 10.
    for n, mg in enumerate((7_500, 22_500, 15_000, 25_000, 12_345, 17_655)):
        credit(person.pk, banks[n % 2].pk, month_end(2 + n // 2), mg)
    make_reward(provider, "coffee", points=10)
    lowest: list[int] = []
    watching = threading.Event()

    def watch() -> None:  # samples the lots while the requests run: none is ever below zero
        try:
            while not watching.is_set():
                lowest.append(min(Account.objects.filter(kind="wallet_lot").values_list("balance", flat=True)))
                time.sleep(0.002)
        finally:
            connection.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        responses = run_at_once(50, lambda i: redeem(Client(), token, "coffee", 1, key=f"order-{i}"))
    finally:
        watching.set()
        watcher.join(10)

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 409: 40}
    refused = [r.json() for r in responses if r.status_code == 409]
    assert {(p["type"], p["code"]) for p in refused} == {("/problems/insufficient-points", "insufficient-points")}
    assert Redemption.objects.count() == 10 and OutboxMessage.objects.count() == 10
    assert sum(lot_balances(person.pk).values()) == 0
    assert kind_total("redemption_hold") == 100_000
    assert lowest and min(lowest) >= 0
    assert not Account.objects.filter(kind="wallet_lot", balance__lt=0).exists()
    # Each hold took exactly 10 points, and the allocations of all of them cover every lot exactly once over.
    for redemption in Redemption.objects.all():
        assert sum(redemption.allocations.values_list("milligrams", flat=True)) == 10_000
    assert sum(RedemptionAllocation.objects.values_list("milligrams", flat=True)) == 100_000
    assert RedemptionRequest.objects.count() == 50  # every key has its answer
    assert ledger_check() == []


def test_the_same_key_twenty_times_at_once_creates_one_redemption():
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, token = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 500_000)
    make_reward(provider, "coffee", points=10)

    responses = run_at_once(20, lambda i: redeem(Client(), token, "coffee", 1, key="one-order"))

    assert Redemption.objects.count() == 1
    created = [r for r in responses if r.status_code == 201]
    in_flight = [r for r in responses if r.status_code == 409]
    assert created and len(created) + len(in_flight) == 20
    assert {(r.json()["code"], r["Retry-After"]) for r in in_flight} <= {("idempotency-key-in-flight", "1")}
    first = created[0].json()
    assert all(r.json() == first for r in created)  # the first answer, replayed
    assert first["id"] == Redemption.objects.get().public_id
    assert sum(lot_balances(person.pk).values()) == 490_000
    replay = redeem(Client(), token, "coffee", 1, key="one-order")
    assert (replay.status_code, replay.json(), replay["Idempotent-Replayed"]) == (201, first, "true")
    assert OutboxMessage.objects.count() == 1
    assert ledger_check() == []


# Where a hold waits on a row lock: on the portable path its own statements and the ledger's posting call,
# on the database path its one call.
HOLD_WAITS = (
    r'^\s*(UPDATE\s+"?settlement_reward"?\s|SELECT .* FOR NO KEY UPDATE|SELECT .* FROM ledger_post\('
    r"|SELECT settlement_redemption_hold\()"
)


def hold_against_uncommitted(change: Callable[[], Any], hold: Callable[[], Redemption]) -> BaseException | Redemption:
    """Run ``change`` in a transaction left open, then ``hold`` in another thread; wait until the hold is
    blocked on a row lock ``change`` holds (not an advisory lock), commit ``change`` and return what the
    hold did: its redemption or the refusal it raised. The hold's writes are invisible meanwhile."""
    changed, release = threading.Event(), threading.Event()
    outcome: list[BaseException | Redemption] = []

    def other() -> None:
        try:
            with transaction.atomic():
                change()
                changed.set()
                release.wait(30)
        finally:
            connection.close()

    def holder() -> None:
        try:
            outcome.append(hold())
        except RedemptionRefused as exc:
            outcome.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=other), threading.Thread(target=holder)]
    threads[0].start()
    assert changed.wait(10)
    threads[1].start()
    deadline = time.monotonic() + 15
    with connections["default"].cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND wait_event <> 'advisory' AND query ~* %s",
                [HOLD_WAITS],
            )
            if cursor.fetchone()[0]:
                break
            if time.monotonic() > deadline:
                release.set()
                pytest.fail("the hold never waited on the row")
            time.sleep(0.01)
    assert not OutboxMessage.objects.exists()  # the hold's webhook is not visible before its commit
    release.set()
    for thread in threads:
        thread.join(10)
    (result,) = outcome
    return result


def assert_nothing_held() -> None:
    """A hold that rolled back left no redemption, allocation, webhook, transfer or hold account."""
    assert not Redemption.objects.exists() and not RedemptionAllocation.objects.exists()
    assert not OutboxMessage.objects.exists()
    assert not Transfer.objects.filter(kind="hold").exists()
    assert not Account.objects.filter(kind="redemption_hold").exists()


@pytest.mark.parametrize("in_database", [True, False], ids=["database", "portable"])
def test_a_hold_that_loses_the_stock_race_leaves_no_redemption_and_no_webhook(settings, in_database):
    """The stock is taken last, by a conditional UPDATE: a hold that finds the stock gone there rolls back
    whole, its redemption, ledger transfer, allocations and ``carbon.redemption.requested`` row with it."""
    settings.HUB_REDEMPTION_HOLD_IN_DATABASE = in_database
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, _ = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 50_000)
    reward = make_reward(provider, "last-mug", points=10, stock=1)
    before = lot_balances(person.pk)

    # Another buyer takes the last unit and holds the reward row; the hold read stock 1 and goes on.
    result = hold_against_uncommitted(
        lambda: Reward.objects.filter(pk=reward.pk).update(stock=0),
        lambda: redemption_hold(person=person, reward_code="last-mug", quantity=1),
    )

    assert isinstance(result, OutOfStock)
    assert_nothing_held()
    assert lot_balances(person.pk) == before
    assert Reward.objects.get().stock == 0
    assert ledger_check() == []


@pytest.mark.parametrize("in_database", [True, False], ids=["database", "portable"])
def test_a_lot_emptied_after_the_hold_read_it_rolls_the_hold_back(settings, in_database):
    """The hold plans from the lots as read, then locks them before moving points: a lot another
    transaction emptied in between (the expiry sweep, say) is seen under the lock, and the whole hold
    rolls back with ``insufficient-points``, leaving no redemption, transfer or webhook."""
    settings.HUB_REDEMPTION_HOLD_IN_DATABASE = in_database
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, _ = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 50_000)
    make_reward(provider, "coffee", points=10)
    lot = Account.objects.get(kind="wallet_lot", person_id=person.pk)

    # The lot is emptied (a raw balance change: only the hold's view of it matters here).
    result = hold_against_uncommitted(
        lambda: Account.objects.filter(pk=lot.pk).update(balance=0),
        lambda: redemption_hold(person=person, reward_code="coffee", quantity=1),
    )

    assert isinstance(result, InsufficientPoints)
    assert_nothing_held()
    assert Account.objects.get(pk=lot.pk).balance == 0


def test_a_rejection_racing_the_expiry_sweep_voids_once():
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, _ = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 100_000)
    make_reward(provider, "coffee", points=10)
    redemptions = [redemption_hold(person=person, reward_code="coffee", quantity=1) for _ in range(8)]
    after_deadline = max(r.hold_expires_at for r in redemptions)

    def work(i: int) -> Any:
        if i == 0:
            return redemptions_expire(now=after_deadline)
        return redemption_reject(
            provider_id=provider.institution.pk, redemption_id=redemptions[i - 1].public_id, reason=f"no {uuid.uuid4()}"
        ).result

    results = run_at_once(9, work)

    expired, rejections = results[0], results[1:]
    assert expired + rejections.count("rejected") == 8
    assert set(rejections) <= {"rejected", "refused"}
    assert Transfer.objects.filter(kind="void").count() == 8
    assert sum(lot_balances(person.pk).values()) == 100_000 and kind_total("redemption_hold") == 0
    assert ledger_check() == []


def test_a_capture_in_progress_does_not_lock_the_reward_against_new_holds():
    """Fulfilment and voids lock the redemption row, not its reward: a new hold's foreign-key check on the
    reward (FOR KEY SHARE) must not wait for them."""
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, _ = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 50_000)
    reward = make_reward(provider, "coffee", points=10)
    held = redemption_hold(person=person, reward_code="coffee", quantity=1)

    with transaction.atomic():
        redemption_locked(held.pk, person.pk)  # what redemption_fulfil, _reject and _void hold until their commit

        def probe(_: int) -> bool:
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")
                cursor.execute("SELECT 1 FROM settlement_reward WHERE id = %s FOR KEY SHARE", [reward.pk])
                return cursor.fetchone() is not None

        (free,) = run_at_once(1, probe)
    assert free


def test_a_refusal_stored_while_a_hold_of_its_key_runs_is_the_keys_answer():
    """Refusals are stored after their own statement, without the key's lock: a hold with the same key
    that passed its stored-answer check meanwhile must give way to that answer (the function raises
    CH003 at its answer's insert) and leave nothing held, not fail on the unique key."""
    provider = make_sender("coffee-co", provider=True)
    bank = make_sender("bank-a").institution
    person, _ = make_person("mei")
    credit(person.pk, bank.pk, month_end(3), 50_000)
    make_reward(provider, "coffee", points=10)
    refused = {"code": "insufficient-points", "status": 409}

    result = hold_against_uncommitted(
        lambda: RedemptionRequest.objects.create(
            person=person,
            key="order-1",
            request_hash=redemption_request_hash(reward_code="coffee", quantity=1),
            response=refused,
        ),
        lambda: redemption_request(person=person, idempotency_key="order-1", reward_code="coffee", quantity=1),  # type: ignore[arg-type,return-value]
    )

    assert isinstance(result, RedemptionAnswer)
    assert (result.held, result.body, result.replayed) == (False, refused, True)
    assert_nothing_held()
