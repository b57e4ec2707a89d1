"""Reads of the wallets app."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connection
from django.db.models import Q

from clearinghouse.db import array_literal, text_array_literal
from wallets.models import Membership, Person


def person_for_user(user: Any) -> Person | None:
    """The person behind an authenticated user, or None (anonymous users, operators)."""
    if user is None or not user.is_authenticated:
        return None
    return Person.objects.filter(user_id=user.pk).first()


def links_for_person(person: Person) -> list[Membership]:
    """The person's active links, oldest first, with their institutions loaded."""
    return list(
        Membership.objects.filter(person=person, unlinked_at__isnull=True)
        .select_related("institution")
        .order_by("linked_at", "pk")
    )


def persons_for_subjects(pairs: Iterable[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """``{(institution id, subject ref): person id}`` for the subjects currently linked."""
    wanted = set(pairs)
    if not wanted:
        return {}
    if connection.vendor == "postgresql":
        # One join against the pairs as arrays: cheaper than an OR of a thousand conditions.
        institution_ids, refs = (list(column) for column in zip(*wanted, strict=True))
        with connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT m.institution_id, m.subject_ref, m.person_id
                      FROM {Membership._meta.db_table} m
                      JOIN unnest(%s::bigint[], %s::text[]) AS q(i, r)
                        ON m.institution_id = q.i AND m.subject_ref = q.r
                     WHERE m.unlinked_at IS NULL""",  # noqa: S608
                [array_literal(institution_ids), text_array_literal(refs)],
            )
            return {(i, r): p for i, r, p in cursor.fetchall()}
    by_institution: dict[int, list[str]] = {}
    for institution_id, ref in wanted:
        by_institution.setdefault(institution_id, []).append(ref)
    condition = Q()
    for institution_id, refs in by_institution.items():
        condition |= Q(institution_id=institution_id, subject_ref__in=refs)
    rows = Membership.objects.filter(condition, unlinked_at__isnull=True).values_list(
        "institution_id", "subject_ref", "person_id"
    )
    return {(institution_id, ref): person_id for institution_id, ref, person_id in rows}
