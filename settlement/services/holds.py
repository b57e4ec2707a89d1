"""Redemption holds: ``POST /me/redemptions`` under its Idempotency-Key, and a hold without one.

A hold takes a reward's points from the person's lots, soonest-expiring first, into
``redemption_hold`` accounts until the provider fulfils or rejects it (:mod:`settlement.services.resolutions`).
Two engines run it: on PostgreSQL one call of the database function ``settlement_redemption_hold``
(:mod:`settlement.services.hold_database`), elsewhere the same steps from Python
(:mod:`settlement.services.hold_portable`). ``tests/settlement/test_hold_engines.py`` holds them equal.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import date, datetime

from django.db import connection, transaction
from django.utils import timezone

from institutions.outbox import outbox_deliver_after_commit
from ledger.books import owners_lock, person_owner
from settlement.exceptions import InvalidReward, RedemptionRefused
from settlement.models import Redemption
from settlement.services.hold_database import AnsweredMeanwhile, held_body, hold_call, hold_in_database
from settlement.services.hold_portable import hold_plan, hold_write
from settlement.services.idempotency import (
    RedemptionAnswer,
    answer_replayed,
    answer_stored,
    idempotency_key_clean,
    key_in_flight,
    redemption_request_hash,
    refusal_stored,
    request_lock_try,
)
from wallets.models import Person


def redemption_request(
    *, person: Person, idempotency_key: str | None, reward_code: str, quantity: int, now: datetime | None = None
) -> RedemptionAnswer:
    """``POST /me/redemptions`` under an ``Idempotency-Key`` (CONTRACT section 4).

    - The first request with a key holds the points (as :func:`redemption_hold`) and answers the
      redemption as held, or answers the refusal (``insufficient-points``, ``out-of-stock``, ...). A
      hold's answer is stored with the key in the hold's transaction, so it exists exactly when its
      effects do; it is stored without its body, which is the redemption as held (rebuilt from its
      rows when replayed).
    - The same key with the same request (reward and quantity) answers the stored answer again, with
      ``replayed`` set; with another request it raises :class:`IdempotencyKeyReused`.
    - While a request with the key is still running, another raises :class:`IdempotencyKeyInFlight`
      at once: each request first tries a transaction-scoped advisory lock on (person, key) and
      never waits for it. A request that crashed or rolled back left nothing, so its key is free again.
      The unique (person, key) constraint stands behind the lock.

    Refusals found by the checks, before anything is written, are stored answers too: the key's first
    answer wins (see :func:`refusal_stored`). The two a race can cause after the writes began (a lot
    swept by the expiry job, the last unit of stock taken by a concurrent hold) roll the hold back
    instead and store nothing: a retry with the key decides afresh. Errors other than refusals store
    nothing either.

    On PostgreSQL the locks, checks and writes, the answer and the webhook are one statement, the
    database function ``settlement_redemption_hold`` (see :func:`hold_in_database`): with Django's
    autocommit, one round trip that commits; inside a caller's ``atomic``, part of its transaction.
    Elsewhere the same steps run here, in one transaction.
    """
    key = idempotency_key_clean(idempotency_key)
    digest = redemption_request_hash(reward_code=reward_code, quantity=quantity)
    _quantity_checked(quantity)
    now = now or timezone.now()
    if hold_in_database():
        # One statement stores the hold with its answer and webhook: in autocommit its own transaction
        # (inside a caller's atomic, a savepoint, so a race refusal leaves the caller's transaction usable).
        try:
            with transaction.atomic() if connection.in_atomic_block else nullcontext():
                outcome = hold_call(
                    person_id=person.pk,
                    key=key,
                    request_hash=digest,
                    reward_code=reward_code,
                    quantity=quantity,
                    now=now,
                )
        except AnsweredMeanwhile:  # a refusal under the key was stored since the call began
            answered = answer_stored(person_id=person.pk, key=key, digest=digest)
            assert answered is not None, "the key's answer is committed"
            return answered
        if outcome.kind == "in-flight":
            raise key_in_flight()
        if outcome.kind == "stored":
            return answer_replayed(outcome.request_hash, outcome.response, outcome.redemption_pk, digest)
        if outcome.refusal is not None:
            return refusal_stored(outcome.refusal, person_id=person.pk, key=key, digest=digest, now=now)
        outbox_deliver_after_commit()
        return RedemptionAnswer(body=held_body(outcome), held=True)

    with transaction.atomic():
        if not request_lock_try(person.pk, key):
            raise key_in_flight()
        owners_lock([person_owner(person.pk)])
        stored = answer_stored(person_id=person.pk, key=key, digest=digest)
        if stored is not None:
            return stored
        try:
            plan = hold_plan(person_id=person.pk, reward_code=reward_code, quantity=quantity, now=now)
        except RedemptionRefused as refusal:  # raised before anything was written
            return refusal_stored(refusal, person_id=person.pk, key=key, digest=digest, now=now)
        _, body = hold_write(plan, answer_key=(key, digest))
        return RedemptionAnswer(body=body, held=True)


@transaction.atomic
def redemption_hold(
    *, person: Person, reward_code: str, quantity: int, now: datetime | None = None, today: date | None = None
) -> Redemption:
    """Hold the points of ``quantity`` units of a reward for ``person``: one transaction, all or nothing.

    Under the person's owner lock (the one crediting, consolidation, reversals and erasure take, so
    holds and credits of one person run one after the other): checks the reward exists
    (:class:`RewardNotFound`), is in its window with an active provider (:class:`RewardUnavailable`),
    has the stock (:class:`OutOfStock`) and is within the person's limit, counting pending and fulfilled
    units (:class:`RedemptionLimitReached`); then that the person's live wallet lots, less what they owe
    back after reversals, cover the points (:class:`InsufficientPoints`). Points owed back are not
    spendable: a debt to any issuer reduces what may be held.

    Takes the points from the lots soonest-expiring first (then by issuer id), moves them in one ledger
    transfer ``redemption:<id>:hold`` to ``redemption_hold(redemption, issuer)``, records one allocation
    per lot (account, issuer, expiry, milligrams), writes the ``carbon.redemption.requested`` webhook to
    the provider in this transaction, and takes the stock last (a conditional ``UPDATE``, so the reward
    row is locked only from there to the commit). Raises before committing anything otherwise.
    """
    _quantity_checked(quantity)
    if hold_in_database():
        outcome = hold_call(
            person_id=person.pk, key=None, reward_code=reward_code, quantity=quantity, now=now, today=today
        )
        if outcome.refusal is not None:
            raise outcome.refusal
        outbox_deliver_after_commit()
        assert outcome.redemption_pk is not None, "a hold names its redemption"
        return Redemption.objects.get(pk=outcome.redemption_pk)
    owners_lock([person_owner(person.pk)])
    plan = hold_plan(person_id=person.pk, reward_code=reward_code, quantity=quantity, now=now, today=today)
    redemption_id, _ = hold_write(plan)
    return Redemption.objects.get(pk=redemption_id)


def _quantity_checked(quantity: int) -> None:
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity <= 0:
        raise InvalidReward("The quantity must be a positive integer.")
