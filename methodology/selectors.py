"""Reads of the unified standard."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from django.utils import timezone

from methodology.standard import current_standard


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
