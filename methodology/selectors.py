"""Reads of the unified standard."""

from __future__ import annotations

from datetime import date
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
