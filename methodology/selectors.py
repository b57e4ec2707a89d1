"""Reads of the unified standard and of measured activities."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
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


@dataclass(frozen=True, slots=True)
class FactorHistoryEntry:
    """One version of a scenario's factor: in force from ``valid_from`` through ``valid_to`` (the day
    before the next version; None while no later version exists)."""

    label: str
    grams_per_unit: Decimal
    valid_from: date
    valid_to: date | None
    source: str
    in_force: bool
    upcoming: bool


@dataclass(frozen=True, slots=True)
class ScenarioHistory:
    code: str
    name: str
    unit: str
    current: FactorHistoryEntry | None
    versions: tuple[FactorHistoryEntry, ...]  # newest first


def standard_history(*, on: date | None = None) -> list[ScenarioHistory]:
    """Every active scenario, by code, with the factor in force ``on`` (default: today in the standard's
    zone) and every version of its factor, newest first, upcoming ones included. Reads the cached
    registry (:func:`current_standard`): one small query when nothing changed."""
    standard = current_standard()
    day = on or timezone.now().astimezone(standard.timezone).date()
    scenarios = []
    for code in sorted(standard.scenarios):
        info = standard.scenarios[code]
        if not info.active:
            continue
        in_force = info.factor_on(day)
        entries = []
        for index, factor in enumerate(info.factors):
            following = info.factors[index + 1] if index + 1 < len(info.factors) else None
            entries.append(
                FactorHistoryEntry(
                    label=factor.label,
                    grams_per_unit=factor.grams_per_unit,
                    valid_from=factor.valid_from,
                    valid_to=following.valid_from - timedelta(days=1) if following else None,
                    source=factor.source,
                    in_force=in_force is not None and factor.id == in_force.id,
                    upcoming=factor.valid_from > day,
                )
            )
        current = next((entry for entry in entries if entry.in_force), None)
        scenarios.append(ScenarioHistory(info.code, info.name, info.unit, current, tuple(reversed(entries))))
    return scenarios
