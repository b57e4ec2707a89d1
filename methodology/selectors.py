"""Reads of the unified standard and of measured activities."""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from ledger.units import MG_PER_POINT
from methodology.models import NormalizedActivity
from methodology.standard import current_standard

GRAMS_PLACES = Decimal("0.001")


def published_standard(*, on: date | None = None) -> list[dict[str, Any]]:
    """Every active scenario with the factor in force ``on`` (default: today in the standard's zone)."""
    standard = current_standard()
    day = on or timezone.now().astimezone(standard.timezone).date()
    scenarios = []
    for code in sorted(standard.scenarios):
        info = standard.scenarios[code]
        if not info.active:
            continue
        factor = info.factor_on(day)
        scenarios.append(
            {
                "code": info.code,
                "name": info.name,
                "unit": info.unit,
                "factor": None
                if factor is None
                else {
                    "version": factor.label,
                    "grams_per_unit": format(factor.grams_per_unit.normalize(), "f"),
                    "valid_from": factor.valid_from.isoformat(),
                    "source": factor.source,
                },
                "caps": [{"period": period, "max_quantity": format(q.normalize(), "f")} for period, q in info.caps],
            }
        )
    return scenarios


# --- Measured activities ----------------------------------------------------------------------------


def activities_for_person(*, person_id: int) -> QuerySet[NormalizedActivity]:
    """The person's measured activities, newest first (the ``activity_person_recent`` index), with the
    institution and scenario joined in."""
    return (
        NormalizedActivity.objects.filter(person_id=person_id)
        .select_related("institution", "scenario")
        .order_by("-occurred_at", "-id")
    )


def activity_grams(activity: NormalizedActivity) -> str:
    """Measured grams with three places, rounded as the event's outcome shows them."""
    return str(activity.grams.quantize(GRAMS_PLACES, ROUND_HALF_EVEN))


def activities_export(*, person_id: int) -> list[dict[str, Any]]:
    """The person's activities as their export shows them, newest first."""
    activities = (
        activities_for_person(person_id=person_id).select_related("factor_version__scenario").iterator(chunk_size=2000)
    )
    return [
        {
            "institution": a.institution.code,
            "scenario": a.scenario.code,
            "time": a.occurred_at,
            "quantity": format(a.quantity.normalize(), "f"),
            "unit": a.scenario.unit,
            "grams": activity_grams(a),
            "points": a.credited_mg // MG_PER_POINT,
            "credited_mg": a.credited_mg,
            "factor_version": a.factor_version.label,
            "evidence": a.evidence,
            "status": a.status,
            "reason": a.reason or None,
            "recorded_at": a.created_at,
        }
        for a in activities
    ]
