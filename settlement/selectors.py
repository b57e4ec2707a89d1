"""Settlement reads: statements per institution per cycle (JSON for the API, CSV for the operator), the
reward catalogue and a person's redemptions, as the API shows them."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from institutions.models import Institution
from ledger.units import MG_PER_POINT, grams_text
from settlement import netting
from settlement.digest import CARRY_SOURCE_PREFIX, party_lines, statement_digest
from settlement.models import (
    Confirmation,
    Cycle,
    Instruction,
    NetPosition,
    Obligation,
    Redemption,
    RedemptionAllocation,
    RedemptionStatus,
    Reward,
)
from wallets.models import Person


def cycle_positions(*, cycle: Cycle) -> list[NetPosition]:
    """The cycle's net positions by institution id, each with its institution loaded."""
    return list(NetPosition.objects.filter(cycle=cycle).select_related("institution").order_by("institution_id"))


def statement_positions(*, institution: Institution) -> QuerySet[NetPosition]:
    """The institution's net positions, one per cycle it took part in: each is one statement."""
    return NetPosition.objects.filter(institution=institution).select_related("cycle", "institution")


def statements(positions: Sequence[NetPosition]) -> list[dict[str, Any]]:
    """The statement behind each net position, in the given order; a fixed number of queries.

    A statement: ``opening_minor`` (carried in from earlier cycles, signed: positive when the hub owes
    the institution), the ``obligations`` it is party to in the cycle (carries included) with their
    totals and digest, ``net_minor`` (= gross in - gross out), the ``instruction`` (or null when the
    net was zero or carried), the latest ``confirmation`` (or null) and ``closing_minor`` (carried
    forward into the next cycle, signed as the net). ``net_minor`` = instructed (signed) + closing.
    """
    if not positions:
        return []
    cycle_ids = {p.cycle_id for p in positions}
    institution_ids = {p.institution_id for p in positions}
    obligations = list(
        Obligation.objects.filter(cycle_id__in=cycle_ids)
        .filter(Q(debtor_id__in=institution_ids) | Q(creditor_id__in=institution_ids))
        .order_by("id")
    )
    lines_by_key = party_lines(obligations)
    instructions = {
        (i.cycle_id, i.institution_id): i
        for i in Instruction.objects.filter(cycle_id__in=cycle_ids, institution_id__in=institution_ids)
    }
    confirmations = Confirmation.objects.filter(instruction__in=[i.pk for i in instructions.values()])
    latest = {c.instruction_id: c for c in confirmations.order_by("id")}  # the last one per instruction wins
    out = []
    for position in positions:
        code = position.institution.code
        lines = lines_by_key.get((position.cycle_id, position.institution_id), [])
        opening = sum(
            (line["amount_minor"] if line["creditor"] == code else -line["amount_minor"])
            for line in lines
            if line["source"].startswith(CARRY_SOURCE_PREFIX)
        )
        instruction = instructions.get((position.cycle_id, position.institution_id))
        confirmation = latest.get(instruction.pk) if instruction is not None else None
        out.append(
            {
                "cycle_id": position.cycle_id,
                "cycle_state": position.cycle.state,
                "cut_off_at": position.cycle.cut_off_at,
                "currency": position.cycle.currency,
                "institution": code,
                "opening_minor": opening,
                "obligations": {
                    "count": len(lines),
                    "gross_in_minor": position.gross_in,
                    "gross_out_minor": position.gross_out,
                    "digest": statement_digest(lines),
                    "lines": lines,
                },
                "net_minor": position.net_minor,
                "instruction": None if instruction is None else _instruction(instruction),
                "confirmation": None if confirmation is None else _confirmation(confirmation),
                "closing_minor": position.carried_forward_minor,
            }
        )
    return out


def _instruction(instruction: Instruction) -> dict[str, Any]:
    return {
        "instruction_id": instruction.instruction_id,
        "direction": instruction.direction,
        "amount_minor": instruction.amount_minor,
        "currency": instruction.currency,
        "value_date": instruction.value_date,
        "statement_digest": instruction.statement_digest,
        "state": instruction.state,
    }


def _confirmation(confirmation: Confirmation) -> dict[str, Any]:
    return {"status": confirmation.status, "reference": confirmation.reference, "received_at": confirmation.received_at}


CSV_COLUMNS = [
    "cycle_id",
    "institution",
    "item",
    "amount_minor",
    "currency",
    "obligation_id",
    "source",
    "debtor",
    "creditor",
    "detail",
]


def _cell(text: Any) -> Any:
    """A text cell a spreadsheet will not run as a formula (sources and references come from outside)."""
    if isinstance(text, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _statement_rows(s: dict[str, Any]) -> Iterator[list[Any]]:
    def row(item: str, amount: int | str = "", detail: str = "", **line: Any) -> list[Any]:
        text = [s["institution"], line.get("source", ""), line.get("debtor", ""), line.get("creditor", ""), detail]
        institution, source, debtor, creditor, detail = (_cell(t) for t in text)
        return [
            s["cycle_id"],
            institution,
            item,
            amount,
            s["currency"],
            line.get("id", ""),
            source,
            debtor,
            creditor,
            detail,
        ]

    yield row("opening", s["opening_minor"])
    for line in s["obligations"]["lines"]:
        party = {"debtor": line["debtor"] or "hub", "creditor": line["creditor"] or "hub"}
        yield row("obligation", line["amount_minor"], id=line["id"], source=line["source"], **party)
    yield row("gross_in", s["obligations"]["gross_in_minor"])
    yield row("gross_out", s["obligations"]["gross_out_minor"])
    yield row("digest", detail=s["obligations"]["digest"])
    yield row("net", s["net_minor"])
    instruction = s["instruction"]
    if instruction is not None:
        signed = -instruction["amount_minor"] if instruction["direction"] == "pay" else instruction["amount_minor"]
        detail = (
            f"{instruction['instruction_id']} {instruction['direction']} "
            f"value {instruction['value_date'].isoformat()} {instruction['state']}"
        )
        yield row("instruction", signed, detail)
    confirmation = s["confirmation"]
    if confirmation is not None:
        detail = f"{confirmation['status']} {confirmation['reference']} {confirmation['received_at'].isoformat()}"
        yield row("confirmation", detail=detail)
    yield row("closing", s["closing_minor"])


def statements_csv(items: Iterable[dict[str, Any]]) -> str:
    """Statements (from :func:`statements`) as one CSV table, one row per item, in statement order.

    Items per statement: ``opening``, one ``obligation`` per line (parties as codes, ``hub`` for the
    hub), ``gross_in``, ``gross_out``, ``digest`` (in ``detail``), ``net``, ``instruction`` (signed:
    negative pays the hub; id, direction, value date and state in ``detail``), ``confirmation`` (status,
    reference and time in ``detail``) when there is one, and ``closing``. Text that a spreadsheet would
    read as a formula is prefixed with ``'``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for statement in items:
        writer.writerows(_statement_rows(statement))
    return buffer.getvalue()


def _time(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with ``Z``, as DRF renders times; stored answers keep this text as is."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- Rewards ------------------------------------------------------------------------------------------


def rewards_catalogue(*, now: datetime | None = None) -> list[Reward]:
    """Rewards offered now or later by active providers (not those whose window closed), by code."""
    now = now or timezone.now()
    return list(
        Reward.objects.select_related("provider")
        .filter(Q(active_until__isnull=True) | Q(active_until__gt=now))
        .filter(provider__is_provider=True, provider__status=Institution.Status.ACTIVE)
        .order_by("code")
    )


def reward_json(reward: Reward, *, now: datetime | None = None) -> dict[str, Any]:
    """One catalogue entry (CONTRACT section 4): ``code``, ``title``, ``provider``, ``points`` per unit,
    and its availability: ``available`` now, ``stock`` (null: unlimited), ``per_person_limit`` (null: none),
    the window ``active_from`` / ``active_until`` (null: open-ended)."""
    now = now or timezone.now()
    provider = reward.provider
    return {
        "code": reward.code,
        "title": reward.title,
        "provider": provider.code,
        "points": reward.points,
        "available": reward.is_open_at(now)
        and provider.is_active
        and provider.is_provider
        and (reward.stock is None or reward.stock > 0),
        "stock": reward.stock,
        "per_person_limit": reward.per_person_limit,
        "active_from": _time(reward.active_from),
        "active_until": _time(reward.active_until),
    }


# --- Redemptions --------------------------------------------------------------------------------------


def redemptions_for_person(person: Person) -> QuerySet[Redemption]:
    """The person's redemptions, newest first, with what :func:`redemption_json` reads loaded."""
    return (
        Redemption.objects.filter(person=person)
        .select_related("reward", "provider")
        .prefetch_related(
            Prefetch("allocations", queryset=RedemptionAllocation.objects.select_related("issuer").order_by("id"))
        )
        .order_by("-created_at", "-id")
    )


def allocation_points(milligrams_by_institution: dict[str, int], points: int) -> list[dict[str, Any]]:
    """Per institution (by code): the whole points it gave, split by largest remainder so they add up
    to ``points`` exactly, and the exact grams (a lot may give part of a point)."""
    codes = sorted(milligrams_by_institution)
    weights = [milligrams_by_institution[code] for code in codes]
    parts = netting.largest_remainder_split(points, weights)
    return [
        {"institution": code, "points": part, "grams": grams_text(mg)}
        for code, part, mg in zip(codes, parts, weights, strict=True)
    ]


def redemption_json(redemption: Redemption, *, as_held: bool = False) -> dict[str, Any]:
    """A redemption as the API shows it (each entry of ``GET /me/redemptions``; see :func:`redemption_body`),
    its allocations read from the prefetch of :func:`redemptions_for_person` when there is one.

    ``as_held``: as it was when held, pending and unresolved, whatever happened since: the ``201`` that
    made it, which its Idempotency-Key replays. Only the status and the resolution ever change."""
    milligrams: dict[str, int] = defaultdict(int)
    allocations = list(redemption.allocations.all())
    missing = {a.issuer_id for a in allocations if not RedemptionAllocation.issuer.is_cached(a)}
    codes = dict(Institution.objects.filter(pk__in=missing).values_list("pk", "code")) if missing else {}
    for allocation in allocations:
        code = codes[allocation.issuer_id] if allocation.issuer_id in codes else allocation.issuer.code  # noqa: SIM401 (.get would load the issuer)
        milligrams[code] += allocation.milligrams
    return redemption_body(
        public_id=redemption.public_id,
        status=RedemptionStatus.PENDING if as_held else redemption.status,
        reward=redemption.reward.code,
        provider=redemption.provider.code,
        quantity=redemption.quantity,
        points=redemption.points,
        milligrams=milligrams,
        created_at=redemption.created_at,
        hold_expires_at=redemption.hold_expires_at,
        resolved_at=None if as_held else redemption.resolved_at,
        voucher="" if as_held else redemption.voucher,
        reason="" if as_held else redemption.reason,
    )


def redemption_body(
    *,
    public_id: str,
    status: str,
    reward: str,
    provider: str,
    quantity: int,
    points: int,
    milligrams: dict[str, int],
    created_at: datetime,
    hold_expires_at: datetime,
    resolved_at: datetime | None = None,
    voucher: str = "",
    reason: str = "",
) -> dict[str, Any]:
    """The JSON of a redemption (the ``201`` of ``POST /me/redemptions``, stored as the key's answer, and
    the entries of ``GET /me/redemptions``): ``id``, ``status``, ``reward`` and ``provider`` codes,
    ``quantity``, ``points``, ``allocations`` per institution (``milligrams`` is per issuer code), the
    times, and once resolved the ``voucher`` or ``reason``."""
    assert sum(milligrams.values()) == points * MG_PER_POINT, "allocations must cover the points"
    return {
        "id": public_id,
        "status": status,
        "reward": reward,
        "provider": provider,
        "quantity": quantity,
        "points": points,
        "allocations": allocation_points(milligrams, points),
        "created_at": _time(created_at),
        "hold_expires_at": _time(hold_expires_at),
        "resolved_at": _time(resolved_at),
        "voucher": voucher or None,
        "reason": reason or None,
    }
