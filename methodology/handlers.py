"""Event types the methodology app owns, registered with the edge's dispatcher."""

from __future__ import annotations

from collections.abc import Sequence

from institutions.envelope import ACTIVITY_RECORDED, ACTIVITY_REVERSED
from institutions.handlers import Outcome, register
from institutions.models import InboxEvent
from methodology.services import activities_normalize, activities_reverse


@register(ACTIVITY_RECORDED)
def handle_activity_recorded(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    return activities_normalize(events=events)


@register(ACTIVITY_REVERSED)
def handle_activity_reversed(events: Sequence[InboxEvent]) -> Sequence[Outcome]:
    return activities_reverse(events=events)
