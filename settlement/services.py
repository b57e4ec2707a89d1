"""Settlement writes: record obligations, cut cycles, net them. Every service is ``@transaction.atomic``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from institutions.models import Institution
from settlement import netting
from settlement.exceptions import CycleOrder, IllegalCycleTransition, InvalidObligation, NoPrice, ObligationImmutable
from settlement.models import CURRENCY, Cycle, CycleState, NetPosition, Obligation, SettlementPrice

# Which state may follow which. A closed cycle (settled onwards) never takes obligations again; a
# failed cycle may be instructed again (retry) or disputed; a dispute ends settled or failed.
CYCLE_TRANSITIONS: dict[str, frozenset[str]] = {
    CycleState.OPEN: frozenset({CycleState.CUT_OFF}),
    CycleState.CUT_OFF: frozenset({CycleState.NETTED}),
    CycleState.NETTED: frozenset({CycleState.INSTRUCTED}),
    CycleState.INSTRUCTED: frozenset({CycleState.SETTLED, CycleState.FAILED, CycleState.DISPUTED}),
    CycleState.SETTLED: frozenset({CycleState.RECONCILED, CycleState.DISPUTED}),
    CycleState.FAILED: frozenset({CycleState.INSTRUCTED, CycleState.DISPUTED}),
    CycleState.DISPUTED: frozenset({CycleState.SETTLED, CycleState.FAILED}),
    CycleState.RECONCILED: frozenset(),
}

_TICK = timedelta(microseconds=1)
# Source of the obligations that carry a net under the minimum into the next cycle.
CARRY_SOURCE_PREFIX = "carry:"


def _party(value: Any) -> str:
    return "hub" if value is None else str(value)


def obligation_lines(obligations: Iterable[Obligation]) -> list[dict[str, Any]]:
    """Obligations in their public form: what a statement lists and what its digest covers.

    Each line is ``{"id", "source", "debtor", "creditor", "amount_minor", "currency"}`` with the parties as
    institution codes and ``None`` for the hub (no institution code can be empty). One query for the codes.
    """
    obligations = list(obligations)
    party_ids = {p for o in obligations for p in (o.debtor_id, o.creditor_id) if p is not None}
    codes = dict(Institution.objects.filter(pk__in=party_ids).values_list("pk", "code"))
    return [
        {
            "id": o.pk,
            "source": o.source,
            "debtor": None if o.debtor_id is None else codes[o.debtor_id],
            "creditor": None if o.creditor_id is None else codes[o.creditor_id],
            "amount_minor": int(o.amount_minor),
            "currency": o.currency,
        }
        for o in obligations
    ]


def obligation_canonical_line(line: Mapping[str, Any]) -> str:
    """One obligation line (see :func:`obligation_lines`) in the digest's canonical form."""
    return "|".join(
        (
            "" if line["id"] is None else str(line["id"]),
            line["source"],
            line["debtor"] or "",
            line["creditor"] or "",
            str(int(line["amount_minor"])),
            line["currency"],
        )
    )


def statement_digest(obligations: Iterable[Obligation | Mapping[str, Any]]) -> str:
    """``"sha256:" + hex`` over the gross obligations behind a figure, independent of their order.

    Canonical form: each obligation becomes the line ``id|source|debtor|creditor|amount_minor|currency``
    (parties as institution codes, empty for the hub; the amount as a base-10 integer; the id empty for
    an obligation not yet stored), the lines are sorted by their UTF-8 bytes, each ends with ``\\n``, and
    SHA-256 runs over the concatenation. No field can hold ``|`` or a line break (codes are
    ``[a-z0-9-]``, sources are refused with them), so the form is unambiguous. An institution holding
    the lines of its statement recomputes the same digest. Takes stored obligations or their lines.
    """
    items = list(obligations)
    models_ = [o for o in items if isinstance(o, Obligation)]
    lines = [o for o in items if not isinstance(o, Obligation)] + obligation_lines(models_)
    encoded = sorted(obligation_canonical_line(line).encode() for line in lines)
    digest = hashlib.sha256()
    for line in encoded:
        digest.update(line + b"\n")
    return "sha256:" + digest.hexdigest()


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


@transaction.atomic
def cycle_transition(*, cycle: Cycle, to: str) -> Cycle:
    """Move ``cycle`` to state ``to`` under a row lock. Raises :class:`IllegalCycleTransition` otherwise."""
    locked = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if to not in CYCLE_TRANSITIONS.get(locked.state, frozenset()):
        raise IllegalCycleTransition(
            f"Cycle {locked.pk} cannot go from {locked.state} to {to}.", cycle_id=locked.pk, state=locked.state, to=to
        )
    locked.state = to
    locked.updated_at = timezone.now()
    locked.save(update_fields=["state", "updated_at"])
    cycle.state, cycle.updated_at = locked.state, locked.updated_at
    return locked


@transaction.atomic
def cycle_cut(*, now: datetime | None = None, currency: str = CURRENCY) -> Cycle | None:
    """Close a cycle at ``now``: every unassigned obligation created at or before ``now`` joins it.

    Obligations created later stay unassigned and roll into the next cut. Returns the new cycle, in
    state ``cut_off``, or ``None`` when nothing new is waiting: no empty cycles, and no cycle of
    carry-forwards alone (each would be under the minimum again, so such a cycle could only carry them
    once more; they wait for the next cycle with business in it). A second cut right after the first
    is therefore a no-op, which makes the daily task safe to run twice. Safe against a concurrent cut:
    the assignment is one ``UPDATE ... WHERE cycle_id IS NULL``, so PostgreSQL re-checks each row and an
    obligation lands in exactly one cycle; a cut that finds every row taken meanwhile removes its cycle
    and returns ``None``. Raises :class:`CycleOrder` if ``now`` is not after the previous cut-off
    (cycles never overlap).
    """
    now = now or timezone.now()
    last = Cycle.objects.filter(currency=currency).order_by("-cut_off_at").first()
    if last is not None and now <= last.cut_off_at:
        raise CycleOrder(f"Cut-off {now.isoformat()} is not after the last one, {last.cut_off_at.isoformat()}.")
    waiting = Obligation.objects.filter(cycle__isnull=True, currency=currency, created_at__lte=now)
    if not waiting.exclude(source__startswith=CARRY_SOURCE_PREFIX).exists():
        return None
    cycle = Cycle.objects.create(currency=currency, cut_off_at=now, state=CycleState.OPEN)
    if not waiting.update(cycle=cycle):
        cycle.delete()  # a concurrent cut took them all; nothing refers to this cycle yet
        return None
    return cycle_transition(cycle=cycle, to=CycleState.CUT_OFF)


@transaction.atomic
def cycle_net(*, cycle: Cycle, minimum_minor: int | None = None, now: datetime | None = None) -> list[NetPosition]:
    """Net a cut-off cycle: store one NetPosition per institution and move the cycle to ``netted``.

    Aggregates the cycle's obligations by ``(debtor, creditor)`` in the database, nets them with the hub
    as central counterparty and asserts the positions sum to zero (hub included). A net under
    ``minimum_minor`` (default ``HUB_SETTLEMENT_MIN_MINOR``) is not instructed: it becomes a carry-forward
    obligation between the institution and the hub, unassigned, so the next cut takes it. Raises
    :class:`IllegalCycleTransition` unless the cycle is ``cut_off``, :class:`CycleOrder` if an earlier
    cycle is not netted yet.
    """
    minimum = settings.HUB_SETTLEMENT_MIN_MINOR if minimum_minor is None else minimum_minor
    cycle = Cycle.objects.select_for_update().get(pk=cycle.pk)
    if cycle.state != CycleState.CUT_OFF:
        raise IllegalCycleTransition(f"Cycle {cycle.pk} is {cycle.state}; only a cut-off cycle can be netted.")
    if Cycle.objects.filter(
        currency=cycle.currency, cut_off_at__lt=cycle.cut_off_at, state__in=[CycleState.OPEN, CycleState.CUT_OFF]
    ).exists():
        raise CycleOrder(f"An earlier cycle than {cycle.pk} is not netted yet; net cycles in order.")
    pairs = [
        (row["debtor_id"], row["creditor_id"], row["total"])
        for row in Obligation.objects.filter(cycle=cycle)
        .values("debtor_id", "creditor_id")
        .annotate(total=Sum("amount_minor"))
        .order_by()
    ]
    positions = netting.net_positions(pairs)
    gross_in, gross_out = netting.gross_totals(pairs)
    _, carried = netting.instructions(positions, minimum)
    rows: list[NetPosition] = []
    for institution, net in sorted((k, v) for k, v in positions.items() if k is not netting.HUB):
        assert isinstance(institution, int)  # parties other than HUB are the obligations' institution ids
        rows.append(
            NetPosition(
                cycle=cycle,
                institution_id=institution,
                gross_in=gross_in.get(institution, 0),
                gross_out=gross_out.get(institution, 0),
                net_minor=net,
                carried_forward_minor=carried.get(institution, 0),
            )
        )
    NetPosition.objects.bulk_create(rows)
    carries = [
        ObligationSpec(debtor_id=institution, creditor_id=None, amount_minor=-net)
        if net < 0
        else ObligationSpec(debtor_id=None, creditor_id=institution, amount_minor=net)
        for institution, net in sorted(carried.items())
    ]
    if carries:
        # Created after this cycle's cut-off, so the next cut takes them; never in this (closed) cycle.
        carry_at = max(now or timezone.now(), cycle.cut_off_at + _TICK)
        obligations_record(
            source=f"{CARRY_SOURCE_PREFIX}cycle-{cycle.pk}", obligations=carries, currency=cycle.currency, now=carry_at
        )
    cycle_transition(cycle=cycle, to=CycleState.NETTED)
    return rows


def cycle_obligations(*, cycle: Cycle, institution_id: int | None = None) -> list[Obligation]:
    """The gross obligations of a cycle, optionally only those an institution is party to (for digests)."""
    qs = Obligation.objects.filter(cycle=cycle).order_by("id")
    if institution_id is not None:
        qs = qs.filter(Q(debtor_id=institution_id) | Q(creditor_id=institution_id))
    return list(qs)
