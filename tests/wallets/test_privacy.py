"""Subject ids never rest in clear: not in any column of any table, not in the admin. Sealed copies
follow key rotation."""

import uuid
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from institutions import crypto
from institutions.outbox import outbox_enqueue
from tests.conftest import activity
from tests.wallets.conftest import PASSWORD, link_event, make_person, new_code, outcome, unlink_event
from wallets.models import LinkCode, Membership
from wallets.services import account_link, link_code_create

pytestmark = pytest.mark.django_db


def rows_containing(needle: str) -> list[tuple[str, str]]:
    """Every (table, column) of the database holding ``needle`` anywhere in its text form."""
    quote = connection.ops.quote_name
    hits = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            for column in connection.introspection.get_table_description(cursor, table):
                cursor.execute(
                    f"SELECT COUNT(*) FROM {quote(table)} "  # noqa: S608 (names from the catalogue, value bound)
                    f"WHERE LOWER(CAST({quote(column.name)} AS TEXT)) LIKE %s",
                    [f"%{needle.lower()}%"],
                )
                if cursor.fetchone()[0]:
                    hits.append((table, column.name))
    return hits


def test_no_table_holds_a_subject_id_or_a_link_code_in_clear(client, bank, other_bank, deliver):
    subjects = {name: f"{name}-{uuid.uuid4().hex[:10]}" for name in ("linked", "taken", "unlinked", "guessed")}
    _, alice = make_person("privacy-alice")
    _, bob = make_person("privacy-bob")
    codes = [new_code(client, alice), new_code(client, bob), new_code(client, alice)]

    # Every path a subject id takes: linked, refused, unlinked, a wrong code, activities, two institutions.
    deliver(bank, link_event(codes[0], subject=subjects["linked"]))
    deliver(bank, link_event(codes[1], subject=subjects["linked"]))  # subject_taken: bob's code stays live
    deliver(other_bank, link_event(codes[2], subject=subjects["unlinked"]), unlink_event(subject=subjects["unlinked"]))
    deliver(bank, link_event("ZZZZZZZZ", subject=subjects["guessed"]))
    deliver(bank, activity(subject=subjects["linked"]), activity(subject=subjects["taken"]))
    assert Membership.objects.count() == 2

    tables = set(connection.introspection.table_names())
    assert {"wallets_membership", "wallets_linkcode", "wallets_linkattempt", "institutions_inboxevent"} <= tables
    # The scan does find what is there: the usernames.
    assert ("auth_user", "username") in rows_containing("privacy-alice")

    for subject in subjects.values():
        assert rows_containing(subject) == [], subject
    for code in codes:
        assert rows_containing(code) == [], code


def test_the_admin_never_shows_a_subject_or_a_code(client, bank, deliver):
    _, token = make_person("alice")
    code = new_code(client, token)
    subject = f"admin-{uuid.uuid4().hex[:10]}"
    (row,) = deliver(bank, link_event(code, subject=subject))
    assert outcome(row)["linked"] is True
    new_code(client, token)  # a live one too
    membership = Membership.objects.get()
    secrets_shown = [
        subject,
        membership.subject_ref,
        membership.subject_sealed,
        code,
        *LinkCode.objects.values_list("code_hash", flat=True),
    ]

    operator = get_user_model().objects.create_superuser("root", password=PASSWORD)
    client.force_login(operator)
    pages = [
        "/admin/wallets/person/",
        f"/admin/wallets/person/{membership.person_id}/change/",
        "/admin/wallets/membership/",
        f"/admin/wallets/membership/{membership.pk}/change/",
        "/admin/wallets/linkcode/",
        f"/admin/wallets/linkcode/{LinkCode.objects.earliest('pk').pk}/change/",
        "/admin/wallets/linkattempt/",
        "/admin/wallets/linkattempt/?result__exact=linked",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        for secret in secrets_shown:
            assert secret not in html, (page, secret)
    assert "bank-a" in client.get("/admin/wallets/membership/").content.decode()


def test_the_admin_unlinks_through_the_service(client, bank, deliver):
    _, token = make_person("alice")
    deliver(bank, link_event(new_code(client, token)))
    membership = Membership.objects.get()
    client.force_login(get_user_model().objects.create_superuser("root", password=PASSWORD))
    response = client.post(
        "/admin/wallets/membership/", {"action": "end_links", "_selected_action": [membership.pk]}, follow=True
    )
    assert response.status_code == 200
    membership.refresh_from_db()
    assert membership.unlinked_at is not None and membership.unlinked_by == "operator"


def _link_directly(bank, username: str, subject: str) -> Membership:
    person, _ = make_person(username)
    decision = account_link(
        institution=bank.institution,
        subject_ref=crypto.subject_ref(bank.code, subject),
        subject_sealed=crypto.seal(subject),
        link_code=link_code_create(person=person).code,
    )
    assert decision.membership is not None
    return decision.membership


def test_subjects_reseal_moves_every_sealed_subject_to_the_newest_key(bank, settings):
    subjects = {"cust-1", "cust-2", "cust-3"}
    for index, subject in enumerate(sorted(subjects)):
        _link_directly(bank, f"user{index}", subject)
    # A webhook waiting to be sent keeps its person's subject id sealed too.
    message = outbox_enqueue(
        institution=bank.institution, type="carbon.redemption.requested", data={}, subject_sealed=crypto.seal("cust-1")
    )
    old_keys = list(settings.HUB_ENCRYPTION_KEYS)
    new_key = Fernet.generate_key().decode()
    settings.HUB_ENCRYPTION_KEYS = [new_key, *old_keys]

    out = StringIO()
    call_command("subjects_reseal", "--batch-size", "2", stdout=out)
    assert out.getvalue().splitlines()[:3] == ["resealed 2 of 4", "resealed 3 of 4", "resealed 4 of 4"]

    settings.HUB_ENCRYPTION_KEYS = [new_key]  # the old key retired
    sealed = Membership.objects.values_list("subject_sealed", flat=True)
    assert {crypto.unseal(value) for value in sealed} == subjects
    message.refresh_from_db()
    assert crypto.unseal(message.subject_sealed) == "cust-1"


def test_subjects_reseal_names_a_row_no_key_opens(bank):
    membership = _link_directly(bank, "alice", "cust-1")
    Membership.objects.filter(pk=membership.pk).update(
        subject_sealed=Fernet(Fernet.generate_key()).encrypt(b"cust-1").decode()
    )
    with pytest.raises(CommandError, match=f"Membership {membership.pk}"):
        call_command("subjects_reseal", stdout=StringIO())
