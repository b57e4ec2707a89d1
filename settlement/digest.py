"""The statement digest: obligations in their public form and the SHA-256 both sides can recompute.

Pure reads, shared by the services (instructions carry the digest) and the selectors (statements list
the lines behind it).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from institutions.models import Institution
from settlement.models import Obligation

# Source of the obligations that carry a net under the minimum into the next cycle.
CARRY_SOURCE_PREFIX = "carry:"


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


def party_lines(obligations: Sequence[Obligation]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Each obligation's line (:func:`obligation_lines`) under ``(cycle id, institution id)`` of each
    institution party to it (the hub is no party here): the lines behind a statement or instruction."""
    by_party: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for obligation, line in zip(obligations, obligation_lines(obligations), strict=True):
        assert obligation.cycle_id is not None, "only obligations in a cycle have statements"
        for party in {obligation.debtor_id, obligation.creditor_id} - {None}:
            by_party[(obligation.cycle_id, int(party))].append(line)  # type: ignore[arg-type]
    return by_party


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


def statement_digest(lines: Iterable[Mapping[str, Any]]) -> str:
    """``"sha256:" + hex`` over the gross obligations behind a figure, independent of their order.

    Canonical form: each obligation becomes the line ``id|source|debtor|creditor|amount_minor|currency``
    (parties as institution codes, empty for the hub; the amount as a base-10 integer; the id empty for
    an obligation not yet stored), the lines are sorted by their UTF-8 bytes, each ends with ``\\n``, and
    SHA-256 runs over the concatenation. No field can hold ``|`` or a line break (codes are
    ``[a-z0-9-]``, sources are refused with them), so the form is unambiguous. An institution holding
    the lines of its statement recomputes the same digest. Takes the lines of :func:`obligation_lines`.
    """
    encoded = sorted(obligation_canonical_line(line).encode() for line in lines)
    digest = hashlib.sha256()
    for line in encoded:
        digest.update(line + b"\n")
    return "sha256:" + digest.hexdigest()
