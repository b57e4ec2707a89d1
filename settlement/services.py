"""Settlement writes: rewards, redemptions (hold, capture, void), obligations, cycles (cut, net,
instruct) and confirmations.

Every service is ``@transaction.atomic`` or says which transactions it opens; the states they move a
cycle through are described at the top of ``settlement/models.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F, Sum
from django.utils import timezone

from clearinghouse.db import advisory_lock_id, execute_prepared, insert_sql
from institutions.models import Institution, OutboxMessage
from institutions.outbox import (
    outbox_deliver_after_commit,
    outbox_enqueue,
    outbox_event_head,
    outbox_message_id,
    outbox_replay,
)
from ledger.books import owner_lock_id, owners_lock, person_owner
from ledger.exceptions import InsufficientBalance
from ledger.models import Account, AccountKind, TransferKind
from ledger.services import AccountKey, TransferSpec, accounts_ensure, transfers_post
from ledger.units import MG_PER_POINT, standard_today
from settlement import netting
from settlement.digest import CARRY_SOURCE_PREFIX, party_lines, statement_digest
from settlement.exceptions import (
    CycleOrder,
    IdempotencyKeyInFlight,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IllegalCycleTransition,
    InsufficientPoints,
    InvalidObligation,
    InvalidReward,
    NoPrice,
    NotAProvider,
    ObligationImmutable,
    OutOfStock,
    RedemptionLimitReached,
    RedemptionNotPending,
    RedemptionRefused,
    RewardExists,
    RewardNotFound,
    RewardUnavailable,
)
from settlement.models import (
    CURRENCY,
    Confirmation,
    ConfirmationStatus,
    Cycle,
    CycleState,
    Instruction,
    InstructionDirection,
    InstructionState,
    NetPosition,
    Obligation,
    Redemption,
    RedemptionAllocation,
    RedemptionRequest,
    RedemptionStatus,
    Reward,
    SettlementPrice,
    new_redemption_id,
    window_open,
)
from settlement.selectors import redemption_body, redemption_json
from wallets.models import Membership, Person
from wallets.services import person_erase

logger = logging.getLogger(__name__)

# Which state may follow which. A closed cycle (settled onwards) never takes obligations again; a
# failed cycle may be instructed again (retry) or disputed; a dispute ends settled or failed.
CYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    CycleState.OPEN: frozenset({CycleState.CUT_OFF}),
    CycleState.CUT_OFF: frozenset({CycleState.NETTED}),
    CycleState.NETTED: frozenset({CycleState.INSTRUCTED}),
    CycleState.INSTRUCTED: frozenset({CycleState.SETTLED, CycleState.FAILED, CycleState.DISPUTED}),
    CycleState.SETTLED: frozenset({CycleState.RECONCILED, CycleState.DISPUTED, CycleState.FAILED}),
    CycleState.FAILED: frozenset({CycleState.INSTRUCTED, CycleState.DISPUTED}),
    CycleState.DISPUTED: frozenset({CycleState.INSTRUCTED, CycleState.SETTLED, CycleState.FAILED}),
    CycleState.RECONCILED: frozenset(),
}

_TICK = timedelta(microseconds=1)


def _party(value: Any) -> str:
    return "hub" if value is None else str(value)


def price_in_force(*, at: datetime | None = None, currency: str = CURRENCY) -> SettlementPrice:
    """The latest price with ``valid_from <= at``. Raises :class:`NoPrice` if there is none."""
    at = at or timezone.now()
    price = SettlementPrice.objects.filter(currency=currency, valid_from__lte=at).order_by("-valid_from").first()
    if price is None:
        raise NoPrice(f"No {currency} settlement price is in force at {at.isoformat()}.")
    return price


@dataclass(frozen=True)
class ObligationSpec:
    debtor_id: int | None
    creditor_id: int | None
    amount_minor: int
    points_mg: int = 0


@transaction.atomic
def obligations_record(
    *,
    source: str,
    obligations: Sequence[ObligationSpec | netting.Gross],
    currency: str = CURRENCY,
    price: SettlementPrice | None = None,
    now: datetime | None = None,
) -> list[Obligation]:
    """Store the gross obligations of one ``source`` (e.g. ``redemption:17``); idempotent per source and pair.

    A repeat with the same source returns the stored rows unchanged; if a repeat names a different
    amount for a stored pair it raises :class:`ObligationImmutable` (a correction is a new obligation
    under its own source). Raises :class:`InvalidObligation` for non-positive amounts, a party owing
    itself, or the same pair twice in one call. Obligations are unassigned until the next cut-off.
    """
    now = now or timezone.now()
    if not source or "|" in source or not source.isprintable() or len(source) > 64:
        raise InvalidObligation(f"Source {source!r} must be 1 to 64 printable characters without '|'.")
    rows: list[Obligation] = []
    seen: set[str] = set()
    for spec in obligations:
        debtor = spec.debtor_id if isinstance(spec, ObligationSpec) else spec.debtor
        creditor = spec.creditor_id if isinstance(spec, ObligationSpec) else spec.creditor
        if spec.amount_minor <= 0:
            raise InvalidObligation(f"Amount must be positive, not {spec.amount_minor}.")
        if debtor == creditor:
            raise InvalidObligation(f"{_party(debtor)} cannot owe itself.")
        key = f"{source}:{_party(debtor)}>{_party(creditor)}"
        if key in seen:
            raise InvalidObligation(f"The pair {key} appears twice; sum it first.")
        seen.add(key)
        rows.append(
            Obligation(
                key=key,
                debtor_id=debtor,
                creditor_id=creditor,
                amount_minor=spec.amount_minor,
                currency=currency,
                points_mg=spec.points_mg,
                source=source,
                price=price,
                created_at=now,
            )
        )
    if not rows:
        return []
    Obligation.objects.bulk_create(rows, ignore_conflicts=True)
    stored = {o.key: o for o in Obligation.objects.filter(key__in=seen)}
    for row in rows:
        kept = stored[row.key]
        if (kept.amount_minor, kept.currency, kept.debtor_id, kept.creditor_id) != (
            row.amount_minor,
            row.currency,
            row.debtor_id,
            row.creditor_id,
        ):
            raise ObligationImmutable(
                f"Obligation {row.key} already exists with {kept.amount_minor} {kept.currency}; "
                "record a correction under a new source instead."
            )
    return [stored[row.key] for row in rows]


@transaction.atomic
def obligations_for_redemption(
    *, redemption_id: int, provider_id: int, mg_by_issuer: dict[int, int], at: datetime | None = None
) -> list[Obligation]:
    """The obligations of one captured redemption at the price in force ``at``; idempotent per redemption."""
    price = price_in_force(at=at)
    gross = netting.obligations_for_capture(mg_by_issuer, provider_id, price.fen_per_thousand_points)
    return obligations_record(
        source=f"redemption:{redemption_id}", obligations=gross, currency=price.currency, price=price, now=at
    )


@transaction.atomic
def cycle_transition(*, cycle: Cycle, to: str) -> Cycle:
    """Move ``cycle`` to state ``to`` under a row lock. Raises :class:`IllegalCycleTransition` otherwise."""
    locked = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if to not in CYCLE_TRANSITIONS.get(locked.state, frozenset()):
        raise IllegalCycleTransition(
            f"Cycle {locked.pk} cannot go from {locked.state} to {to}.", cycle_id=locked.pk, state=locked.state, to=to
        )
    locked.state = to
    locked.updated_at = timezone.now()
    locked.save(update_fields=["state", "updated_at"])
    cycle.state, cycle.updated_at = locked.state, locked.updated_at
    return locked


@transaction.atomic
def cycle_cut(*, now: datetime | None = None, currency: str = CURRENCY) -> Cycle | None:
    """Close a cycle at ``now``: every unassigned obligation created at or before ``now`` joins it.

    Obligations created later stay unassigned and roll into the next cut. Returns the new cycle, in
    state ``cut_off``, or ``None`` when nothing new is waiting: no empty cycles, and no cycle of
    carry-forwards alone (each would be under the minimum again, so such a cycle could only carry them
    once more; they wait for the next cycle with business in it). A second cut right after the first
    is therefore a no-op, which makes the daily task safe to run twice. Safe against a concurrent cut:
    the assignment is one ``UPDATE ... WHERE cycle_id IS NULL``, so PostgreSQL re-checks each row and an
    obligation lands in exactly one cycle; a cut that finds every row taken meanwhile removes its cycle
    and returns ``None``. Raises :class:`CycleOrder` if ``now`` is not after the previous cut-off
    (cycles never overlap).
    """
    now = now or timezone.now()
    last = Cycle.objects.filter(currency=currency).order_by("-cut_off_at").first()
    if last is not None and now <= last.cut_off_at:
        raise CycleOrder(f"Cut-off {now.isoformat()} is not after the last one, {last.cut_off_at.isoformat()}.")
    waiting = Obligation.objects.filter(cycle__isnull=True, currency=currency, created_at__lte=now)
    if not waiting.exclude(source__startswith=CARRY_SOURCE_PREFIX).exists():
        return None
    cycle = Cycle.objects.create(currency=currency, cut_off_at=now, state=CycleState.OPEN)
    if not waiting.update(cycle=cycle):
        cycle.delete()  # a concurrent cut took them all; nothing refers to this cycle yet
        return None
    return cycle_transition(cycle=cycle, to=CycleState.CUT_OFF)


@transaction.atomic
def cycle_net(*, cycle: Cycle, minimum_minor: int | None = None, now: datetime | None = None) -> list[NetPosition]:
    """Net a cut-off cycle: store one NetPosition per institution and move the cycle to ``netted``.

    Aggregates the cycle's obligations by ``(debtor, creditor)`` in the database, nets them with the hub
    as central counterparty and asserts the positions sum to zero (hub included). A net under
    ``minimum_minor`` (default ``HUB_SETTLEMENT_MIN_MINOR``) is not instructed: it becomes a carry-forward
    obligation between the institution and the hub, unassigned, so the next cut takes it. Raises
    :class:`IllegalCycleTransition` unless the cycle is ``cut_off``, :class:`CycleOrder` if an earlier
    cycle is not netted yet.
    """
    minimum = settings.HUB_SETTLEMENT_MIN_MINOR if minimum_minor is None else minimum_minor
    cycle = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if cycle.state != CycleState.CUT_OFF:
        raise IllegalCycleTransition(f"Cycle {cycle.pk} is {cycle.state}; only a cut-off cycle can be netted.")
    if Cycle.objects.filter(
        currency=cycle.currency, cut_off_at__lt=cycle.cut_off_at, state__in=[CycleState.OPEN, CycleState.CUT_OFF]
    ).exists():
        raise CycleOrder(f"An earlier cycle than {cycle.pk} is not netted yet; net cycles in order.")
    pairs = [
        (row["debtor_id"], row["creditor_id"], row["total"])
        for row in Obligation.objects.filter(cycle=cycle)
        .values("debtor_id", "creditor_id")
        .annotate(total=Sum("amount_minor"))
        .order_by()
    ]
    positions = netting.net_positions(pairs)
    gross_in, gross_out = netting.gross_totals(pairs)
    _, carried = netting.instructions(positions, minimum)
    rows: list[NetPosition] = []
    for institution, net in sorted((k, v) for k, v in positions.items() if k is not netting.HUB):
        assert isinstance(institution, int)  # parties other than HUB are the obligations' institution ids
        rows.append(
            NetPosition(
                cycle=cycle,
                institution_id=institution,
                gross_in=gross_in.get(institution, 0),
                gross_out=gross_out.get(institution, 0),
                net_minor=net,
                carried_forward_minor=carried.get(institution, 0),
            )
        )
    NetPosition.objects.bulk_create(rows)
    carries = [
        ObligationSpec(debtor_id=institution, creditor_id=None, amount_minor=-net)
        if net < 0
        else ObligationSpec(debtor_id=None, creditor_id=institution, amount_minor=net)
        for institution, net in sorted(carried.items())
    ]
    if carries:
        # Created after this cycle's cut-off, so the next cut takes them; never in this (closed) cycle.
        carry_at = max(now or timezone.now(), cycle.cut_off_at + _TICK)
        obligations_record(
            source=f"{CARRY_SOURCE_PREFIX}cycle-{cycle.pk}", obligations=carries, currency=cycle.currency, now=carry_at
        )
    cycle_transition(cycle=cycle, to=CycleState.NETTED)
    return rows


def cycle_obligations(*, cycle: Cycle) -> list[Obligation]:
    """The gross obligations of a cycle, in id order."""
    return list(Obligation.objects.filter(cycle=cycle).order_by("id"))


# --- Instructions -----------------------------------------------------------------------------------

INSTRUCTION_TYPE = "carbon.settlement.instruction"


def value_date_for(cut_off_at: datetime, *, business_days: int | None = None) -> date:
    """The value date of a cycle's instructions: ``business_days`` (default ``HUB_SETTLEMENT_VALUE_DAYS``)
    Monday-to-Friday days after the cut-off's local date in ``HUB_STANDARD_TIMEZONE``. No holiday calendar:
    the scheme's banks move a date that falls on a holiday by their own rules."""
    days = settings.HUB_SETTLEMENT_VALUE_DAYS if business_days is None else business_days
    day = timezone.localdate(cut_off_at, timezone=ZoneInfo(settings.HUB_STANDARD_TIMEZONE))
    while days > 0:
        day += timedelta(days=1)
        if day.weekday() < 5:
            days -= 1
    return day


def _new_instruction_id() -> str:
    return f"ins_{uuid.uuid4().hex}"


def instruction_webhook_data(instruction: Instruction) -> dict[str, Any]:
    """Exactly the ``data`` fields of ``carbon.settlement.instruction`` (CONTRACT section 3)."""
    return {
        "instruction_id": instruction.instruction_id,
        "cycle_id": instruction.cycle_id,
        "direction": instruction.direction,
        "amount_minor": instruction.amount_minor,
        "currency": instruction.currency,
        "value_date": instruction.value_date.isoformat(),
        "statement_digest": instruction.statement_digest,
    }


@transaction.atomic
def cycle_instruct(*, cycle: Cycle, now: datetime | None = None) -> list[Instruction]:
    """Write the instructions of a netted cycle, each with its signed webhook, and move it to ``instructed``.

    Locks the cycle. One instruction per net position whose net was not carried forward: a net debtor
    pays the hub (``pay``), the hub pays a net creditor (``receive``), for ``net - carried``. Its digest
    covers exactly the cycle's obligations the institution is party to (both directions, carries
    included), the same lines its statement lists. The ``carbon.settlement.instruction`` outbox message
    is written in this transaction, so an instruction exists if and only if its webhook does. The cycle
    then moves as far as it can (see the models' overview: no ``pay`` instruction means settled at once).
    Raises :class:`IllegalCycleTransition` unless the cycle is ``netted`` (so a second call writes nothing).
    """
    now = now or timezone.now()
    cycle = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if cycle.state != CycleState.NETTED:
        raise IllegalCycleTransition(f"Cycle {cycle.pk} is {cycle.state}; only a netted cycle can be instructed.")
    positions = [p for p in NetPosition.objects.filter(cycle=cycle).order_by("institution_id") if p.instructed_minor]
    institutions = Institution.objects.in_bulk([p.institution_id for p in positions])
    lines = party_lines(cycle_obligations(cycle=cycle))
    value_date = value_date_for(cycle.cut_off_at)
    made: list[Instruction] = []
    for position in positions:
        signed = position.instructed_minor
        instruction = Instruction(
            instruction_id=_new_instruction_id(),
            cycle=cycle,
            institution_id=position.institution_id,
            direction=Instruction.Direction.PAY if signed < 0 else Instruction.Direction.RECEIVE,
            amount_minor=abs(signed),
            currency=cycle.currency,
            value_date=value_date,
            statement_digest=statement_digest(lines.get((cycle.pk, position.institution_id), [])),
            created_at=now,
            updated_at=now,
        )
        instruction.message = outbox_enqueue(
            institution=institutions[position.institution_id],
            type=INSTRUCTION_TYPE,
            data=instruction_webhook_data(instruction),
        )
        instruction.save(force_insert=True)
        made.append(instruction)
    cycle_transition(cycle=cycle, to=CycleState.INSTRUCTED)
    _cycle_advance(cycle)
    return made


@dataclass(frozen=True)
class CycleRun:
    cycle: Cycle
    positions: list[NetPosition]
    instructions: list[Instruction]


@transaction.atomic
def cycle_run(
    *, now: datetime | None = None, minimum_minor: int | None = None, currency: str = CURRENCY
) -> CycleRun | None:
    """Cut, net and instruct a cycle in one transaction: what ``settlement_run`` and the daily task do.

    Returns ``None`` when nothing new is waiting (see :func:`cycle_cut`), so running it twice is
    harmless. All or nothing: a crash leaves no cycle half netted or instructed without its webhooks.
    """
    cycle = cycle_cut(now=now, currency=currency)
    if cycle is None:
        return None
    positions = cycle_net(cycle=cycle, minimum_minor=minimum_minor, now=now)
    instructions = cycle_instruct(cycle=cycle, now=now)
    cycle.refresh_from_db()
    return CycleRun(cycle=cycle, positions=positions, instructions=instructions)


# --- Cycle states driven by confirmations and deliveries --------------------------------------------


def _cycle_path(start: str, goal: str) -> list[str]:
    """The shortest walk through :data:`CYCLE_TRANSITIONS` from ``start`` to ``goal`` (states after start)."""
    paths: dict[str, list[str]] = {start: []}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if state == goal:
            return paths[state]
        for following in sorted(CYCLE_TRANSITIONS[state]):
            if following not in paths:
                paths[following] = [*paths[state], following]
                queue.append(following)
    raise IllegalCycleTransition(f"No way from {start} to {goal}.", state=start, to=goal)


def _cycle_goal(state: str, instructions: Sequence[tuple[str, str]]) -> str:
    """Where a cycle's ``(direction, state)`` of instructions puts it (the rules of the models' overview)."""
    if state in (CycleState.OPEN, CycleState.CUT_OFF, CycleState.NETTED, CycleState.RECONCILED):
        return state
    if any(s == InstructionState.DISPUTED for _, s in instructions):
        return CycleState.DISPUTED
    if all(s == InstructionState.PAID for d, s in instructions if d == InstructionDirection.PAY):
        if all(s == InstructionState.RECEIVED for d, s in instructions if d == InstructionDirection.RECEIVE):
            return CycleState.RECONCILED
        return CycleState.SETTLED
    # A dispute withdrawn before every payer paid: the cycle waits again as it did before.
    return CycleState.INSTRUCTED if state == CycleState.DISPUTED else state


def _cycle_advance(cycle: Cycle) -> Cycle:
    """Move a cycle (locked by the caller) to where its instructions' states put it, step by allowed step."""
    instructions = list(Instruction.objects.filter(cycle=cycle).values_list("direction", "state"))
    goal = _cycle_goal(cycle.state, instructions)
    for step in [] if goal == cycle.state else _cycle_path(cycle.state, goal):
        cycle_transition(cycle=cycle, to=step)
    return cycle


@dataclass(frozen=True)
class ConfirmationIn:
    """One ``carbon.settlement.confirmed`` event as the dispatcher hands it over."""

    inbox_event_id: int
    institution_id: int
    instruction_id: str
    status: str
    reference: str


# A payer confirms it paid, a receiver that it received; either may dispute.
_ALLOWED_STATUS = {
    InstructionDirection.PAY: frozenset({ConfirmationStatus.PAID, ConfirmationStatus.DISPUTED}),
    InstructionDirection.RECEIVE: frozenset({ConfirmationStatus.RECEIVED, ConfirmationStatus.DISPUTED}),
}


@transaction.atomic
def confirmations_record(*, confirmations: Sequence[ConfirmationIn]) -> list[dict[str, Any]]:
    """Record institutions' confirmations of their instructions; one outcome per input, in order.

    Accepted: a :class:`Confirmation` row is added (every one is kept), the instruction's state becomes
    its status, and the cycle moves as the overview says (``disputed`` at once on a dispute, which the
    admin flags). Refused, with nothing written: ``unknown_instruction`` (no such id, or the
    instruction of another institution: the same answer, so ids cannot be probed), ``status_mismatch``
    (a payer confirming ``received`` or a receiver ``paid``), ``cycle_reconciled`` (the cycle is closed;
    a correction goes into a later cycle). Idempotent per inbox event: a repeat returns the first answer
    without adding a row. The cycles concerned are locked in id order before any instruction is read
    for update, so concurrent batches cannot deadlock.
    """
    wanted = {c.instruction_id for c in confirmations}
    instructions = {i.instruction_id: i for i in Instruction.objects.filter(instruction_id__in=wanted)}
    cycles = {
        c.pk: c
        for c in Cycle.objects.select_for_update()
        .filter(pk__in={i.cycle_id for i in instructions.values()})
        .order_by("pk")
    }
    done = dict(
        Confirmation.objects.filter(inbox_event_id__in=[c.inbox_event_id for c in confirmations]).values_list(
            "inbox_event_id", "instruction_id"
        )
    )
    outcomes: list[dict[str, Any]] = []
    for incoming in confirmations:
        instruction = instructions.get(incoming.instruction_id)
        if instruction is None or instruction.institution_id != incoming.institution_id:
            outcomes.append({"confirmed": False, "reason": "unknown_instruction"})
            continue
        instruction.refresh_from_db(fields=["state", "updated_at"])  # under the cycle's lock now
        cycle = cycles[instruction.cycle_id]
        if incoming.inbox_event_id in done:
            outcomes.append(_confirmed(instruction, cycle, incoming.status))
            continue
        if incoming.status not in _ALLOWED_STATUS[InstructionDirection(instruction.direction)]:
            outcomes.append({"confirmed": False, "reason": "status_mismatch"})
            continue
        if cycle.state == CycleState.RECONCILED:
            outcomes.append({"confirmed": False, "reason": "cycle_reconciled"})
            continue
        now = timezone.now()
        Confirmation.objects.create(
            instruction=instruction,
            inbox_event_id=incoming.inbox_event_id,
            status=incoming.status,
            reference=incoming.reference,
            received_at=now,
        )
        done[incoming.inbox_event_id] = instruction.pk
        instruction.state, instruction.updated_at = incoming.status, now
        instruction.save(update_fields=["state", "updated_at"])
        if incoming.status == ConfirmationStatus.DISPUTED:
            logger.warning(
                "settlement: instruction %s of cycle %s disputed (reference %r); the operator must resolve it",
                instruction.instruction_id,
                cycle.pk,
                incoming.reference,
            )
        _cycle_advance(cycle)
        outcomes.append(_confirmed(instruction, cycle, incoming.status))
    return outcomes


def _confirmed(instruction: Instruction, cycle: Cycle, status: str) -> dict[str, Any]:
    return {
        "confirmed": True,
        "instruction_id": instruction.instruction_id,
        "status": status,
        "instruction_state": instruction.state,
        "cycle_id": cycle.pk,
        "cycle_state": cycle.state,
    }


# Cycles whose instructions are still being delivered or answered: a dead webhook there fails the cycle.
# A settled cycle is one: its payers paid, but a receiver whose webhook died was never told.
_AWAITING_INSTITUTIONS = (CycleState.INSTRUCTED, CycleState.SETTLED, CycleState.DISPUTED)


@transaction.atomic
def cycles_fail_undelivered() -> list[int]:
    """Move every instructed, settled or disputed cycle with an instruction whose webhook is dead to
    ``failed``; their ids. The beat watch runs it; safe to run twice (a failed cycle is left alone).
    """
    ids = list(
        Cycle.objects.filter(state__in=_AWAITING_INSTITUTIONS, instructions__message__status=OutboxMessage.Status.DEAD)
        .values_list("pk", flat=True)
        .distinct()
        .order_by("pk")
    )
    failed: list[int] = []
    awaiting = Cycle.objects.select_for_update().filter(pk__in=ids, state__in=_AWAITING_INSTITUTIONS)
    for cycle in awaiting.order_by("pk"):
        cycle_transition(cycle=cycle, to=CycleState.FAILED)
        logger.error("settlement: cycle %s failed: an instruction's webhook died undelivered", cycle.pk)
        failed.append(cycle.pk)
    return failed


@transaction.atomic
def cycle_resend(*, cycle: Cycle) -> int:
    """Operator: send a failed cycle's dead instruction webhooks again (same webhook-id, fresh schedule).

    Moves the cycle back to ``instructed`` (and on, if confirmations already justify it). Returns how
    many messages were put back. Raises :class:`IllegalCycleTransition` unless the cycle is ``failed``.
    """
    cycle = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if cycle.state != CycleState.FAILED:
        raise IllegalCycleTransition(f"Cycle {cycle.pk} is {cycle.state}; only a failed cycle is resent.")
    message_ids = list(Instruction.objects.filter(cycle=cycle).values_list("message_id", flat=True))
    count = outbox_replay(ids=message_ids)
    cycle_transition(cycle=cycle, to=CycleState.INSTRUCTED)
    _cycle_advance(cycle)
    return count


# --- Rewards ------------------------------------------------------------------------------------------

REWARD_CODE = re.compile(r"^[a-z0-9-]{2,40}$")
REWARD_TITLE_MAX = 200


@transaction.atomic
def reward_create(
    *,
    provider: Institution,
    code: str,
    title: str,
    points: int,
    stock: int | None = None,
    per_person_limit: int | None = None,
    active_from: datetime | None = None,
    active_until: datetime | None = None,
) -> Reward:
    """Add a reward offered by ``provider`` (CONTRACT section 6).

    Raises :class:`NotAProvider` unless the institution is a provider, :class:`InvalidReward` for a
    code outside ``[a-z0-9-]{2,40}``, an empty title, non-positive points or limit, negative stock or a
    window that ends before it starts, and :class:`RewardExists` when the code is taken (by any provider:
    persons redeem by code alone). Changes nothing when it raises.
    """
    if not provider.is_provider:
        raise NotAProvider(f"{provider.code} is not a provider; register it with --provider to offer rewards.")
    problems = []
    if not REWARD_CODE.match(code):
        problems.append("the code must match [a-z0-9-]{2,40}")
    if not title.strip() or len(title) > REWARD_TITLE_MAX:
        problems.append(f"the title must be 1 to {REWARD_TITLE_MAX} characters")
    if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
        problems.append("points must be a positive integer")
    if stock is not None and stock < 0:
        problems.append("stock cannot be negative")
    if per_person_limit is not None and per_person_limit <= 0:
        problems.append("the per-person limit must be positive")
    if active_from is not None and active_until is not None and active_until <= active_from:
        problems.append("the window must end after it starts")
    if problems:
        raise InvalidReward("; ".join(problems).capitalize() + ".")
    try:
        with transaction.atomic():
            return Reward.objects.create(
                provider=provider,
                code=code,
                title=title.strip(),
                points=points,
                stock=stock,
                per_person_limit=per_person_limit,
                active_from=active_from,
                active_until=active_until,
            )
    except IntegrityError as exc:
        raise RewardExists(f"The reward code {code!r} is taken.") from exc


# --- Redemptions: the request and its Idempotency-Key ----------------------------------------------------

REDEMPTION_REQUESTED = "carbon.redemption.requested"
IDEMPOTENCY_KEY_MAX = 255
_KEY_TEXT = re.compile(r"^[\x20-\x7e]+$")


@dataclass(frozen=True, slots=True)
class RedemptionAnswer:
    """What ``POST /me/redemptions`` answers: a status and a JSON body, the same for every repeat of a key."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


def idempotency_key_clean(raw: str | None) -> str:
    """The key as stored: the header's value, without the double quotes of its structured-field form
    (``"abc"`` and ``abc`` are one key). Raises :class:`IdempotencyKeyMissing` or :class:`IdempotencyKeyInvalid`."""
    if raw is None or not raw.strip():
        raise IdempotencyKeyMissing("Send an Idempotency-Key header: a unique string per redemption you mean to make.")
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not _KEY_TEXT.match(key):
        raise IdempotencyKeyInvalid(f"An Idempotency-Key is 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters.")
    return key


def redemption_request_hash(*, reward_code: str, quantity: int) -> str:
    """SHA-256 over the canonical request: what a repeat of the key must match."""
    canonical = json.dumps({"quantity": quantity, "reward": reward_code}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _request_lock_id(person_id: int, key: str) -> int:
    """The advisory lock id of (person, Idempotency-Key): held by the transaction answering it."""
    return advisory_lock_id(f"redemption-request\x00{person_id}\x00{key}")


def _request_lock_try(person_id: int, key: str) -> bool:
    """Take the transaction's advisory lock on (person, key) if free; False while another request holds it.

    SQLite runs one writer at a time, so there no request is ever in flight beside another."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_request_lock_id(person_id, key)])
        row = cursor.fetchone()
    return bool(row and row[0])


def _key_in_flight() -> IdempotencyKeyInFlight:
    return IdempotencyKeyInFlight(
        "A request with this Idempotency-Key is still running; retry shortly.", headers={"Retry-After": "1"}
    )


def _replayed(
    request_hash: str, status_code: int, response: Any, redemption_id: int | None, digest: str
) -> RedemptionAnswer:
    """The stored answer of a key sent again; :class:`IdempotencyKeyReused` if the request differs.
    A ``201`` is stored without its body: it is the redemption as held, rebuilt from its rows."""
    if request_hash != digest:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used for another request; use a new key for a new redemption."
        )
    if response is None:
        assert redemption_id is not None, "a 201 answer names its redemption"
        redemption = Redemption.objects.select_related("reward", "provider").get(pk=redemption_id)
        return RedemptionAnswer(status=status_code, body=redemption_json(redemption, as_held=True), replayed=True)
    body = json.loads(response) if isinstance(response, str) else response
    return RedemptionAnswer(status=status_code, body=body, replayed=True)


def _stored_answer(*, person_id: int, key: str, digest: str) -> RedemptionAnswer | None:
    """The key's stored answer, replayed (see :func:`_replayed`); None if it has none."""
    stored, _ = _run(
        f"SELECT request_hash, status_code, response, redemption_id FROM {RedemptionRequest._meta.db_table}"  # noqa: S608
        " WHERE person_id = %s AND key = %s",
        [person_id, key],
    )
    if not stored:
        return None
    ((request_hash, status_code, response, redemption_id),) = stored
    return _replayed(request_hash, status_code, response, redemption_id, digest)


def _refusal_stored(
    refusal: RedemptionRefused, *, person_id: int, key: str, digest: str, now: datetime
) -> RedemptionAnswer:
    """Store a refusal found before anything was written as the key's answer, and return it.

    On the database path the hold's statement has committed and released the key's lock by now, so a
    request with the same key may have stored its answer in between: that answer, the key's first,
    is then the one given (the insert does nothing)."""
    answer = RedemptionAnswer(status=refusal.status, body=refusal.problem())
    sql, params = insert_sql(
        RedemptionRequest(
            person_id=person_id,
            key=key,
            request_hash=digest,
            status_code=answer.status,
            response=answer.body,
            created_at=now,
        )
    )
    _, inserted = _run(f"{sql} ON CONFLICT (person_id, key) DO NOTHING", params)
    if inserted:
        return answer
    first = _stored_answer(person_id=person_id, key=key, digest=digest)
    assert first is not None, "a conflicting answer is committed"
    return first


def redemption_request(
    *, person: Person, idempotency_key: str | None, reward_code: str, quantity: int, now: datetime | None = None
) -> RedemptionAnswer:
    """``POST /me/redemptions`` under an ``Idempotency-Key`` (CONTRACT section 4).

    - The first request with a key holds the points (as :func:`redemption_hold`) and answers ``201``
      with the redemption, or answers the refusal (``insufficient-points``, ``out-of-stock``, ...). A
      hold's answer is stored with the key in the hold's transaction, so it exists exactly when its
      effects do; a ``201`` is stored without its body, which is the redemption as held (rebuilt from
      its rows when replayed).
    - The same key with the same request (reward and quantity) answers the stored answer again, with
      ``replayed`` set; with another request it raises :class:`IdempotencyKeyReused` (422).
    - While a request with the key is still running, another raises :class:`IdempotencyKeyInFlight`
      (409) at once: each request first tries a transaction-scoped advisory lock on (person, key) and
      never waits for it. A request that crashed or rolled back left nothing, so its key is free again.
      The unique (person, key) constraint stands behind the lock.

    Refusals found by the checks, before anything is written, are stored answers too: the key's first
    answer wins (see :func:`_refusal_stored`). The two a race can cause after the writes began (a lot
    swept by the expiry job, the last unit of stock taken by a concurrent hold) roll the hold back
    instead and store nothing: a retry with the key decides afresh. Errors other than refusals store
    nothing either.

    On PostgreSQL the locks, checks and writes, the answer and the webhook are one statement, the
    database function ``settlement_redemption_hold`` (see :func:`_hold_in_database`): with Django's
    autocommit, one round trip that commits; inside a caller's ``atomic``, part of its transaction.
    Elsewhere the same steps run here, in one transaction.
    """
    key = idempotency_key_clean(idempotency_key)
    digest = redemption_request_hash(reward_code=reward_code, quantity=quantity)
    _quantity_checked(quantity)
    now = now or timezone.now()
    if _hold_in_database():
        # One statement stores the hold with its answer and webhook: in autocommit its own transaction
        # (inside a caller's atomic, a savepoint, so a race refusal leaves the caller's transaction usable).
        try:
            with transaction.atomic() if connection.in_atomic_block else nullcontext():
                outcome = _hold_call(
                    person_id=person.pk,
                    key=key,
                    request_hash=digest,
                    reward_code=reward_code,
                    quantity=quantity,
                    now=now,
                )
        except _AnsweredMeanwhile:  # a refusal under the key was stored since the call began
            answered = _stored_answer(person_id=person.pk, key=key, digest=digest)
            assert answered is not None, "the key's answer is committed"
            return answered
        if outcome.kind == "in-flight":
            raise _key_in_flight()
        if outcome.kind == "stored":
            return _replayed(outcome.request_hash, outcome.status, outcome.response, outcome.redemption_pk, digest)
        if outcome.refusal is not None:
            return _refusal_stored(outcome.refusal, person_id=person.pk, key=key, digest=digest, now=now)
        outbox_deliver_after_commit()
        return RedemptionAnswer(status=201, body=_held_body(outcome))

    with transaction.atomic():
        if not _request_lock_try(person.pk, key):
            raise _key_in_flight()
        owners_lock([person_owner(person.pk)])
        stored = _stored_answer(person_id=person.pk, key=key, digest=digest)
        if stored is not None:
            return stored
        try:
            plan = _hold_plan(person_id=person.pk, reward_code=reward_code, quantity=quantity, now=now)
        except RedemptionRefused as refusal:  # raised before anything was written
            return _refusal_stored(refusal, person_id=person.pk, key=key, digest=digest, now=now)
        _, body = _hold_write(plan, answer_key=(key, digest))
        return RedemptionAnswer(status=201, body=body)


# --- Redemptions: hold, capture, void ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lot:
    account_id: int
    issuer_id: int
    issuer_code: str
    expires_on: date
    balance: int


def spendable_lots(*, person_id: int, today: date) -> tuple[list[_Lot], int]:
    """The person's live wallet lots with points, soonest-expiring first (then issuer, then account id),
    and the milligrams they owe back (debts, >= 0). Read under the person's owner lock to be current.

    One query through the ledger's ``ledger_account_person`` index, with the issuers' codes joined in. The
    expiry is tested here, not in the query: there the prepared statement's generic plan ANDed the
    person's index with the lots' expiry index, a scan of every live lot in the hub. Lapsed lots with
    points are few (the expiry job sweeps them)."""
    rows, _ = _run(
        f"""SELECT a.id, a.kind, a.issuer_id, i.code, a.expires_on, a.balance
              FROM {Account._meta.db_table} a JOIN {Institution._meta.db_table} i ON i.id = a.issuer_id
             WHERE a.person_id = %s AND (a.kind = %s AND a.balance > 0 OR a.kind = %s AND a.balance < 0)""",  # noqa: S608
        [person_id, str(AccountKind.WALLET_LOT), str(AccountKind.DEBT)],
    )
    lots: list[_Lot] = []
    owed = 0
    for account_id, kind, issuer_id, code, expires_on, balance in rows:
        if kind == AccountKind.DEBT:
            owed -= balance
        elif expires_on >= today:
            lots.append(_Lot(account_id, issuer_id, code, expires_on, balance))
    lots.sort(key=lambda lot: (lot.expires_on, lot.issuer_id, lot.account_id))
    return lots, owed


@dataclass(frozen=True, slots=True)
class _Offer:
    """A reward as a hold reads it: with its provider, the person's sealed account id at the provider
    (None unless linked) and the units of it the person has pending or fulfilled."""

    reward_id: int
    code: str
    points: int
    stock: int | None
    per_person_limit: int | None
    active_from: datetime | None
    active_until: datetime | None
    provider_id: int
    provider_code: str
    provider_active: bool
    provider_is_provider: bool
    subject_sealed: str | None
    units_taken: int


def _offer(*, reward_code: str, person_id: int) -> _Offer | None:
    """One query: the reward, its provider, the person's link there and their units of it so far."""
    rows, _ = _run(
        f"""SELECT r.id, r.code, r.points, r.stock, r.per_person_limit, r.active_from, r.active_until,
                   p.id, p.code, p.status = %s, p.is_provider,
                   (SELECT m.subject_sealed FROM {Membership._meta.db_table} m
                     WHERE m.institution_id = p.id AND m.person_id = %s AND m.unlinked_at IS NULL LIMIT 1),
                   CASE WHEN r.per_person_limit IS NULL THEN 0 ELSE
                       (SELECT COALESCE(SUM(x.quantity), 0) FROM {Redemption._meta.db_table} x
                         WHERE x.person_id = %s AND x.reward_id = r.id AND x.status IN (%s, %s)) END
              FROM {Reward._meta.db_table} r JOIN {Institution._meta.db_table} p ON p.id = r.provider_id
             WHERE r.code = %s""",  # noqa: S608
        [
            str(Institution.Status.ACTIVE),
            person_id,
            person_id,
            str(RedemptionStatus.PENDING),
            str(RedemptionStatus.FULFILLED),
            reward_code,
        ],
    )
    if not rows:
        return None
    row = list(rows[0])
    for index in (5, 6):  # SQLite hands raw timestamps back naive (in UTC); PostgreSQL aware
        if row[index] is not None and timezone.is_naive(row[index]):
            row[index] = timezone.make_aware(row[index], UTC)
    return _Offer(*row)


@dataclass(frozen=True, slots=True)
class _HoldPlan:
    """What a hold will write, decided under the person's owner lock before anything is written."""

    person_id: int
    offer: _Offer
    quantity: int
    points: int
    taken: list[tuple[_Lot, int]]  # (lot, milligrams), soonest-expiring first
    now: datetime


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
    if _hold_in_database():
        outcome = _hold_call(
            person_id=person.pk, key=None, reward_code=reward_code, quantity=quantity, now=now, today=today
        )
        if outcome.refusal is not None:
            raise outcome.refusal
        outbox_deliver_after_commit()
        return Redemption.objects.get(pk=outcome.redemption_pk)
    owners_lock([person_owner(person.pk)])
    plan = _hold_plan(person_id=person.pk, reward_code=reward_code, quantity=quantity, now=now, today=today)
    redemption_id, _ = _hold_write(plan)
    return Redemption.objects.get(pk=redemption_id)


def _points_gone() -> InsufficientPoints:
    """A lot read by a hold was swept by the expiry job before the hold's transfer (the race both paths
    catch after their writes began: the transaction rolls back, and a retry decides afresh)."""
    return InsufficientPoints("Some of the points lapsed just now; try again.")


def _stock_gone(reward: str) -> OutOfStock:
    """The last unit was taken by a concurrent hold after this one's checks (the other race both paths
    catch at their stock UPDATE, after their writes began: the transaction rolls back)."""
    return OutOfStock(f"{reward!r} ran out just now.", stock=0)


def _quantity_checked(quantity: int) -> None:
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity <= 0:
        raise InvalidReward("The quantity must be a positive integer.")


def _refusal(code: str, reward: str, figures: dict[str, int]) -> RedemptionRefused:
    """A hold's refusal, worded the same whichever path found it (the checks below or the database's)."""
    if code == RewardNotFound.code:
        return RewardNotFound(f"No reward {reward!r}.")
    if code == RewardUnavailable.code:
        return RewardUnavailable(f"The reward {reward!r} is not offered now.")
    if code == OutOfStock.code:
        return OutOfStock(f"Only {figures['stock']} of {reward!r} left.", stock=figures["stock"])
    if code == RedemptionLimitReached.code:
        limit, taken = figures["limit"], figures["taken"]
        return RedemptionLimitReached(
            f"At most {limit} of {reward!r} per person; you have {taken}.", limit=limit, taken=taken
        )
    if code == InsufficientPoints.code:
        points, available = figures["points"], max(figures["available_mg"], 0) // MG_PER_POINT
        return InsufficientPoints(
            f"{points} points are needed; {available} can be spent.", points=points, available_points=available
        )
    raise ValueError(f"unknown refusal {code!r}")


def _hold_plan(
    *, person_id: int, reward_code: str, quantity: int, now: datetime | None = None, today: date | None = None
) -> _HoldPlan:
    """The checks of :func:`redemption_hold`, reading only; the caller holds the person's owner lock and has
    checked the quantity."""
    now = now or timezone.now()
    today = today or standard_today()
    offer = _offer(reward_code=reward_code, person_id=person_id)
    if offer is None:
        raise _refusal(RewardNotFound.code, reward_code, {})
    if not (
        window_open(offer.active_from, offer.active_until, now) and offer.provider_active and offer.provider_is_provider
    ):
        raise _refusal(RewardUnavailable.code, offer.code, {})
    if offer.stock is not None and offer.stock < quantity:
        raise _refusal(OutOfStock.code, offer.code, {"stock": offer.stock})
    if offer.per_person_limit is not None and offer.units_taken + quantity > offer.per_person_limit:
        figures = {"limit": offer.per_person_limit, "taken": offer.units_taken}
        raise _refusal(RedemptionLimitReached.code, offer.code, figures)
    points = offer.points * quantity
    lots, owed = spendable_lots(person_id=person_id, today=today)
    available = sum(lot.balance for lot in lots) - owed
    left = points * MG_PER_POINT
    if left > available:
        raise _refusal(InsufficientPoints.code, offer.code, {"points": points, "available_mg": available})
    taken_from: list[tuple[_Lot, int]] = []
    for lot in lots:
        if not left:
            break
        take = min(lot.balance, left)
        taken_from.append((lot, take))
        left -= take
    return _HoldPlan(person_id, offer, quantity, points, taken_from, now)


def _hold_write(plan: _HoldPlan, *, answer_key: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """The writes of :func:`redemption_hold`, in the caller's transaction; ``(redemption pk, its JSON)``.

    With ``answer_key`` (key, request hash) the key's answer is stored too (a ``201`` without its body,
    which a replay rebuilds from the redemption; see :func:`_replayed`). The redemption,
    its allocations and the answer go in one statement; then the hold accounts and the ledger transfer,
    the webhook, and the stock. Raises :class:`InsufficientPoints` or :class:`OutOfStock` only when a
    concurrent change beat it after the checks (a lot swept by the expiry job, the last unit taken);
    the caller must then roll back what was written.
    """
    offer = plan.offer
    public_id = new_redemption_id()
    hold_expires_at = plan.now + timedelta(hours=settings.HUB_REDEMPTION_HOLD_HOURS)
    milligrams: dict[str, int] = defaultdict(int)
    per_issuer: dict[int, int] = defaultdict(int)
    for lot, take in plan.taken:
        milligrams[lot.issuer_code] += take
        per_issuer[lot.issuer_id] += take
    body = redemption_body(
        public_id=public_id,
        status=RedemptionStatus.PENDING,
        reward=offer.code,
        provider=offer.provider_code,
        quantity=plan.quantity,
        points=plan.points,
        milligrams=milligrams,
        created_at=plan.now,
        hold_expires_at=hold_expires_at,
    )
    redemption_id = _redemption_insert(plan, public_id, hold_expires_at, answer=answer_key)
    holds = _hold_accounts(redemption_id, per_issuer)
    legs = [(lot.account_id, -take) for lot, take in plan.taken]
    legs += [(holds[issuer_id], mg) for issuer_id, mg in sorted(per_issuer.items())]
    try:
        transfers_post(
            transfers=[
                TransferSpec(
                    idempotency_key=f"redemption:{redemption_id}:hold",
                    kind=TransferKind.HOLD,
                    legs=legs,
                    metadata={"redemption": public_id},
                )
            ]
        )
    except InsufficientBalance as exc:  # a lot was swept by the expiry job since it was read
        raise _points_gone() from exc
    outbox_enqueue(
        # The provider's columns read with the offer: all the outbox row needs of it is its id.
        institution=Institution(id=offer.provider_id, code=offer.provider_code, is_provider=True),
        type=REDEMPTION_REQUESTED,
        data=_requested_data(public_id, offer.code, plan.points, plan.quantity),
        subject_sealed=offer.subject_sealed or "",
    )
    # The stock last, so the reward row is locked only until the commit; the UPDATE re-checks it.
    if offer.stock is not None:
        _, updated = _run(
            f"UPDATE {Reward._meta.db_table} SET stock = stock - %s WHERE id = %s AND stock >= %s",  # noqa: S608
            [plan.quantity, offer.reward_id, plan.quantity],
        )
        if updated != 1:
            raise _stock_gone(offer.code)
    return redemption_id, body


def _redemption_insert(
    plan: _HoldPlan, public_id: str, hold_expires_at: datetime, *, answer: tuple[str, str] | None
) -> int:
    """Insert the redemption, its allocations and, given ``answer`` (key, request hash), the key's
    stored answer. Returns the redemption's pk. On PostgreSQL one statement."""
    if connection.vendor != "postgresql":
        redemption = Redemption.objects.create(
            public_id=public_id,
            person_id=plan.person_id,
            reward_id=plan.offer.reward_id,
            provider_id=plan.offer.provider_id,
            quantity=plan.quantity,
            points=plan.points,
            created_at=plan.now,
            hold_expires_at=hold_expires_at,
        )
        RedemptionAllocation.objects.bulk_create(
            RedemptionAllocation(
                redemption=redemption,
                lot_id=lot.account_id,
                issuer_id=lot.issuer_id,
                expires_on=lot.expires_on,
                milligrams=take,
            )
            for lot, take in plan.taken
        )
        if answer is not None:
            key, request_hash = answer
            RedemptionRequest.objects.create(
                person_id=plan.person_id,
                key=key,
                request_hash=request_hash,
                status_code=201,
                response=None,
                redemption=redemption,
                created_at=plan.now,
            )
        return redemption.pk
    lots = [lot for lot, _ in plan.taken]
    params: list[Any] = [
        public_id,
        plan.person_id,
        plan.offer.reward_id,
        plan.offer.provider_id,
        plan.quantity,
        plan.points,
        str(RedemptionStatus.PENDING),
        plan.now,
        hold_expires_at,
        [lot.account_id for lot in lots],
        [lot.issuer_id for lot in lots],
        [lot.expires_on for lot in lots],
        [take for _, take in plan.taken],
    ]
    answered = ""
    if answer is not None:
        key, request_hash = answer
        answered = f""", answered AS (
            INSERT INTO {RedemptionRequest._meta.db_table}
                   (person_id, key, request_hash, status_code, response, redemption_id, created_at)
            SELECT %s, %s, %s, 201, NULL, redemption.id, %s FROM redemption)"""  # noqa: S608
        params += [plan.person_id, key, request_hash, plan.now]
    ((redemption_id,),), _ = _run(
        f"""WITH redemption AS (
                INSERT INTO {Redemption._meta.db_table}
                       (public_id, person_id, reward_id, provider_id, quantity, points, status, created_at,
                        hold_expires_at, resolved_by, voucher, reason)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '', '', '') RETURNING id
            ), allocations AS (
                INSERT INTO {RedemptionAllocation._meta.db_table}
                       (redemption_id, lot_id, issuer_id, expires_on, milligrams)
                SELECT redemption.id, u.lot, u.issuer, u.expires_on, u.mg
                  FROM redemption, unnest(%s::bigint[], %s::bigint[], %s::date[], %s::bigint[])
                       AS u(lot, issuer, expires_on, mg)
            ){answered}
            SELECT id FROM redemption""",  # noqa: S608
        params,
    )
    return int(redemption_id)


def _run(sql: str, params: Sequence[Any]) -> tuple[list[tuple[Any, ...]], int]:
    """Rows and row count of one statement of the hold's hot path: on PostgreSQL with a prepared plan
    (``clearinghouse.db.execute_prepared``: planning these costs more than running them)."""
    if connection.vendor == "postgresql":
        prepared = execute_prepared(sql, params)
        return (prepared.fetchall() if prepared.description else []), prepared.rowcount
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return (cursor.fetchall() if cursor.description else []), cursor.rowcount


def _hold_accounts(redemption_id: int, issuer_ids: Iterable[int]) -> dict[int, int]:
    """``{issuer id: account id}`` of the redemption's ``redemption_hold`` accounts."""
    keys = accounts_ensure(
        keys=[AccountKey.redemption_hold(redemption_id=redemption_id, issuer_id=issuer_id) for issuer_id in issuer_ids]
    )
    return {key.issuer_id: account_id for key, account_id in keys.items()}


def _requested_data(public_id: str, reward: str, points: int, quantity: int) -> dict[str, Any]:
    """The data of ``carbon.redemption.requested`` as stored: ``subject``, the person's subject id at the
    provider if linked, is null here and filled in from the message's sealed copy when it is sent
    (``institutions.outbox.outbox_body``). The database function writes the same keys in this order."""
    return {"redemption_id": public_id, "reward": reward, "points": points, "quantity": quantity, "subject": None}


# --- The hold in the database (PostgreSQL) ---------------------------------------------------------------


class _AnsweredMeanwhile(Exception):
    """The hold's key got its answer (a refusal) while the hold ran; the hold rolled back (CH003)."""


def _hold_in_database() -> bool:
    """Whether holds run as the database function ``settlement_redemption_hold`` (settlement migrations
    0006 and 0007): on PostgreSQL unless ``HUB_REDEMPTION_HOLD_IN_DATABASE`` is off. One statement, with
    the key's answer and the webhook, instead of the portable path's eighteen; the same decisions and
    rows (``tests/settlement/test_hold_engines.py``)."""
    return connection.vendor == "postgresql" and settings.HUB_REDEMPTION_HOLD_IN_DATABASE


@dataclass(frozen=True, slots=True)
class _HoldOutcome:
    """What ``settlement_redemption_hold`` answered (its migrations describe each ``kind``)."""

    kind: str  # in-flight, stored, refused, held
    public_id: str
    quantity: int
    now: datetime
    hold_expires_at: datetime
    refusal: RedemptionRefused | None = None
    request_hash: str = ""
    status: int = 0
    response: Any = None
    redemption_pk: int = 0  # held: the redemption; stored: the answer's, if any
    reward: str = ""
    provider_code: str = ""
    points: int = 0
    milligrams: dict[str, int] | None = None


_HOLD_CALL = (
    "SELECT settlement_redemption_hold(%s::bigint, %s::bigint, %s::bigint, %s::text, %s::text, %s::integer,"
    " %s::timestamptz, %s::date, %s::text, %s::timestamptz, %s::text, %s::text, %s::text, %s::text)"
)


def _hold_call(
    *,
    person_id: int,
    key: str | None,
    reward_code: str,
    quantity: int,
    now: datetime | None,
    request_hash: str = "",
    today: date | None = None,
) -> _HoldOutcome:
    """Call ``settlement_redemption_hold``: one statement that, when it holds, also stores the key's
    answer (given ``key`` and ``request_hash``) and the provider's webhook; in autocommit its own
    transaction, else part of the caller's. Raises :class:`InsufficientPoints` or :class:`OutOfStock`
    when a concurrent change beat the hold after its writes began (the statement's writes roll back;
    so must a caller's transaction, as it will when the exception leaves its ``atomic``)."""
    now = now or timezone.now()
    public_id = new_redemption_id()
    hold_expires_at = now + timedelta(hours=settings.HUB_REDEMPTION_HOLD_HOURS)
    message_id = outbox_message_id()
    params = [
        person_id,
        owner_lock_id(person_owner(person_id)),
        _request_lock_id(person_id, key) if key is not None else None,
        key,
        reward_code,
        quantity,
        now,
        today or standard_today(),
        public_id,
        hold_expires_at,
        request_hash,
        message_id,
        REDEMPTION_REQUESTED,
        outbox_event_head(message_id=message_id, type=REDEMPTION_REQUESTED, time=now),
    ]
    try:
        (returned,) = execute_prepared(_HOLD_CALL, params).fetchone()
    except DatabaseError as exc:
        sqlstate = getattr(exc.__cause__, "sqlstate", None)
        if sqlstate == "CH001":
            raise _points_gone() from exc
        if sqlstate == "CH002":
            raise _stock_gone(reward_code) from exc
        if sqlstate == "CH003":
            raise _AnsweredMeanwhile from exc
        raise
    # Django's connections load json as text (its JSONField parses it).
    answer = json.loads(returned) if isinstance(returned, str) else returned
    base = _HoldOutcome(answer["outcome"], public_id, quantity, now, hold_expires_at)
    if base.kind == "stored":
        return replace(
            base,
            request_hash=answer["request_hash"],
            status=answer["status"],
            response=answer["response"],
            redemption_pk=answer["redemption_id"] or 0,
        )
    if base.kind == "refused":
        figures = {name: value for name, value in answer.items() if name not in ("outcome", "code")}
        return replace(base, refusal=_refusal(answer["code"], reward_code, figures))
    if base.kind == "held":
        return replace(
            base,
            redemption_pk=answer["id"],
            reward=answer["reward"],
            provider_code=answer["provider_code"],
            points=answer["points"],
            milligrams=answer["milligrams"],
        )
    return base  # in-flight


def _held_body(outcome: _HoldOutcome) -> dict[str, Any]:
    """The ``201`` of a hold the function made: the redemption as held."""
    return redemption_body(
        public_id=outcome.public_id,
        status=RedemptionStatus.PENDING,
        reward=outcome.reward,
        provider=outcome.provider_code,
        quantity=outcome.quantity,
        points=outcome.points,
        milligrams=outcome.milligrams or {},
        created_at=outcome.now,
        hold_expires_at=outcome.hold_expires_at,
    )


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a provider's answer (or the clock, or an operator) did to a redemption: the event's outcome.

    ``result``: ``fulfilled``, ``already_fulfilled``, ``rejected``, ``already_rejected``, ``expired``,
    ``voided`` or ``refused`` (nothing changed; ``reason`` says why).
    """

    redemption_id: str
    result: str
    status: str | None = None
    reason: str | None = None

    @property
    def detail(self) -> dict[str, Any]:
        return {
            "redemption_id": self.redemption_id,
            "result": self.result,
            "status": self.status,
            "reason": self.reason,
        }


def _locked(redemption_pk: int, person_id: int) -> Redemption:
    """Lock for a change of state, in the one order every path takes: the person row (``FOR NO KEY
    UPDATE``, as erasure takes it first), the person's owner lock, then the redemption row."""
    Person.objects.select_for_update(no_key=True).filter(pk=person_id).values_list("pk").first()
    owners_lock([person_owner(person_id)])
    # The redemption row alone: a FOR UPDATE over a join would lock the reward row too, and every new
    # hold of that reward (its foreign-key check) would queue behind this capture or void.
    return Redemption.objects.select_for_update().get(pk=redemption_pk)


def _find(*, provider_id: int, redemption_id: str) -> tuple[int, int] | None:
    """(pk, person id) of the provider's redemption ``redemption_id``; None also for another provider's,
    so an institution cannot tell another's redemption ids from unknown ones."""
    return (
        Redemption.objects.filter(public_id=redemption_id, provider_id=provider_id)
        .values_list("pk", "person_id")
        .first()
    )


def _mg_by_issuer(redemption: Redemption) -> dict[int, int]:
    totals: dict[int, int] = defaultdict(int)
    for issuer_id, milligrams in RedemptionAllocation.objects.filter(redemption=redemption).values_list(
        "issuer_id", "milligrams"
    ):
        totals[issuer_id] += milligrams
    return dict(totals)


@transaction.atomic
def redemption_fulfil(
    *,
    provider_id: int,
    redemption_id: str,
    voucher: str = "",
    event_id: str = "",
    received_at: datetime | None = None,
    now: datetime | None = None,
) -> Resolution:
    """The provider fulfilled the redemption (``carbon.redemption.fulfilled``): capture it.

    Moves the held points to ``redeemed(provider, issuer)`` in one transfer ``redemption:<id>:capture``
    and records the gross obligations "issuer owes provider" at the price in force ``now``
    (:func:`obligations_for_redemption`). Never raises for a wrong answer, it reports it:
    ``refused``/``unknown_redemption`` for an id that is not this provider's (the same for another
    provider's, so ids cannot be probed), ``already_fulfilled`` for a repeat (idempotent),
    ``refused``/``redemption_<status>`` after a void. An answer received after the hold's deadline
    (``received_at``, when the hub stored the event, not when a worker got to it) voids the hold as
    ``expired`` instead. Raises :class:`NoPrice` if no settlement price is in force (the event retries).
    """
    now = now or timezone.now()
    received_at = received_at or now
    found = _find(provider_id=provider_id, redemption_id=redemption_id)
    if found is None:
        return Resolution(redemption_id, "refused", reason="unknown_redemption")
    redemption = _locked(*found)
    if redemption.status == RedemptionStatus.FULFILLED:
        return Resolution(redemption_id, "already_fulfilled", redemption.status)
    if redemption.status != RedemptionStatus.PENDING:
        return Resolution(redemption_id, "refused", redemption.status, f"redemption_{redemption.status}")
    if received_at > redemption.hold_expires_at:
        _void(redemption, status=RedemptionStatus.EXPIRED, reason="hold expired", resolved_by="expiry", now=now)
        return Resolution(redemption_id, "refused", redemption.status, "hold_expired")

    mg_by_issuer = _mg_by_issuer(redemption)
    hold_keys = {i: AccountKey.redemption_hold(redemption_id=redemption.pk, issuer_id=i) for i in mg_by_issuer}
    redeemed_keys = {i: AccountKey.redeemed(provider_id=provider_id, issuer_id=i) for i in mg_by_issuer}
    ids = accounts_ensure(keys=[*hold_keys.values(), *redeemed_keys.values()])  # one read for both kinds
    legs: list[tuple[int, int]] = []
    for issuer_id in sorted(mg_by_issuer):
        mg = mg_by_issuer[issuer_id]
        legs += [(ids[hold_keys[issuer_id]], -mg), (ids[redeemed_keys[issuer_id]], mg)]
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"redemption:{redemption.pk}:capture",
                kind=TransferKind.CAPTURE,
                legs=legs,
                metadata={"redemption": redemption.public_id},
            )
        ]
    )
    redemption.status = RedemptionStatus.FULFILLED
    redemption.voucher = voucher
    redemption.resolved_at = now
    redemption.resolved_by = event_id
    redemption.save(update_fields=["status", "voucher", "resolved_at", "resolved_by"])
    obligations_for_redemption(redemption_id=redemption.pk, provider_id=provider_id, mg_by_issuer=mg_by_issuer, at=now)
    return Resolution(redemption_id, "fulfilled", redemption.status)


@transaction.atomic
def redemption_reject(
    *, provider_id: int, redemption_id: str, reason: str, event_id: str = "", now: datetime | None = None
) -> Resolution:
    """The provider rejected the redemption (``carbon.redemption.rejected``): void it, points back to
    the lots they came from. Reports like :func:`redemption_fulfil`: ``rejected``, ``already_rejected``
    for a repeat, ``refused`` for another provider's or an unknown id, or one no longer pending."""
    now = now or timezone.now()
    found = _find(provider_id=provider_id, redemption_id=redemption_id)
    if found is None:
        return Resolution(redemption_id, "refused", reason="unknown_redemption")
    redemption = _locked(*found)
    if redemption.status == RedemptionStatus.REJECTED:
        return Resolution(redemption_id, "already_rejected", redemption.status)
    if redemption.status != RedemptionStatus.PENDING:
        return Resolution(redemption_id, "refused", redemption.status, f"redemption_{redemption.status}")
    _void(redemption, status=RedemptionStatus.REJECTED, reason=reason, resolved_by=event_id, now=now)
    return Resolution(redemption_id, "rejected", redemption.status)


@transaction.atomic
def redemption_void(*, redemption: Redemption, reason: str, by: str, now: datetime | None = None) -> Redemption:
    """An operator voids a pending hold (a provider that never answers, a mistake): points back to their
    lots, stock back. Raises :class:`RedemptionNotPending` if it was fulfilled or voided meanwhile."""
    locked = _locked(redemption.pk, redemption.person_id)
    if locked.status != RedemptionStatus.PENDING:
        raise RedemptionNotPending(f"Redemption {locked.public_id} is {locked.status}; only a pending one is voided.")
    _void(
        locked, status=RedemptionStatus.VOIDED, reason=reason, resolved_by=f"operator:{by}", now=now or timezone.now()
    )
    return locked


def redemptions_expire(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """Void every pending hold whose deadline (``hold_expires_at``) has passed, as ``expired``.

    One short transaction per redemption (the locks of :func:`_locked`, the state re-checked under
    them), so it runs safely beside providers' answers, operators and another run; a hold answered
    meanwhile is left as answered. Returns how many it voided. Idempotent.
    """
    now = now or timezone.now()
    voided = 0
    after = 0
    while True:
        due = list(
            Redemption.objects.filter(status=RedemptionStatus.PENDING, hold_expires_at__lte=now, pk__gt=after)
            .order_by("pk")
            .values_list("pk", "person_id")[:batch_size]
        )
        if not due:
            return voided
        for pk, person_id in due:
            with transaction.atomic():
                redemption = _locked(pk, person_id)
                if redemption.status == RedemptionStatus.PENDING and redemption.hold_expires_at <= now:
                    _void(
                        redemption,
                        status=RedemptionStatus.EXPIRED,
                        reason="hold expired",
                        resolved_by="expiry",
                        now=now,
                    )
                    voided += 1
        after = due[-1][0]


def _void(redemption: Redemption, *, status: str, reason: str, resolved_by: str, now: datetime) -> None:
    """Return a pending redemption's points to exactly the lots they came from, in one transfer
    ``redemption:<id>:void``, and its units to the reward's stock. The caller holds :func:`_locked`'s
    locks and checked the state. Lots keep their expiry: points back in a lapsed lot are swept by the
    next expiry run. If the person erased their account meanwhile, the returned points are forfeited
    with the rest of their wallet (``person_erase`` again, which is idempotent)."""
    allocations = list(
        RedemptionAllocation.objects.filter(redemption=redemption)
        .order_by("lot_id")
        .values_list("lot_id", "issuer_id", "milligrams")
    )
    per_issuer: dict[int, int] = defaultdict(int)
    for _, issuer_id, milligrams in allocations:
        per_issuer[issuer_id] += milligrams
    holds = _hold_accounts(redemption.pk, per_issuer)
    legs = [(holds[issuer_id], -mg) for issuer_id, mg in sorted(per_issuer.items())]
    legs += [(lot_id, milligrams) for lot_id, _, milligrams in allocations]
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"redemption:{redemption.pk}:void",
                kind=TransferKind.VOID,
                legs=legs,
                metadata={"redemption": redemption.public_id, "status": status},
            )
        ]
    )
    Reward.objects.filter(pk=redemption.reward_id, stock__isnull=False).update(stock=F("stock") + redemption.quantity)
    redemption.status = status
    redemption.reason = reason[:256]
    redemption.resolved_at = now
    redemption.resolved_by = resolved_by[:160]
    redemption.save(update_fields=["status", "reason", "resolved_at", "resolved_by"])
    erased = Person.objects.filter(pk=redemption.person_id, erased_at__isnull=False).first()
    if erased is not None:
        person_erase(person=erased)
