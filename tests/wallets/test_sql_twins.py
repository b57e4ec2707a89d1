"""``wallets_subject_sealed``, for other apps' SQL, reads a person's link as ``subject_sealed_at`` does."""

from __future__ import annotations

import pytest
from django.db import connection
from django.utils import timezone

from institutions import crypto
from tests.conftest import make_sender
from tests.wallets.conftest import make_person
from wallets.models import Membership
from wallets.selectors import subject_sealed_at

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


def test_a_persons_sealed_subject_is_read_in_sql_as_in_python():
    linked, unlinked, other = (make_sender(code).institution for code in ("coffee-co", "tea-co", "bank-a"))
    person, _ = make_person("mei")
    stranger, _ = make_person("ana")
    for institution, ended in ((linked, None), (unlinked, timezone.now())):
        Membership.objects.create(
            institution=institution,
            person=person,
            subject_ref=crypto.subject_ref(institution.code, "member-7"),
            subject_sealed=crypto.seal(f"member-7@{institution.code}"),
            unlinked_at=ended,
        )
    asked = [(person, linked), (person, unlinked), (person, other), (stranger, linked)]
    with connection.cursor() as cursor:
        for who, where in asked:
            cursor.execute("SELECT subject_sealed FROM wallets_subject_sealed(%s, %s)", [who.pk, where.pk])
            row = cursor.fetchone()
            assert (row[0] if row else None) == subject_sealed_at(person_id=who.pk, institution_id=where.pk)
    assert crypto.unseal(subject_sealed_at(person_id=person.pk, institution_id=linked.pk)) == "member-7@coffee-co"  # type: ignore[arg-type]
    assert subject_sealed_at(person_id=person.pk, institution_id=unlinked.pk) is None
