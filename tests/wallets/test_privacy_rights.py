"""A person's rights over what the hub holds: export all of it, and erase the account.

Erasure forfeits the balances to ``expired(issuer)`` through the ledger, deletes links, link codes,
the user and its token, and keeps activities and ledger amounts under the bare pseudonym.
"""

from __future__ import annotations

import json
from datetime import date

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from rest_framework.authtoken.models import Token

from clearinghouse import privacy
from institutions import crypto
from institutions.inbox import inbox_drain
from institutions.models import InboxEvent
from ledger.models import Account, Transfer
from ledger.selectors import ledger_check
from ledger.services import AccountKey, accounts_ensure
from methodology.models import NormalizedActivity
from tests.conftest import activity, post_events
from tests.wallets.conftest import (
    PASSWORD,
    auth,
    credit,
    link_event,
    make_person,
    new_code,
    outcome,
    owe,
    unlink_event,
)
from wallets.models import LinkAttempt, LinkCode, Membership, Person
from wallets.services import person_erase

pytestmark = pytest.mark.django_db

MAR, JUN = date(2029, 3, 31), date(2029, 6, 30)


def wallet_lots(person: Person) -> dict[int, int]:
    return dict(Account.objects.filter(kind="wallet_lot", person_id=person.pk).values_list("id", "balance"))


def expired_mg(issuer_id: int) -> int:
    return Account.objects.filter(kind="expired", issuer_id=issuer_id).values_list("balance", flat=True).first() or 0


@pytest.fixture
def mei(client, bank, other_bank, deliver):
    """Mei, linked at Bank A (two metro rides credited to her wallet) and once at Bank B (since unlinked),
    with Bank B points straight from the ledger in two months, a live link code, and a refused attempt."""
    person, token = make_person("mei")
    (linked,) = deliver(bank, link_event(new_code(client, token), subject="mei@a"))
    assert outcome(linked)["linked"] is True
    b_code = new_code(client, token)
    deliver(other_bank, link_event(b_code, subject="mei@b"), unlink_event(subject="mei@b"))
    deliver(other_bank, link_event(b_code, subject="mei@b2"))  # reused: an attempt on her record
    deliver(bank, activity(subject="mei@a", quantity="10"), activity(subject="mei@a", quantity="2.5"))
    credit(person.pk, other_bank.institution.pk, MAR, 30_000)
    credit(person.pk, other_bank.institution.pk, JUN, 12_345)
    new_code(client, token)  # live
    assert ledger_check() == []
    return person, token


# --- Export -------------------------------------------------------------------------------------------


def test_export_holds_everything_about_the_person(client, bank, other_bank, mei):
    person, token = mei

    response = client.get("/api/v1/me/export", headers=auth(token))

    assert response.status_code == 200, response.content
    assert response["Content-Disposition"] == f'attachment; filename="carbon-wallet-{person.pseudonym}.json"'
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["format"] == "carbon-wallet-export/1"
    assert (body["pseudonym"], body["username"], body["erased_at"]) == (person.pseudonym, "mei", None)
    assert body["joined"].startswith(str(person.created_at.year))

    links = body["links"]
    assert [(link["institution"], link["unlinked_at"] is None, link["unlinked_by"]) for link in links] == [
        ("bank-a", True, None),
        ("bank-b", False, "institution"),
    ]
    assert len(body["link_codes"]) == 3
    assert all(set(code) == {"created_at", "expires_at", "used_at", "used_by"} for code in body["link_codes"])
    assert sorted(str(code["used_by"]) for code in body["link_codes"]) == ["None", "bank-a", "bank-b"]
    assert [a["result"] for a in body["link_attempts"]] == ["linked", "linked", "reused"]

    # The wallet as /me/wallet shows it, and the accounts and postings behind it.
    assert body["wallet"] == client.get("/api/v1/me/wallet", headers=auth(token)).json()
    assert body["wallet"]["grams"] == "627.345"  # 468 + 117 g of metro, 42.345 g from Bank B
    wallet_accounts = [a for a in body["accounts"] if a["kind"] == "wallet_lot"]
    assert sum(a["balance_mg"] for a in wallet_accounts) == 627_345
    assert {a["issuer"] for a in wallet_accounts} == {"bank-a", "bank-b"}
    for account in body["accounts"]:
        assert sum(p["amount_mg"] for p in account["postings"]) == account["balance_mg"]
        assert all(set(p) == {"transfer", "kind", "amount_mg", "at"} for p in account["postings"])

    assert len(body["activities"]) == 2
    assert {(a["institution"], a["scenario"], a["quantity"], a["unit"], a["grams"]) for a in body["activities"]} == {
        ("bank-a", "transit.metro", "10", "km", "468.000"),
        ("bank-a", "transit.metro", "2.5", "km", "117.000"),
    }


def test_export_sections_come_from_each_app_in_a_fixed_order(client, mei):
    """The wallets' own sections first, then those methodology and settlement contribute through
    clearinghouse.privacy, as the export always listed them."""
    _, token = mei
    body = client.get("/api/v1/me/export", headers=auth(token)).json()
    assert list(body) == [
        "format",
        "exported_at",
        "pseudonym",
        "username",
        "joined",
        "erased_at",
        "links",
        "link_codes",
        "link_attempts",
        "wallet",
        "accounts",
        "activities",
        "redemptions",
    ]
    assert privacy.registered() == (["activities", "redemptions"], ["redemption-requests"])


def test_export_names_no_subject_and_no_code(client, bank, other_bank, mei):
    _, token = mei
    text = client.get("/api/v1/me/export", headers=auth(token)).content.decode()

    secrets = {"mei@a", "mei@b", "mei@b2"}
    secrets |= set(Membership.objects.values_list("subject_ref", flat=True))
    secrets |= set(Membership.objects.values_list("subject_sealed", flat=True))
    secrets |= set(InboxEvent.objects.values_list("subject_ref", flat=True))
    secrets |= set(InboxEvent.objects.exclude(subject_sealed="").values_list("subject_sealed", flat=True))
    secrets |= set(LinkCode.objects.values_list("code_hash", flat=True))
    secrets |= set(NormalizedActivity.objects.values_list("owner_key", flat=True))
    assert len(secrets) > 6
    for secret in secrets:
        assert secret not in text, secret
    assert "subject" not in text
    assert "code_hash" not in text


def test_export_needs_a_person(client):
    assert client.get("/api/v1/me/export").status_code == 401


# --- Erasure ------------------------------------------------------------------------------------------


def test_erasure_forfeits_the_points_and_keeps_the_history_pseudonymous(client, bank, other_bank, mei):
    person, token = mei
    bank_a, bank_b = bank.institution, other_bank.institution
    owe(person.pk, bank_a.pk, 2_000)  # debts stay where they are
    lots = wallet_lots(person)
    held = sum(lots.values())
    assert held == 627_345
    activities = list(NormalizedActivity.objects.filter(person=person).values_list("pk", flat=True))
    assert len(activities) == 2
    expired_before = {i.pk: expired_mg(i.pk) for i in (bank_a, bank_b)}

    response = client.delete("/api/v1/me", headers=auth(token))

    assert response.status_code == 204, response.content
    # Every lot is empty: its points went to its issuer's expired account, one forfeit per lot.
    assert set(wallet_lots(person).values()) == {0}
    assert expired_mg(bank_a.pk) - expired_before[bank_a.pk] == 585_000
    assert expired_mg(bank_b.pk) - expired_before[bank_b.pk] == 42_345
    forfeits = Transfer.objects.filter(kind="forfeit")
    assert sorted(forfeits.values_list("idempotency_key", flat=True)) == sorted(
        f"forfeit:{person.pk}:{lot}" for lot, balance in lots.items() if balance > 0
    )
    assert Account.objects.get(kind="debt", person_id=person.pk).balance == -2_000
    assert ledger_check() == []

    # The person is a bare pseudonym: no user, no token, no links, no codes.
    erased = Person.objects.get(pk=person.pk)
    assert erased.pseudonym == person.pseudonym
    assert erased.user_id is None and erased.erased_at is not None
    assert not get_user_model().objects.filter(username="mei").exists()
    assert not Token.objects.filter(key=token).exists()
    assert not Membership.objects.filter(person=erased).exists()
    assert not LinkCode.objects.filter(person=erased).exists()
    assert not LinkAttempt.objects.filter(person=erased).exists()
    assert LinkAttempt.objects.count() == 3  # kept for the institutions' failure budgets, detached
    # What was measured stays, under the pseudonym.
    assert list(NormalizedActivity.objects.filter(person=erased).values_list("pk", flat=True)) == activities

    # The old token and password open nothing.
    assert client.get("/api/v1/me/wallet", headers=auth(token)).status_code == 401
    assert client.delete("/api/v1/me", headers=auth(token)).status_code == 401
    signin = client.post(
        "/api/v1/auth/token", {"username": "mei", "password": PASSWORD}, content_type="application/json"
    )
    assert signin.status_code == 401
    # The username is free again, for a new person.
    signup = client.post(
        "/api/v1/auth/signup", {"username": "mei", "password": PASSWORD}, content_type="application/json"
    )
    assert signup.status_code == 201


def test_account_events_keep_no_sealed_subject_once_handled(client, bank, other_bank, deliver, mei):
    """A link event keeps an encrypted copy of the subject id only until it is handled (the membership
    keeps its own); unlink events never keep one. So after erasure nothing in the inbox can name the
    person's accounts at their institutions."""
    person, _ = mei  # linked at Bank A, and linked then unlinked at Bank B
    other, other_token = make_person("lin")
    pending = link_event(new_code(client, other_token), subject="lin@a")
    assert post_events(client, bank, pending).status_code == 202  # stored, not handled yet
    account_events = InboxEvent.objects.filter(type__in=["carbon.account.linked", "carbon.account.unlinked"])
    assert account_events.count() == 5
    waiting = account_events.get(status=InboxEvent.Status.RECEIVED)
    assert crypto.unseal(waiting.subject_sealed) == "lin@a"  # handling it needs the subject
    assert not account_events.exclude(pk=waiting.pk).exclude(subject_sealed="").exists()

    person_erase(person=person)

    assert not account_events.exclude(pk=waiting.pk).exclude(subject_sealed="").exists()
    inbox_drain()  # the waiting link is handled: its copy goes too
    assert Membership.objects.get(person=other).subject_ref == crypto.subject_ref(bank.code, "lin@a")
    assert not account_events.exclude(subject_sealed="").exists()


def test_after_erasure_the_subjects_events_are_held_for_the_subject(client, bank, deliver, mei):
    person, _ = mei
    person_erase(person=person)
    before = sum(wallet_lots(person).values())

    (row,) = deliver(bank, activity(subject="mei@a", quantity="1"))

    assert outcome(row)["points"] == 46
    assert sum(wallet_lots(person).values()) == before == 0
    assert NormalizedActivity.objects.get(inbox_event=row).person_id is None
    held = Account.objects.filter(kind="holding_lot", subject_ref=row.subject_ref).values_list("balance", flat=True)
    assert sum(held) == 46_800
    assert ledger_check() == []


def test_erasure_is_idempotent_and_catches_points_that_arrive_late(bank, other_bank, mei):
    person, _ = mei
    first = person_erase(person=person)
    assert first.forfeited_mg == 627_345 and first.user_deleted
    assert first.links_deleted == 2 and first.link_codes_deleted == 3

    again = person_erase(person=Person.objects.get(pk=person.pk))
    assert (again.forfeited_mg, again.forfeit_transfers, again.links_deleted, again.user_deleted) == (0, 0, 0, False)

    # A credit that was under way when the person erased lands in an emptied lot, and one in a new lot.
    credit(person.pk, other_bank.institution.pk, MAR, 5_000)
    credit(person.pk, other_bank.institution.pk, date(2029, 9, 30), 1_000)
    late = person_erase(person=person)
    assert (late.forfeited_mg, late.forfeit_transfers) == (6_000, 2)
    assert set(wallet_lots(person).values()) == {0}
    refilled = Account.objects.get(
        key=AccountKey.wallet_lot(person_id=person.pk, issuer_id=other_bank.institution.pk, expires_on=MAR).key
    )
    assert Transfer.objects.filter(idempotency_key__startswith=f"forfeit:{person.pk}:{refilled.pk}:after-").count() == 1
    assert ledger_check() == []


def test_erasure_by_session_ends_the_session(client, bank):
    person, _ = make_person("web-mei")
    credit(person.pk, bank.institution.pk, MAR, 1_000)
    client.force_login(person.user)

    assert client.delete("/api/v1/me").status_code == 204

    assert client.get("/api/v1/me/wallet").status_code == 401
    assert "_auth_user_id" not in client.session
    assert Person.objects.get(pk=person.pk).erased_at is not None


def test_a_persons_user_cannot_be_deleted_around_erasure(bank):
    person, _ = make_person("not-like-this")
    assert person.user is not None
    with pytest.raises(IntegrityError), transaction.atomic():
        person.user.delete()


def test_erasure_with_nothing_held(bank):
    person, _ = make_person("empty-handed")
    accounts_ensure(keys=[AccountKey.wallet_lot(person_id=person.pk, issuer_id=bank.institution.pk, expires_on=MAR)])
    erased = person_erase(person=person)
    assert (erased.forfeited_mg, erased.forfeit_transfers, erased.user_deleted) == (0, 0, True)
    assert not Transfer.objects.filter(kind="forfeit").exists()
    assert json.loads(json.dumps(ledger_check(), default=str)) == []
