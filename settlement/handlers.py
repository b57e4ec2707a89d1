"""Event types the settlement app owns, registered with the edge's dispatcher.

A refused confirmation (unknown instruction, another institution's instruction, a status that does not
fit the direction, a reconciled cycle) is a *processed* event whose outcome says why, never a dead or
quarantined one: the event was understood, nothing an operator fixes would make it apply, and the
institution reads the reason with ``GET .../events/{id}``. Disputes are flagged on the instruction.

Likewise, a provider's answer that cannot apply (another provider's redemption, an unknown id, a redemption
already voided) is a *processed* event whose outcome says why, never a dead or quarantined one: the
event was understood, and the provider follows it with ``GET .../events/{id}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from institutions.envelope import REDEMPTION_FULFILLED, REDEMPTION_REJECTED, SETTLEMENT_CONFIRMED
from institutions.handlers import Outcome, register
from institutions.models import InboxEvent
from settlement.services import ConfirmationIn, confirmations_record, redemption_fulfil, redemption_reject


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


@register(REDEMPTION_FULFILLED)
def handle_redemption_fulfilled(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    return [
        Outcome.processed(
            redemption_fulfil(
                provider_id=event.institution_id,
                redemption_id=str(event.data["redemption_id"]),
                voucher=str(event.data.get("voucher", "")),
                event_id=event.event_id,
                received_at=event.received_at,
            ).detail
        )
        for event in events
    ]


@register(REDEMPTION_REJECTED)
def handle_redemption_rejected(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    return [
        Outcome.processed(
            redemption_reject(
                provider_id=event.institution_id,
                redemption_id=str(event.data["redemption_id"]),
                reason=str(event.data.get("reason", "")),
                event_id=event.event_id,
            ).detail
        )
        for event in events
    ]
