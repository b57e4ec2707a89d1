"""Settlement's part of a person's rights (``clearinghouse.privacy``): their redemptions in the export; at
erasure, the stored answers to their redemption requests (Idempotency-Keys), which nothing will replay
once the person can make no request. The redemptions themselves stay, pseudonymous, with the books."""

from __future__ import annotations

from typing import Any

from clearinghouse.privacy import eraser, export_section
from settlement.models import RedemptionRequest
from settlement.selectors import redemption_json, redemptions_for_person
from wallets.models import Person


@export_section("redemptions")
def export_redemptions(person_id: int) -> list[dict[str, Any]]:
    """The person's redemptions as ``GET /me/redemptions`` shows them, oldest first."""
    return [redemption_json(r) for r in reversed(list(redemptions_for_person(Person(pk=person_id))))]


@eraser("redemption-requests")
def erase_redemption_requests(person_id: int) -> None:
    RedemptionRequest.objects.filter(person_id=person_id).delete()
