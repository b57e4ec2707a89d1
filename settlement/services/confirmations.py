"""Confirmations: institutions saying they paid, received or dispute an instruction
(``carbon.settlement.confirmed``), and what that does to the instruction and its cycle."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from settlement.models import Confirmation, ConfirmationStatus, Cycle, CycleState, Instruction, InstructionDirection
from settlement.services.cycles import cycle_advance

logger = logging.getLogger(__name__)


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
        cycle_advance(cycle)
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
