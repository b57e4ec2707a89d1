"""Settlement writes: record obligations, cut cycles, net them, instruct them and record confirmations.

Every service is ``@transaction.atomic``; the states they move a cycle through are described at the top
of ``settlement/models.py``.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from institutions.models import Institution, OutboxMessage
from institutions.outbox import outbox_enqueue, outbox_replay
from settlement import netting
from settlement.exceptions import CycleOrder, IllegalCycleTransition, InvalidObligation, NoPrice, ObligationImmutable
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
    SettlementPrice,
)

logger = logging.getLogger(__name__)

# Which state may follow which. A closed cycle (settled onwards) never takes obligations again; a
# failed cycle may be instructed again (retry) or disputed; a dispute ends settled or failed.
CYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    CycleState.OPEN: frozenset({CycleState.CUT_OFF}),
    CycleState.CUT_OFF: frozenset({CycleState.NETTED}),
    CycleState.NETTED: frozenset({CycleState.INSTRUCTED}),
    CycleState.INSTRUCTED: frozenset({CycleState.SETTLED, CycleState.FAILED, CycleState.DISPUTED}),
    CycleState.SETTLED: frozenset({CycleState.RECONCILED, CycleState.DISPUTED}),
    CycleState.FAILED: frozenset({CycleState.INSTRUCTED, CycleState.DISPUTED}),
    CycleState.DISPUTED: frozenset({CycleState.SETTLED, CycleState.FAILED}),
    CycleState.RECONCILED: frozenset(),
}

_TICK = timedelta(microseconds=1)
# Source of the obligations that carry a net under the minimum into the next cycle.
CARRY_SOURCE_PREFIX = "carry:"


def _party(value: Any) -> str:
    return "hub" if value is None else str(value)


def obligation_lines(obligations: Iterable[Obligation]) -> list[dict[str, Any]]:
    """Obligations in their public form: what a statement lists and what its digest covers.

    Each line is ``{"id", "source", "debtor", "creditor", "amount_minor", "currency"}`` with the parties as
    institution codes and ``None`` for the hub (no institution code can be empty). One query for the codes.
    """
    obligations = list(obligations)
    party_ids = {p for o in obligations for p in (o.debtor_id, o.creditor_id) if p is not None}
    codes = dict(Institution.objects.filter(pk__in=party_ids).values_list("pk", "code"))
    return [
        {
            "id": o.pk,
            "source": o.source,
            "debtor": None if o.debtor_id is None else codes[o.debtor_id],
            "creditor": None if o.creditor_id is None else codes[o.creditor_id],
            "amount_minor": int(o.amount_minor),
            "currency": o.currency,
        }
        for o in obligations
    ]


def obligation_canonical_line(line: Mapping[str, Any]) -> str:
    """One obligation line (see :func:`obligation_lines`) in the digest's canonical form."""
    return "|".join(
        (
            "" if line["id"] is None else str(line["id"]),
            line["source"],
            line["debtor"] or "",
            line["creditor"] or "",
            str(int(line["amount_minor"])),
            line["currency"],
        )
    )


def statement_digest(obligations: Iterable[Obligation | Mapping[str, Any]]) -> str:
    """``"sha256:" + hex`` over the gross obligations behind a figure, independent of their order.

    Canonical form: each obligation becomes the line ``id|source|debtor|creditor|amount_minor|currency``
    (parties as institution codes, empty for the hub; the amount as a base-10 integer; the id empty for
    an obligation not yet stored), the lines are sorted by their UTF-8 bytes, each ends with ``\\n``, and
    SHA-256 runs over the concatenation. No field can hold ``|`` or a line break (codes are
    ``[a-z0-9-]``, sources are refused with them), so the form is unambiguous. An institution holding
    the lines of its statement recomputes the same digest. Takes stored obligations or their lines.
    """
    items = list(obligations)
    models_ = [o for o in items if isinstance(o, Obligation)]
    lines = [o for o in items if not isinstance(o, Obligation)] + obligation_lines(models_)
    encoded = sorted(obligation_canonical_line(line).encode() for line in lines)
    digest = hashlib.sha256()
    for line in encoded:
        digest.update(line + b"\n")
    return "sha256:" + digest.hexdigest()


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


def cycle_obligations(*, cycle: Cycle, institution_id: int | None = None) -> list[Obligation]:
    """The gross obligations of a cycle, optionally only those an institution is party to (for digests)."""
    qs = Obligation.objects.filter(cycle=cycle).order_by("id")
    if institution_id is not None:
        qs = qs.filter(Q(debtor_id=institution_id) | Q(creditor_id=institution_id))
    return list(qs)


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
    lines_by_party: dict[int, list[dict[str, Any]]] = defaultdict(list)
    obligations = cycle_obligations(cycle=cycle)
    for obligation, line in zip(obligations, obligation_lines(obligations), strict=True):
        for party in {obligation.debtor_id, obligation.creditor_id} - {None}:
            assert party is not None
            lines_by_party[party].append(line)
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
            statement_digest=statement_digest(lines_by_party[position.institution_id]),
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
    return state


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


@transaction.atomic
def cycles_fail_undelivered() -> list[int]:
    """Move every ``instructed`` cycle with an instruction whose webhook is dead to ``failed``; their ids.

    The beat watch runs it; safe to run twice (a failed cycle is no longer instructed).
    """
    ids = list(
        Cycle.objects.filter(state=CycleState.INSTRUCTED, instructions__message__status=OutboxMessage.Status.DEAD)
        .values_list("pk", flat=True)
        .distinct()
        .order_by("pk")
    )
    failed: list[int] = []
    for cycle in Cycle.objects.select_for_update().filter(pk__in=ids, state=CycleState.INSTRUCTED).order_by("pk"):
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
