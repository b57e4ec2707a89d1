"""The statement digest: obligations in their public form and the SHA-256 both sides can recompute.

Pure reads, shared by the services (instructions carry the digest) and the selectors (statements list
the lines behind it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
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
