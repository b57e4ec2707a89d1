"""Methodology's part of a person's rights (``clearinghouse.privacy``): their measured activities in the
export. Erasure leaves activities in place, pseudonymous under the person row, as the ledger's amounts."""

from __future__ import annotations

from typing import Any

from clearinghouse.privacy import export_section
from methodology.selectors import activities_export


@export_section("activities")
def export_activities(person_id: int) -> list[dict[str, Any]]:
    return activities_export(person_id=person_id)
