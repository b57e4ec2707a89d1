"""Event types the settlement app owns, registered with the edge's dispatcher.

A refused confirmation (unknown instruction, another institution's instruction, a status that does not
fit the direction, a reconciled cycle) is a *processed* event whose outcome says why, never a dead or
quarantined one: the event was understood, nothing an operator fixes would make it apply, and the
institution reads the reason with ``GET .../events/{id}``. Disputes are flagged on the instruction.
"""

from __future__ import annotations

from collections.abc import Sequence

from institutions.envelope import SETTLEMENT_CONFIRMED
from institutions.handlers import Outcome, register
from institutions.models import InboxEvent
from settlement.services import ConfirmationIn, confirmations_record


@register(SETTLEMENT_CONFIRMED)
def handle_settlement_confirmed(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    outcomes = confirmations_record(
        confirmations=[
            ConfirmationIn(
                inbox_event_id=event.pk,
                institution_id=event.institution_id,
                instruction_id=str(event.data["instruction_id"]),
                status=str(event.data["status"]),
                reference=str(event.data["reference"]),
            )
            for event in events
        ]
    )
    return [Outcome.processed(detail) for detail in outcomes]
