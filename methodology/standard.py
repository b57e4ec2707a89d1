"""An in-memory snapshot of the registry, and the resolution of one reported act against it.

Normalization runs for every activity (tens of thousands a second), so the registry is read once
per process and revision, not per event: :func:`current_standard` checks the one-row revision
counter per batch and reloads only when an operator changed something.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.conf import settings

from methodology.models import (
    ActionMapping,
    Cap,
    EvidenceTier,
    FactorVersion,
    Scenario,
    StandardRevision,
    UnitConversion,
)

ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Factor:
    id: int
    valid_from: date
    grams_per_unit: Decimal
    label: str
    source: str


@dataclass(frozen=True, slots=True)
class ScenarioInfo:
    id: int
    code: str
    name: str
    unit: str
    active: bool
    # Sorted by valid_from; the one in force is the last with valid_from <= the act's date.
    factors: tuple[Factor, ...]
    valid_froms: tuple[date, ...]
    caps: tuple[tuple[str, Decimal], ...]  # (period, max quantity)

    def factor_on(self, day: date) -> Factor | None:
        index = bisect.bisect_right(self.valid_froms, day) - 1
        return self.factors[index] if index >= 0 else None


@dataclass(frozen=True, slots=True)
class Resolved:
    scenario: ScenarioInfo
    factor: Factor
    quantity: Decimal  # in the scenario's canonical unit
    local_day: date


@dataclass(frozen=True, slots=True)
class Unresolved:
    reason: str  # unknown_action, unit_mismatch, no_factor_in_force, out_of_range
    detail: str


@dataclass
class Standard:
    revision: str
    timezone: ZoneInfo
    scenarios: dict[str, ScenarioInfo] = field(default_factory=dict)
    mappings: dict[tuple[int, str], tuple[str, str, Decimal]] = field(default_factory=dict)
    conversions: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    evidence_weights: dict[str, Decimal] = field(default_factory=dict)

    def convert(self, quantity: Decimal, from_unit: str, to_unit: str) -> Decimal | None:
        if from_unit == to_unit:
            return quantity
        multiplier = self.conversions.get((from_unit, to_unit))
        return None if multiplier is None else quantity * multiplier

    def resolve(
        self, institution_id: int, action: str, quantity: Decimal, unit: str, moment: datetime
    ) -> Resolved | Unresolved:
        """Which scenario, factor and canonical quantity an institution's reported act means."""
        mapping = self.mappings.get((institution_id, action))
        if mapping is not None:
            scenario_code, mapped_unit, multiplier = mapping
            scenario = self.scenarios.get(scenario_code)
        else:
            scenario, mapped_unit, multiplier = self.scenarios.get(action), "", ONE
        if scenario is None or not scenario.active:
            return Unresolved("unknown_action", f"No mapping or scenario for action {action!r}.")
        if mapped_unit and unit == mapped_unit:
            canonical: Decimal | None = quantity * multiplier
        else:
            canonical = self.convert(quantity, unit, scenario.unit)
        if canonical is None:
            return Unresolved("unit_mismatch", f"Cannot convert {unit!r} to {scenario.unit!r} for {scenario.code}.")
        try:
            local_day = moment.astimezone(self.timezone).date()
        except (OverflowError, ValueError):  # within a day of year 1 or 9999 (the intake refuses those now)
            return Unresolved("out_of_range", f"The act's time has no local date in {self.timezone.key}.")
        factor = scenario.factor_on(local_day)
        if factor is None:
            return Unresolved("no_factor_in_force", f"No factor of {scenario.code} is in force on {local_day}.")
        return Resolved(scenario, factor, canonical, local_day)


_lock = threading.Lock()
_cached: Standard | None = None


def current_standard() -> Standard:
    """The registry as of its latest revision (one small query when nothing changed)."""
    global _cached
    revision = StandardRevision.objects.values_list("token", flat=True).first() or ""
    cached = _cached
    if cached is not None and cached.revision == revision:
        return cached
    with _lock:
        _cached = _load(revision)
        return _cached


def _load(revision: str) -> Standard:
    standard = Standard(revision=revision, timezone=ZoneInfo(settings.HUB_STANDARD_TIMEZONE))
    factors: dict[int, list[Factor]] = {}
    for version in FactorVersion.objects.select_related("scenario").order_by("scenario_id", "valid_from"):
        factors.setdefault(version.scenario_id, []).append(
            Factor(version.pk, version.valid_from, version.grams_per_unit, version.label, version.source)
        )
    caps: dict[int, list[tuple[str, Decimal]]] = {}
    for cap in Cap.objects.order_by("scenario_id", "period"):
        caps.setdefault(cap.scenario_id, []).append((cap.period, cap.max_quantity))
    for scenario in Scenario.objects.all():
        versions = tuple(factors.get(scenario.pk, ()))
        standard.scenarios[scenario.code] = ScenarioInfo(
            id=scenario.pk,
            code=scenario.code,
            name=scenario.name,
            unit=scenario.unit,
            active=scenario.active,
            factors=versions,
            valid_froms=tuple(f.valid_from for f in versions),
            caps=tuple(caps.get(scenario.pk, ())),
        )
    for mapping in ActionMapping.objects.filter(active=True).select_related("scenario"):
        standard.mappings[(mapping.institution_id, mapping.action_code)] = (
            mapping.scenario.code,
            mapping.unit,
            mapping.multiplier,
        )
    for conversion in UnitConversion.objects.all():
        standard.conversions[(conversion.from_unit, conversion.to_unit)] = conversion.multiplier
    standard.evidence_weights = {tier.code: tier.weight for tier in EvidenceTier.objects.all()}
    return standard


def period_start(period: str, day: date) -> date:
    if period == Cap.Period.DAY:
        return day
    if period == Cap.Period.MONTH:
        return day.replace(day=1)
    return day.replace(month=1, day=1)
