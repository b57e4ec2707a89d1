"""Linking and unlinking accounts through the real signed intake and dispatcher."""

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from institutions import crypto
from institutions.inbox import inbox_drain
from institutions.models import InboxEvent
from tests.conftest import run_together
from tests.wallets.conftest import auth, link_event, make_person, new_code, outcome, unlink_event
from wallets.models import LinkAttempt, LinkCode, Membership
from wallets.services import account_link, link_code_create

pytestmark = pytest.mark.django_db

LINKED = {"linked": True, "reason": "linked"}


def wrong_codes(right: str, count: int) -> list[str]:
    """Well-formed codes other than ``right``."""
    candidates = (letter * 8 for letter in "ZYXWVTSRQ")
    return [c for c in candidates if c != right][:count]


def test_a_person_links_an_account(client, bank, deliver):
    person, token = make_person("alice")
    code = new_code(client, token)
    (row,) = deliver(bank, link_event(code, subject="cust-77"))
    assert outcome(row) == LINKED

    membership = Membership.objects.get()
    assert membership.person == person and membership.institution == bank.institution
    assert membership.is_active
    assert membership.subject_ref == crypto.subject_ref("bank-a", "cust-77") == row.subject_ref
    assert crypto.unseal(membership.subject_sealed) == "cust-77"
    used = LinkCode.objects.get()
    assert used.used_at is not None and used.used_by == bank.institution
    attempt = LinkAttempt.objects.get()
    assert (attempt.result, attempt.person, attempt.event_id) == ("linked", person, row.event_id)
    # The code, live or not, does not stay in clear in the inbox.
    assert row.data == {"link_code": "[redacted]"}

    links = client.get("/api/v1/me/links", headers=auth(token)).json()
    assert links == [{"institution": "bank-a", "name": "Bank A", "linked_at": links[0]["linked_at"]}]


def test_the_institution_follows_the_outcome(client, bank, deliver):
    _, token = make_person("alice")
    code = new_code(client, token)
    (row,) = deliver(bank, link_event(wrong_codes(code, 1)[0]))
    response = client.get(
        f"/api/v1/institutions/bank-a/events/{row.event_id}", headers={"Authorization": f"Bearer {bank.api_token}"}
    )
    assert response.json() == {
        "id": row.event_id,
        "type": "carbon.account.linked",
        "status": "processed",
        "outcome": {"linked": False, "reason": "wrong_code"},
    }


def test_a_code_as_typed_by_a_person_is_accepted(client, bank, deliver):
    _, token = make_person("alice")
    code = new_code(client, token)
    typed = f"{code[:4].lower()}-{code[4:]}"
    (row,) = deliver(bank, link_event(typed))
    assert outcome(row) == LINKED


@pytest.mark.parametrize("code", ["ZZZZZZZZ", "not a code", "ABCDU345"])
def test_a_wrong_code_is_answered_not_dead_lettered(client, bank, deliver, code):
    _, token = make_person("alice")
    real = new_code(client, token)
    (row,) = deliver(bank, link_event(code if code != real else wrong_codes(real, 1)[0]))
    assert outcome(row) == {"linked": False, "reason": "wrong_code"}
    assert not Membership.objects.exists()
    attempt = LinkAttempt.objects.get()
    assert attempt.result == "wrong_code" and attempt.person is None and attempt.institution == bank.institution


def test_an_expired_code_is_refused(client, bank, deliver):
    person, token = make_person("alice")
    code = new_code(client, token)
    LinkCode.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    (row,) = deliver(bank, link_event(code))
    assert outcome(row) == {"linked": False, "reason": "expired"}
    assert not Membership.objects.exists()
    assert LinkAttempt.objects.get().person == person
    assert LinkCode.objects.get().used_at is None


def test_a_used_code_is_refused_elsewhere(client, bank, other_bank, deliver):
    _, token = make_person("alice")
    code = new_code(client, token)
    deliver(bank, link_event(code, subject="cust-1"))
    (at_other_bank,) = deliver(other_bank, link_event(code, subject="o-1"))
    assert outcome(at_other_bank) == {"linked": False, "reason": "reused"}
    (other_subject,) = deliver(bank, link_event(code, subject="cust-2"))
    assert outcome(other_subject) == {"linked": False, "reason": "reused"}
    assert Membership.objects.count() == 1
    assert list(LinkAttempt.objects.order_by("pk").values_list("result", flat=True)) == ["linked", "reused", "reused"]


def test_linking_is_idempotent(client, bank, deliver):
    _, token = make_person("alice")
    code = new_code(client, token)
    (first,) = deliver(bank, link_event(code))
    assert outcome(first) == LINKED

    # The institution resends under a new event id: the same subject, the same (now used) code.
    (resent,) = deliver(bank, link_event(code))
    assert outcome(resent) == {"linked": True, "reason": "already_linked"}

    # The dispatcher hands a row again, as it was before handling (as if its commit had been lost: the
    # handling blanked the link code and the sealed subject id with it).
    assert first.data != {"link_code": code} and first.subject_sealed == ""
    InboxEvent.objects.filter(pk=first.pk).update(
        status=InboxEvent.Status.RECEIVED,
        outcome=None,
        data={"link_code": code},
        subject_sealed=crypto.seal("cust-77"),
        available_at=timezone.now(),
    )
    inbox_drain()
    first.refresh_from_db()
    assert outcome(first) == {"linked": True, "reason": "already_linked"}

    # A fresh code of the same person for the same subject: nothing to do, and the code is spent.
    fresh = new_code(client, token)
    (again,) = deliver(bank, link_event(fresh))
    assert outcome(again) == {"linked": True, "reason": "already_linked"}
    assert Membership.objects.count() == 1
    assert not LinkCode.objects.filter(used_at__isnull=True).exists()


def test_a_subject_is_linked_to_one_person_at_a_time(client, bank, deliver):
    alice, alice_token = make_person("alice")
    bob, bob_token = make_person("bob")
    deliver(bank, link_event(new_code(client, alice_token), subject="cust-77"))

    bob_code = new_code(client, bob_token)
    (taken,) = deliver(bank, link_event(bob_code, subject="cust-77"))
    assert outcome(taken) == {"linked": False, "reason": "subject_taken"}
    assert Membership.objects.get(unlinked_at__isnull=True).person == alice
    assert LinkCode.objects.get(person=bob).used_at is None  # the refused code stays live for bob

    (unlinked,) = deliver(bank, unlink_event(subject="cust-77"))
    assert outcome(unlinked) == {"unlinked": True, "reason": "unlinked"}
    ended = Membership.objects.get(person=alice)
    assert ended.unlinked_at is not None and ended.unlinked_by == "institution"

    (relinked,) = deliver(bank, link_event(bob_code, subject="cust-77"))
    assert outcome(relinked) == LINKED
    assert Membership.objects.get(unlinked_at__isnull=True).person == bob
    assert client.get("/api/v1/me/links", headers=auth(alice_token)).json() == []
    assert [link["institution"] for link in client.get("/api/v1/me/links", headers=auth(bob_token)).json()] == [
        "bank-a"
    ]


def test_a_person_links_one_account_per_institution(client, bank, other_bank, deliver):
    _, token = make_person("alice")
    deliver(bank, link_event(new_code(client, token), subject="cust-1"))
    code = new_code(client, token)
    (second,) = deliver(bank, link_event(code, subject="cust-2"))
    assert outcome(second) == {"linked": False, "reason": "person_has_other_account"}
    (elsewhere,) = deliver(other_bank, link_event(code, subject="o-9"))
    assert outcome(elsewhere) == LINKED
    links = client.get("/api/v1/me/links", headers=auth(token)).json()
    assert [link["institution"] for link in links] == ["bank-a", "bank-b"]


def test_unlinking_an_unlinked_subject_is_answered(bank, deliver):
    (row,) = deliver(bank, unlink_event(subject="never-linked"))
    assert outcome(row) == {"unlinked": False, "reason": "not_linked"}


def test_guessing_is_throttled_per_institution(client, bank, other_bank, deliver, settings):
    settings.HUB_LINK_MAX_FAILURES_PER_HOUR = 3
    person, token = make_person("alice")
    code = new_code(client, token)
    rows = deliver(bank, *[link_event(w, subject=f"guess-{i}") for i, w in enumerate(wrong_codes(code, 3))])
    assert [outcome(r)["reason"] for r in rows] == ["wrong_code"] * 3

    # Over the limit even the right code is refused, unchecked, and the code stays live.
    (right,) = deliver(bank, link_event(code, subject="cust-77"))
    assert outcome(right) == {"linked": False, "reason": "throttled"}
    assert not Membership.objects.exists()
    assert LinkCode.objects.get().used_at is None
    logged = list(
        LinkAttempt.objects.filter(institution=bank.institution).order_by("pk").values_list("result", "person")
    )
    assert logged == [("wrong_code", None)] * 3 + [("throttled", None)]

    # Another institution has its own budget.
    (other,) = deliver(other_bank, link_event(code, subject="o-77"))
    assert outcome(other) == LINKED
    assert Membership.objects.get().person == person

    # An hour after the failures, the institution may try again.
    LinkAttempt.objects.filter(institution=bank.institution).update(created_at=timezone.now() - timedelta(minutes=61))
    (later,) = deliver(bank, link_event(new_code(client, token), subject="cust-77"))
    assert outcome(later) == LINKED


def test_throttling_counts_within_one_batch(client, bank, deliver, settings):
    settings.HUB_LINK_MAX_FAILURES_PER_HOUR = 3
    _, token = make_person("alice")
    code = new_code(client, token)
    rows = deliver(
        bank, *[link_event(w, subject=f"s-{i}") for i, w in enumerate(wrong_codes(code, 5))], link_event(code)
    )
    assert [outcome(r)["reason"] for r in rows] == ["wrong_code"] * 3 + ["throttled"] * 3
    # Throttled attempts are logged but do not extend the penalty.
    assert LinkAttempt.objects.filter(result="throttled").count() == 3
    LinkAttempt.objects.filter(result="wrong_code").update(created_at=timezone.now() - timedelta(minutes=61))
    (retry,) = deliver(bank, link_event(code))
    assert outcome(retry) == LINKED


def test_a_person_unlinks_with_delete(client, bank, deliver):
    person, token = make_person("alice")
    deliver(bank, link_event(new_code(client, token), subject="cust-77"))

    response = client.delete("/api/v1/me/links/bank-a", headers=auth(token))
    assert response.status_code == 204
    membership = Membership.objects.get()
    assert membership.unlinked_at is not None and membership.unlinked_by == "person"
    assert client.get("/api/v1/me/links", headers=auth(token)).json() == []

    again = client.delete("/api/v1/me/links/bank-a", headers=auth(token))
    assert again.status_code == 404
    assert again.json()["code"] == "link-not-found"
    assert client.delete("/api/v1/me/links/no-such-bank", headers=auth(token)).status_code == 404

    # The institution's later unlink finds nothing to do; a new code links the subject again.
    (unlinked,) = deliver(bank, unlink_event(subject="cust-77"))
    assert outcome(unlinked) == {"unlinked": False, "reason": "not_linked"}
    (relinked,) = deliver(bank, link_event(new_code(client, token), subject="cust-77"))
    assert outcome(relinked) == LINKED
    assert Membership.objects.filter(person=person).count() == 2


def test_a_person_cannot_unlink_someone_elses_account(client, bank, deliver):
    _, alice_token = make_person("alice")
    _, bob_token = make_person("bob")
    deliver(bank, link_event(new_code(client, alice_token)))
    assert client.delete("/api/v1/me/links/bank-a", headers=auth(bob_token)).status_code == 404
    assert Membership.objects.get().is_active


def test_link_then_unlink_in_one_batch_apply_in_order(client, bank, deliver):
    _, token = make_person("alice")
    rows = deliver(bank, link_event(new_code(client, token), subject="c-1"), unlink_event(subject="c-1"))
    assert [outcome(r)["reason"] for r in rows] == ["linked", "unlinked"]
    assert not Membership.objects.filter(unlinked_at__isnull=True).exists()


def _concurrently(count: int, work: Any) -> list[Any]:
    """``work(i)`` in ``count`` threads released at once; fails on any thread's error."""
    results, errors = run_together(count, work)
    assert not errors, errors
    return results


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_one_code_links_once_under_concurrent_workers(bank):
    person, _ = make_person("alice")
    code = link_code_create(person=person).code

    def link(index: int) -> str:
        subject = f"c-{index}"
        decision = account_link(
            institution=bank.institution,
            subject_ref=crypto.subject_ref(bank.code, subject),
            subject_sealed=crypto.seal(subject),
            link_code=code,
        )
        return str(decision.result)

    assert sorted(_concurrently(4, link)) == ["linked", "reused", "reused", "reused"]
    assert Membership.objects.get().person == person
    assert LinkAttempt.objects.count() == 4


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_the_failure_budget_holds_under_concurrent_workers(bank, settings):
    settings.HUB_LINK_MAX_FAILURES_PER_HOUR = 3

    def guess(index: int) -> str:
        subject = f"g-{index}"
        decision = account_link(
            institution=bank.institution,
            subject_ref=crypto.subject_ref(bank.code, subject),
            subject_sealed=crypto.seal(subject),
            link_code="ZZZZZZZZ",
        )
        return str(decision.result)

    assert sorted(_concurrently(8, guess)) == ["throttled"] * 5 + ["wrong_code"] * 3
