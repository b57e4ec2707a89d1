"""Pure settlement arithmetic: no database, no Django, integers only.

Parties are any hashable, sortable ids (institution ids in the services). ``HUB`` (``None``) stands for
the hub itself as central counterparty: it appears only in carry-forward obligations (an amount under
the settlement minimum that one institution owes the hub, or the hub owes it, until a later cycle).

Money is integer minor units (fen); points are the ledger's unit, integer milligrams CO2e
(1 point = 1,000 mg), so a price in fen per 1,000 points is fen per 1,000,000 mg.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

HUB: None = None
MG_PER_THOUSAND_POINTS = 1_000_000


@dataclass(frozen=True, slots=True)
class Gross:
    """One gross obligation: ``debtor`` owes ``creditor`` ``amount_minor``, for ``points_mg`` of points."""

    debtor: Any
    creditor: Any
    amount_minor: int
    points_mg: int = 0


@dataclass(frozen=True, slots=True)
class Instruction:
    """A net debtor pays the hub (``pay``) or the hub pays a net creditor (``receive``)."""

    institution: Any
    direction: Literal["pay", "receive"]
    amount_minor: int


class NettingError(AssertionError):
    """The books do not balance: net positions that should sum to zero do not. Never expected."""


def _triples(obligations: Iterable[Any]) -> Iterable[tuple[Any, Any, int]]:
    for o in obligations:
        if isinstance(o, tuple):
            yield o[0], o[1], o[2]
        else:
            yield o.debtor, o.creditor, o.amount_minor


def net_positions(obligations: Iterable[Any]) -> dict[Hashable, int]:
    """Net position per party: what is owed to it minus what it owes.

    ``obligations`` are ``(debtor, creditor, amount_minor)`` tuples or objects with those attributes
    (aggregated rows work too: several obligations between the same pair may be summed first).
    Parties that appear only with zero net are kept (with 0). Raises :class:`NettingError` if the
    positions do not sum to zero (impossible for integer input; the assertion guards later edits).
    """
    positions: dict[Hashable, int] = defaultdict(int)
    for debtor, creditor, amount in _triples(obligations):
        if amount < 0:
            raise ValueError(f"negative obligation {amount} from {debtor} to {creditor}")
        positions[debtor] -= amount
        positions[creditor] += amount
    if sum(positions.values()) != 0:
        raise NettingError(f"net positions sum to {sum(positions.values())}, not zero")
    return dict(positions)


def gross_totals(obligations: Iterable[Any]) -> tuple[dict[Hashable, int], dict[Hashable, int]]:
    """``(gross_in, gross_out)`` per party: the total owed to it, and the total it owes."""
    gross_in: dict[Hashable, int] = defaultdict(int)
    gross_out: dict[Hashable, int] = defaultdict(int)
    for debtor, creditor, amount in _triples(obligations):
        gross_out[debtor] += amount
        gross_in[creditor] += amount
    return dict(gross_in), dict(gross_out)


def round_half_even_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half to even, in integers (``numerator >= 0``, ``denominator > 0``)."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def largest_remainder_split(total_minor: int, weights: Sequence[int]) -> list[int]:
    """Split ``total_minor`` in proportion to ``weights``; the parts sum exactly to ``total_minor``.

    Each part first gets the floor of its exact share ``total * w / sum(w)``; the units left over go one
    each to the parts with the largest remainders. Ties between equal remainders go to the larger
    weight, then to the earlier position in ``weights``, so the result depends only on the input order
    (callers pass parties sorted by id). Zero weights get zero. Raises ``ValueError`` for negative
    input, or a positive total with no positive weight.
    """
    if total_minor < 0 or any(w < 0 for w in weights):
        raise ValueError("total and weights must be non-negative")
    whole = sum(weights)
    if whole == 0:
        if total_minor:
            raise ValueError("cannot split a positive total over zero weights")
        return [0] * len(weights)
    parts: list[int] = []
    remainders: list[tuple[int, int, int]] = []
    for index, weight in enumerate(weights):
        part, remainder = divmod(total_minor * weight, whole)
        parts.append(part)
        remainders.append((-remainder, -weight, index))
    left = total_minor - sum(parts)
    for _, _, index in sorted(remainders)[:left]:
        parts[index] += 1
    return parts


def obligations_for_capture(mg_by_issuer: Mapping[Any, int], provider: Any, price: int) -> list[Gross]:
    """The gross obligations of one captured redemption: each issuer owes the provider for its points.

    ``mg_by_issuer``: milligrams CO2e taken from each issuer's lots; ``price``: fen per 1,000 points.
    The total is ``round_half_even(total_mg * price / 1,000,000)`` fen, split over issuers by largest
    remainder in proportion to their milligrams (issuers in ascending id order), so the parts add up
    to exactly the total. An issuer whose share rounds to 0 fen gets no obligation; an issuer that is
    the provider itself owes nothing (its share is not billed, so the total shrinks by it).
    """
    if price < 0:
        raise ValueError("price must be non-negative")
    issuers = sorted(i for i, mg in mg_by_issuer.items() if mg > 0)
    weights = [mg_by_issuer[i] for i in issuers]
    total = round_half_even_div(sum(weights) * price, MG_PER_THOUSAND_POINTS)
    parts = largest_remainder_split(total, weights)
    return [
        Gross(debtor=issuer, creditor=provider, amount_minor=amount, points_mg=mg)
        for issuer, mg, amount in zip(issuers, weights, parts, strict=True)
        if amount > 0 and issuer != provider
    ]


def instructions(positions: Mapping[Any, int], minimum_minor: int) -> tuple[list[Instruction], dict[Any, int]]:
    """Payment instructions through the hub, and what rolls forward instead.

    Each institution with ``|net| >= minimum_minor`` gets exactly one instruction: a net debtor pays
    the hub its net, the hub pays a net creditor its net. Non-zero nets under the minimum are returned
    in ``carried`` (signed, as the net) to be carried into the next cycle. The hub's own position
    (key ``HUB``) is never instructed. Instructions are ordered by institution id.
    """
    out: list[Instruction] = []
    carried: dict[Any, int] = {}
    for institution in sorted(k for k in positions if k is not HUB):
        net = positions[institution]
        if net == 0:
            continue
        if abs(net) < minimum_minor:
            carried[institution] = net
        elif net < 0:
            out.append(Instruction(institution, "pay", -net))
        else:
            out.append(Instruction(institution, "receive", net))
    return out, carried
