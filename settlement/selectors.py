"""Settlement reads: statements per institution per cycle (JSON for the API, CSV for the operator)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from django.db.models import Q, QuerySet

from institutions.models import Institution
from settlement.models import Confirmation, Instruction, NetPosition, Obligation
from settlement.services import CARRY_SOURCE_PREFIX, obligation_lines, statement_digest


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
    lines_by_key: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for obligation, line in zip(obligations, obligation_lines(obligations), strict=True):
        assert obligation.cycle_id is not None  # filtered on cycle
        for party in {obligation.debtor_id, obligation.creditor_id} & institution_ids:
            assert party is not None
            lines_by_key[(obligation.cycle_id, party)].append(line)
    instructions = {
        (i.cycle_id, i.institution_id): i
        for i in Instruction.objects.filter(cycle_id__in=cycle_ids, institution_id__in=institution_ids)
    }
    confirmations = Confirmation.objects.filter(instruction__in=[i.pk for i in instructions.values()])
    latest = {c.instruction_id: c for c in confirmations.order_by("id")}  # the last one per instruction wins
    out = []
    for position in positions:
        code = position.institution.code
        lines = lines_by_key[(position.cycle_id, position.institution_id)]
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
