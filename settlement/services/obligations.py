"""Prices and obligations: what a captured redemption makes one institution owe another.

An obligation is gross and immutable, keyed by its ``source`` (``redemption:<id>``, ``carry:cycle-<id>``):
recorded once, never edited; a correction is a new obligation under its own source. Cycles
(:mod:`settlement.services.cycles`) take the unassigned ones at their cut-off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from settlement import netting
from settlement.exceptions import InvalidObligation, NoPrice, ObligationImmutable
from settlement.models import CURRENCY, Obligation, SettlementPrice


def _party(value: Any) -> str:
    return "hub" if value is None else str(value)


def price_in_force(*, at: datetime | None = None, currency: str = CURRENCY) -> SettlementPrice:
    """The latest price with ``valid_from <= at``. Raises :class:`NoPrice` if there is none."""
    at = at or timezone.now()
    price = SettlementPrice.objects.filter(currency=currency, valid_from__lte=at).order_by("-valid_from").first()
    if price is None:
        raise NoPrice(f"No {currency} settlement price is in force at {at.isoformat()}.")
    return price


@dataclass(frozen=True)
class ObligationSpec:
    debtor_id: int | None
    creditor_id: int | None
    amount_minor: int
    points_mg: int = 0


@transaction.atomic
def obligations_record(
    *,
    source: str,
    obligations: Sequence[ObligationSpec | netting.Gross],
    currency: str = CURRENCY,
    price: SettlementPrice | None = None,
    now: datetime | None = None,
) -> list[Obligation]:
    """Store the gross obligations of one ``source`` (e.g. ``redemption:17``); idempotent per source and pair.

    A repeat with the same source returns the stored rows unchanged; if a repeat names a different
    amount for a stored pair it raises :class:`ObligationImmutable` (a correction is a new obligation
    under its own source). Raises :class:`InvalidObligation` for non-positive amounts, a party owing
    itself, or the same pair twice in one call. Obligations are unassigned until the next cut-off.
    """
    now = now or timezone.now()
    if not source or "|" in source or not source.isprintable() or len(source) > 64:
        raise InvalidObligation(f"Source {source!r} must be 1 to 64 printable characters without '|'.")
    rows: list[Obligation] = []
    seen: set[str] = set()
    for spec in obligations:
        debtor = spec.debtor_id if isinstance(spec, ObligationSpec) else spec.debtor
        creditor = spec.creditor_id if isinstance(spec, ObligationSpec) else spec.creditor
        if spec.amount_minor <= 0:
            raise InvalidObligation(f"Amount must be positive, not {spec.amount_minor}.")
        if debtor == creditor:
            raise InvalidObligation(f"{_party(debtor)} cannot owe itself.")
        key = f"{source}:{_party(debtor)}>{_party(creditor)}"
        if key in seen:
            raise InvalidObligation(f"The pair {key} appears twice; sum it first.")
        seen.add(key)
        rows.append(
            Obligation(
                key=key,
                debtor_id=debtor,
                creditor_id=creditor,
                amount_minor=spec.amount_minor,
                currency=currency,
                points_mg=spec.points_mg,
                source=source,
                price=price,
                created_at=now,
            )
        )
    if not rows:
        return []
    Obligation.objects.bulk_create(rows, ignore_conflicts=True)
    stored = {o.key: o for o in Obligation.objects.filter(key__in=seen)}
    for row in rows:
        kept = stored[row.key]
        if (kept.amount_minor, kept.currency, kept.debtor_id, kept.creditor_id) != (
            row.amount_minor,
            row.currency,
            row.debtor_id,
            row.creditor_id,
        ):
            raise ObligationImmutable(
                f"Obligation {row.key} already exists with {kept.amount_minor} {kept.currency}; "
                "record a correction under a new source instead."
            )
    return [stored[row.key] for row in rows]


@transaction.atomic
def obligations_for_redemption(
    *, redemption_id: int, provider_id: int, mg_by_issuer: dict[int, int], at: datetime | None = None
) -> list[Obligation]:
    """The obligations of one captured redemption at the price in force ``at``; idempotent per redemption."""
    price = price_in_force(at=at)
    gross = netting.obligations_for_capture(mg_by_issuer, provider_id, price.fen_per_thousand_points)
    return obligations_record(
        source=f"redemption:{redemption_id}", obligations=gross, currency=price.currency, price=price, now=at
    )
