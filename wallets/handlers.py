"""Event types the wallets app owns, registered with the edge's dispatcher.

A refused link (wrong, expired or reused code, subject or person already linked, throttled) is a
*processed* event whose outcome says why, never a dead or quarantined one: the event was understood,
and the institution follows it with ``GET .../events/{id}`` to tell its customer.
"""

from __future__ import annotations

from collections.abc import Sequence

from institutions.envelope import ACCOUNT_LINKED, ACCOUNT_UNLINKED
from institutions.handlers import Outcome, register
from institutions.inbox import inbox_events_redact
from institutions.models import InboxEvent, Institution
from wallets.services import account_link, account_unlink

# What stays of a link event's data once handled: the code itself must not outlive its use in clear
# (only its hash is stored; a refused code may still be live for its person).
REDACTED_LINK_DATA = {"link_code": "[redacted]"}


def _institutions(events: Sequence[InboxEvent]) -> dict[int, Institution]:
    return Institution.objects.in_bulk({event.institution_id for event in events})


@register(ACCOUNT_LINKED)
def handle_account_linked(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    institutions = _institutions(events)
    outcomes = []
    for event in events:
        decision = account_link(
            institution=institutions[event.institution_id],
            subject_ref=event.subject_ref,
            subject_sealed=event.subject_sealed,
            link_code=str(event.data.get("link_code", "")),
            event_id=event.event_id,
        )
        outcomes.append(Outcome.processed({"linked": decision.linked, "reason": str(decision.result)}))
    # Handled: the link code is spent and the subject id lives on in the membership (sealed there), so
    # the event keeps neither. Nothing else of the hub can name the subject from the inbox afterwards,
    # whatever happens to the person later (erasure has nothing to find here).
    inbox_events_redact(ids=[event.pk for event in events], data=REDACTED_LINK_DATA)
    return outcomes


@register(ACCOUNT_UNLINKED)
def handle_account_unlinked(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    institutions = _institutions(events)
    outcomes = []
    for event in events:
        ended = account_unlink(institution=institutions[event.institution_id], subject_ref=event.subject_ref)
        outcomes.append(
            Outcome.processed({"unlinked": ended is not None, "reason": "unlinked" if ended else "not_linked"})
        )
    return outcomes
