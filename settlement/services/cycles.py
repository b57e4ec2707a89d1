"""Settlement cycles: cut, net, instruct, run, and the states confirmations and deliveries move them to.

A cycle takes every unassigned obligation created up to its cut-off (:func:`cycle_cut`), nets them
with the hub as central counterparty (:func:`cycle_net`), writes one instruction per institution with
its signed webhook (:func:`cycle_instruct`), and then moves as its instructions are confirmed
(:func:`cycle_advance`). The states and their rules are described at the top of ``settlement/models.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from institutions.models import Institution, OutboxMessage
from institutions.outbox import outbox_enqueue, outbox_replay
from settlement import netting
from settlement.digest import CARRY_SOURCE_PREFIX, party_lines, statement_digest
from settlement.exceptions import CycleOrder, IllegalCycleTransition
from settlement.models import (
    CURRENCY,
    Cycle,
    CycleState,
    Instruction,
    InstructionDirection,
    InstructionState,
    NetPosition,
    Obligation,
)
from settlement.services.obligations import ObligationSpec, obligations_record
from settlement.webhooks import INSTRUCTION_TYPE, instruction_webhook_data

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
    cycle_advance(cycle)
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


def cycle_advance(cycle: Cycle) -> Cycle:
    """Move a cycle (locked by the caller) to where its instructions' states put it, step by allowed step."""
    instructions = list(Instruction.objects.filter(cycle=cycle).values_list("direction", "state"))
    goal = _cycle_goal(cycle.state, instructions)
    for step in [] if goal == cycle.state else _cycle_path(cycle.state, goal):
        cycle_transition(cycle=cycle, to=step)
    return cycle


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
    cycle_advance(cycle)
    return count
