"""Redemptions through the person's API and the settlement services: hold, capture, void, obligations.

Amounts: 1 point = 1 g CO2e = 1,000 mg; the seeded settlement price is 10 fen per 1,000 points.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from institutions import crypto
from institutions.models import OutboxMessage
from institutions.outbox import outbox_body
from ledger.models import Account, Posting, Transfer
from ledger.selectors import ledger_check
from ledger.services import lots_expire
from settlement.exceptions import InsufficientPoints, RedemptionNotPending
from settlement.models import Obligation, Redemption, RedemptionAllocation, RedemptionRequest, Reward
from settlement.services import (
    redemption_fulfil,
    redemption_hold,
    redemption_reject,
    redemption_request,
    redemption_request_hash,
    redemption_void,
    redemptions_expire,
)
from settlement.services.idempotency import refusal_stored
from tests.conftest import make_sender
from tests.settlement.conftest import TODAY, kind_total, lot_balances, make_reward, month_end, redeem
from tests.wallets.conftest import auth, credit, make_person, owe
from wallets.models import Membership
from wallets.services import person_erase

pytestmark = pytest.mark.django_db

M1, M2, M3 = month_end(2), month_end(3), month_end(5)


@pytest.fixture
def wallet(bank, other_bank):
    """A person with 45 points in four lots of two issuers; the soonest lapse first."""
    person, token = make_person("mei")
    a, b = bank.institution.pk, other_bank.institution.pk
    credit(person.pk, a, M2, 10_000)
    credit(person.pk, b, M1, 4_500)  # the soonest
    credit(person.pk, a, M1, 12_500)  # as soon: bank-a's id is lower, so it goes first of the two
    credit(person.pk, b, M3, 18_000)
    return person, token


def test_a_hold_takes_the_soonest_expiring_lots_first_and_records_each(client, provider, bank, other_bank, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    a, b = bank.institution.pk, other_bank.institution.pk

    response = redeem(client, token, "coffee", 1)

    assert response.status_code == 201, response.content
    body = response.json()
    redemption = Redemption.objects.get()
    # 30 g: 12.5 from bank-a (M1), 4.5 from bank-b (M1), then 10 from bank-a (M2), 3 of bank-b's 18 (M3).
    assert body == {
        "id": redemption.public_id,
        "status": "pending",
        "reward": "coffee",
        "provider": "coffee-co",
        "quantity": 1,
        "points": 30,
        "allocations": [
            # Whole points by largest remainder (22.5 and 7.5: the tie goes to the larger share).
            {"institution": "bank-a", "points": 23, "grams": "22.500"},
            {"institution": "bank-b", "points": 7, "grams": "7.500"},
        ],
        "created_at": body["created_at"],
        "hold_expires_at": body["hold_expires_at"],
        "resolved_at": None,
        "voucher": None,
        "reason": None,
    }
    assert body["id"].startswith("rdm_")
    assert redemption.hold_expires_at - redemption.created_at == timedelta(hours=48)
    allocations = list(
        RedemptionAllocation.objects.filter(redemption=redemption)
        .order_by("id")
        .values_list("issuer_id", "expires_on", "milligrams")
    )
    assert allocations == [(a, M1, 12_500), (b, M1, 4_500), (a, M2, 10_000), (b, M3, 3_000)]
    assert lot_balances(person.pk) == {(a, M1): 0, (b, M1): 0, (a, M2): 0, (b, M3): 15_000}
    holds = dict(
        Account.objects.filter(kind="redemption_hold", redemption_id=redemption.pk).values_list("issuer_id", "balance")
    )
    assert holds == {a: 22_500, b: 7_500}
    transfer = Transfer.objects.get(idempotency_key=f"redemption:{redemption.pk}:hold")
    assert transfer.kind == "hold"
    assert ledger_check() == []
    wallet_now = client.get("/api/v1/me/wallet", headers=auth(token)).json()
    assert wallet_now["points"] == 15


def test_not_enough_points_is_409_insufficient_points_and_changes_nothing(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "dinner", points=46)
    before = lot_balances(person.pk)

    response = redeem(client, token, "dinner")

    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/insufficient-points" and problem["code"] == "insufficient-points"
    assert (problem["points"], problem["available_points"]) == (46, 45)
    assert not Redemption.objects.exists() and not OutboxMessage.objects.exists()
    assert lot_balances(person.pk) == before


def test_points_owed_back_cannot_be_spent(client, provider, bank, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=40)
    owe(person.pk, bank.institution.pk, 6_000)  # a reversal of points already spent: 6 g owed back

    response = redeem(client, token, "coffee")

    assert response.status_code == 409 and response.json()["available_points"] == 39
    make_reward(provider, "tea", points=39)
    assert redeem(client, token, "tea").status_code == 201


def test_lapsed_lots_not_yet_swept_are_not_spendable(client, provider, bank):
    person, token = make_person("late")
    lapsed = month_end(-1)
    credit(person.pk, bank.institution.pk, lapsed, 50_000)
    credit(person.pk, bank.institution.pk, M1, 5_000)
    make_reward(provider, "coffee", points=6)
    assert redeem(client, token, "coffee").json()["available_points"] == 5


def test_the_requested_webhook_is_written_with_the_hold(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=30)

    body = redeem(client, token, "coffee", 1).json()

    message = OutboxMessage.objects.get()
    assert (message.institution_id, message.type, message.status) == (
        provider.institution.pk,
        "carbon.redemption.requested",
        "pending",
    )
    event = json.loads(message.body)
    assert event["type"] == "carbon.redemption.requested" and event["specversion"] == "1.0"
    # CONTRACT section 3: subject is null when the person has no account at the provider.
    assert event["data"] == {
        "redemption_id": body["id"],
        "reward": "coffee",
        "points": 30,
        "quantity": 1,
        "subject": None,
    }


def test_the_requested_webhook_names_the_providers_own_account_when_linked(client, provider, wallet):
    person, token = wallet
    Membership.objects.create(
        institution=provider.institution,
        person=person,
        subject_ref=crypto.subject_ref(provider.code, "member-0042"),
        subject_sealed=crypto.seal("member-0042"),
    )
    make_reward(provider, "coffee", points=10)

    redeem(client, token, "coffee", 2)

    message = OutboxMessage.objects.get()
    # At rest the subject id is sealed, not in the body; the body as sent carries it.
    assert json.loads(message.body)["data"]["subject"] is None
    assert "member-0042" not in message.body and crypto.unseal(message.subject_sealed) == "member-0042"
    data = json.loads(outbox_body(message))["data"]
    assert (data["subject"], data["points"], data["quantity"]) == ("member-0042", 20, 2)


# --- Stock, limits and the window ----------------------------------------------------------------------


def test_stock_is_taken_by_holds_and_given_back_by_voids(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "mug", points=5, stock=3)

    assert redeem(client, token, "mug", 2).status_code == 201
    refused = redeem(client, token, "mug", 2)
    assert refused.status_code == 409 and refused.json()["code"] == "out-of-stock"
    assert Reward.objects.get(code="mug").stock == 1
    redemption = Redemption.objects.get()
    redemption_reject(provider_id=provider.institution.pk, redemption_id=redemption.public_id, reason="broken")
    assert Reward.objects.get(code="mug").stock == 3
    assert redeem(client, token, "mug", 3).status_code == 201
    assert Reward.objects.get(code="mug").stock == 0
    assert client.get("/api/v1/rewards").json()[0]["available"] is False


def test_the_per_person_limit_counts_pending_and_fulfilled_units(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "ticket", points=2, per_person_limit=3)
    other, other_token = make_person("lin")
    credit(other.pk, provider.institution.pk, M1, 10_000)

    first = redeem(client, token, "ticket", 2).json()
    redemption_fulfil(provider_id=provider.institution.pk, redemption_id=first["id"])
    assert redeem(client, token, "ticket", 1).status_code == 201
    refused = redeem(client, token, "ticket", 1)
    assert refused.status_code == 409
    assert (refused.json()["code"], refused.json()["limit"], refused.json()["taken"]) == (
        "redemption-limit-reached",
        3,
        3,
    )
    assert redeem(client, other_token, "ticket", 3).status_code == 201  # the limit is per person
    pending = Redemption.objects.filter(person=person, status="pending").get()
    redemption_reject(provider_id=provider.institution.pk, redemption_id=pending.public_id, reason="sold out")
    assert redeem(client, token, "ticket", 1).status_code == 201  # a voided unit no longer counts


def test_a_reward_is_redeemable_only_within_its_window_and_from_an_active_provider(client, provider, wallet):
    _person, token = wallet
    now = timezone.now()
    make_reward(provider, "later", points=1, active_from=now + timedelta(days=1))
    make_reward(provider, "over", points=1, active_from=now - timedelta(days=2), active_until=now - timedelta(days=1))
    make_reward(provider, "now", points=1, active_from=now - timedelta(days=1), active_until=now + timedelta(days=1))

    for code in ("later", "over"):
        response = redeem(client, token, code)
        assert (response.status_code, response.json()["code"]) == (409, "reward-unavailable")
    assert redeem(client, token, "now").status_code == 201
    missing = redeem(client, token, "nothing")
    assert (missing.status_code, missing.json()["code"]) == (404, "reward-not-found")

    provider.institution.status = "suspended"
    provider.institution.save()
    assert redeem(client, token, "now").json()["code"] == "reward-unavailable"


def test_the_catalogue_lists_what_can_be_redeemed(client, provider):
    now = timezone.now()
    make_reward(provider, "coffee", points=30, stock=5, per_person_limit=2)
    make_reward(provider, "later", points=10, active_from=now + timedelta(days=1))
    make_reward(provider, "over", points=1, active_from=now - timedelta(days=2), active_until=now - timedelta(days=1))

    catalogue = client.get("/api/v1/rewards").json()  # public: no token

    assert [(r["code"], r["available"]) for r in catalogue] == [("coffee", True), ("later", False)]
    assert catalogue[0] == {
        "code": "coffee",
        "title": "Coffee",
        "provider": "coffee-co",
        "points": 30,
        "available": True,
        "stock": 5,
        "per_person_limit": 2,
        "active_from": None,
        "active_until": None,
    }


# --- Idempotency-Key -----------------------------------------------------------------------------------


def test_the_same_key_returns_the_first_answer(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)

    first = redeem(client, token, "coffee", 1, key="order-1")
    again = redeem(client, token, "coffee", 1, key="order-1")

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert Redemption.objects.count() == 1
    assert sum(lot_balances(person.pk).values()) == 15_000


def test_the_same_key_after_fulfilment_still_answers_the_hold(client, provider, wallet):
    # A 201 is stored without its body and rebuilt from the redemption: as it was when held.
    _person, token = wallet
    make_reward(provider, "coffee", points=30)
    first = redeem(client, token, "coffee", 1, key="order-5")
    redemption_fulfil(provider_id=provider.institution.pk, redemption_id=first.json()["id"], voucher="V-1")

    again = redeem(client, token, "coffee", 1, key="order-5")

    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and first.json()["status"] == "pending"
    assert RedemptionRequest.objects.get(key="order-5").response is None


def test_a_refusal_yields_to_an_answer_stored_meanwhile(provider, wallet):
    # On the database path a refusal is stored after the hold's statement committed: a request with
    # the same key may have stored its answer in between, and that first answer is the one given.
    person, _token = wallet
    make_reward(provider, "coffee", points=30)
    held = redemption_request(person=person, idempotency_key="order-6", reward_code="coffee", quantity=1)
    digest = redemption_request_hash(reward_code="coffee", quantity=1)

    answer = refusal_stored(
        InsufficientPoints("Not enough points now."),
        person_id=person.pk,
        key="order-6",
        digest=digest,
        now=timezone.now(),
    )

    assert (answer.held, answer.body, answer.replayed) == (True, held.body, True)
    assert RedemptionRequest.objects.filter(person=person).count() == 1


def test_a_refusal_is_the_first_answer_too(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "dinner", points=60)
    first = redeem(client, token, "dinner", key="order-2")
    credit(person.pk, provider.institution.pk, M3, 100_000)  # enough now, but the key already has its answer
    again = redeem(client, token, "dinner", key="order-2")
    assert first.status_code == again.status_code == 409
    assert again.json() == first.json() and again.json()["code"] == "insufficient-points"
    assert redeem(client, token, "dinner", key="order-3").status_code == 201


def test_the_same_key_with_another_body_is_422(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=10)
    assert redeem(client, token, "coffee", 1, key="order-4").status_code == 201

    response = redeem(client, token, "coffee", 2, key="order-4")

    assert response.status_code == 422
    assert response.json()["type"] == "/problems/idempotency-key-reused"
    assert Redemption.objects.count() == 1


def test_keys_are_per_person(client, provider, wallet):
    _person, token = wallet
    other, other_token = make_person("lin")
    credit(other.pk, provider.institution.pk, M1, 50_000)
    make_reward(provider, "coffee", points=10)
    mine = redeem(client, token, "coffee", key="same")
    theirs = redeem(client, other_token, "coffee", key="same")
    assert mine.status_code == theirs.status_code == 201 and mine.json()["id"] != theirs.json()["id"]


def test_the_key_is_required_and_well_formed(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=10)
    missing = client.post(
        "/api/v1/me/redemptions", data={"reward": "coffee"}, content_type="application/json", headers=auth(token)
    )
    assert (missing.status_code, missing.json()["code"]) == (400, "idempotency-key-missing")
    assert redeem(client, token, key="é" * 3).json()["code"] == "idempotency-key-invalid"
    assert redeem(client, token, key="x" * 256).json()["code"] == "idempotency-key-invalid"
    # The structured-field form ("...") names the same key as the bare one.
    assert redeem(client, token, "coffee", 1, key='"abc"').status_code == 201
    assert redeem(client, token, "coffee", 1, key="abc")["Idempotent-Replayed"] == "true"
    assert not RedemptionRequest.objects.filter(key='"abc"').exists()


def test_a_bad_body_is_400_and_uses_no_key(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=10)
    for body in ({"quantity": 1}, {"reward": "coffee", "quantity": 0}, {"reward": "coffee", "quantity": 101}):
        response = client.post(
            "/api/v1/me/redemptions",
            data=body,
            content_type="application/json",
            headers={**auth(token), "Idempotency-Key": "k"},
        )
        assert (response.status_code, response.json()["code"]) == (400, "invalid-request")
    assert not RedemptionRequest.objects.exists()
    assert redeem(client, token, "coffee", None, key="k").status_code == 201  # quantity defaults to 1


def test_only_persons_redeem(client, provider, admin_user):
    make_reward(provider, "coffee")
    assert redeem(client, "not-a-token").status_code == 401
    client.force_login(admin_user)
    response = client.post(
        "/api/v1/me/redemptions",
        data={"reward": "coffee"},
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )
    assert (response.status_code, response.json()["code"]) == (403, "not-a-person")


# --- Capture and obligations -----------------------------------------------------------------------------


def test_fulfilment_captures_to_redeemed_and_records_obligations_by_largest_remainder(client, provider):
    bank_a, bank_b, bank_c = (make_sender(code).institution for code in ("bank-a", "bank-b", "bank-c"))
    person, token = make_person("mei")
    # 1,000 points from three issuers: 333 + 333 + 334 g. At 10 fen per 1,000 points the whole is 10 fen:
    # 3.33 + 3.33 + 3.34 fen, floors 3 + 3 + 3, and the one fen left goes to the largest remainder (bank-c).
    credit(person.pk, bank_a.pk, M1, 333_000)
    credit(person.pk, bank_b.pk, M2, 333_000)
    credit(person.pk, bank_c.pk, M3, 334_000)
    make_reward(provider, "bike", points=1000)
    body = redeem(client, token, "bike").json()
    assert [a["points"] for a in body["allocations"]] == [333, 333, 334]
    redemption = Redemption.objects.get()

    resolution = redemption_fulfil(
        provider_id=provider.institution.pk, redemption_id=body["id"], voucher="BIKE-7781", event_id="ful-1"
    )

    assert resolution.detail == {
        "redemption_id": body["id"],
        "result": "fulfilled",
        "status": "fulfilled",
        "reason": None,
    }
    redemption.refresh_from_db()
    assert (redemption.status, redemption.voucher, redemption.resolved_by) == ("fulfilled", "BIKE-7781", "ful-1")
    assert kind_total("redemption_hold") == 0
    redeemed = dict(
        Account.objects.filter(kind="redeemed", provider_id=provider.institution.pk).values_list("issuer_id", "balance")
    )
    assert redeemed == {bank_a.pk: 333_000, bank_b.pk: 333_000, bank_c.pk: 334_000}
    obligations = list(
        Obligation.objects.filter(source=f"redemption:{redemption.pk}")
        .order_by("debtor_id")
        .values_list("debtor_id", "creditor_id", "amount_minor", "points_mg", "currency")
    )
    p = provider.institution.pk
    assert obligations == [
        (bank_a.pk, p, 3, 333_000, "CNY"),
        (bank_b.pk, p, 3, 333_000, "CNY"),
        (bank_c.pk, p, 4, 334_000, "CNY"),
    ]
    assert sum(o[2] for o in obligations) == 10  # the parts add up to the whole
    prices = Obligation.objects.filter(source=f"redemption:{redemption.pk}").values_list(
        "price__fen_per_thousand_points", flat=True
    )
    assert set(prices) == {10}
    assert ledger_check() == []
    listed = client.get("/api/v1/me/redemptions", headers=auth(token)).json()["results"]
    assert [(r["id"], r["status"], r["voucher"]) for r in listed] == [(body["id"], "fulfilled", "BIKE-7781")]


def test_a_second_fulfilment_changes_nothing(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=30)
    rid = redeem(client, token).json()["id"]
    redemption_fulfil(provider_id=provider.institution.pk, redemption_id=rid, voucher="V1")
    transfers, obligations = Transfer.objects.count(), Obligation.objects.count()

    again = redemption_fulfil(provider_id=provider.institution.pk, redemption_id=rid, voucher="V2")

    assert (again.result, again.status) == ("already_fulfilled", "fulfilled")
    assert (Transfer.objects.count(), Obligation.objects.count()) == (transfers, obligations)
    assert Redemption.objects.get().voucher == "V1"


def test_another_institution_cannot_fulfil_or_reject(client, provider, bank, wallet):
    person, token = wallet
    other_provider = make_sender("tea-co", provider=True)
    make_reward(provider, "coffee", points=30)
    rid = redeem(client, token).json()["id"]
    before = lot_balances(person.pk)

    for institution in (bank.institution, other_provider.institution):
        fulfilled = redemption_fulfil(provider_id=institution.pk, redemption_id=rid)
        rejected = redemption_reject(provider_id=institution.pk, redemption_id=rid, reason="mine now")
        # The same answer as for an id that does not exist: ids cannot be probed.
        assert (
            fulfilled.detail
            == rejected.detail
            == {
                "redemption_id": rid,
                "result": "refused",
                "status": None,
                "reason": "unknown_redemption",
            }
        )
    assert Redemption.objects.get().status == "pending"
    assert lot_balances(person.pk) == before and not Obligation.objects.exists()


# --- Voids: rejected, expired, by an operator ---------------------------------------------------------------


def test_a_rejection_returns_the_points_to_the_very_lots_they_came_from(client, provider, bank, other_bank, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    before = lot_balances(person.pk)
    rid = redeem(client, token).json()["id"]
    redemption = Redemption.objects.get()
    credit(person.pk, bank.institution.pk, M1, 1_000)  # the lots move on meanwhile

    resolution = redemption_reject(
        provider_id=provider.institution.pk, redemption_id=rid, reason="out of beans", event_id="rej-1"
    )

    assert (resolution.result, resolution.status) == ("rejected", "rejected")
    after = lot_balances(person.pk)
    a = bank.institution.pk
    assert after == {**before, (a, M1): before[(a, M1)] + 1_000}  # every lot whole again, expiries unchanged
    assert kind_total("redemption_hold") == 0
    void = Transfer.objects.get(idempotency_key=f"redemption:{redemption.pk}:void")
    returned = sorted(
        Posting.objects.filter(transfer=void, amount__gt=0).values_list(
            "account__issuer_id", "account__expires_on", "amount"
        )
    )
    assert returned == sorted(
        RedemptionAllocation.objects.filter(redemption=redemption).values_list("issuer_id", "expires_on", "milligrams")
    )
    redemption.refresh_from_db()
    assert (redemption.status, redemption.reason, redemption.resolved_by) == ("rejected", "out of beans", "rej-1")
    assert redemption_reject(provider_id=provider.institution.pk, redemption_id=rid, reason="again").result == (
        "already_rejected"
    )
    assert ledger_check() == []


def test_fulfilment_after_a_void_is_refused(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    rid = redeem(client, token).json()["id"]
    redemption_reject(provider_id=provider.institution.pk, redemption_id=rid, reason="no")
    balances = lot_balances(person.pk)

    late = redemption_fulfil(provider_id=provider.institution.pk, redemption_id=rid, voucher="V")

    assert late.detail == {
        "redemption_id": rid,
        "result": "refused",
        "status": "rejected",
        "reason": "redemption_rejected",
    }
    assert lot_balances(person.pk) == balances and not Obligation.objects.exists()
    assert not Account.objects.filter(kind="redeemed").exists()


def test_an_unanswered_hold_voids_itself_after_the_setting(client, provider, wallet, settings):
    person, token = wallet
    settings.HUB_REDEMPTION_HOLD_HOURS = 2
    make_reward(provider, "coffee", points=30, stock=10)
    before = lot_balances(person.pk)
    rid = redeem(client, token).json()["id"]
    redemption = Redemption.objects.get()
    assert redemption.hold_expires_at == redemption.created_at + timedelta(hours=2)

    assert redemptions_expire(now=redemption.hold_expires_at - timedelta(seconds=1)) == 0
    assert redemptions_expire(now=redemption.hold_expires_at) == 1
    assert redemptions_expire(now=redemption.hold_expires_at) == 0  # idempotent

    redemption.refresh_from_db()
    assert (redemption.status, redemption.resolved_by) == ("expired", "expiry")
    assert lot_balances(person.pk) == before
    assert Reward.objects.get().stock == 10
    late = redemption_fulfil(provider_id=provider.institution.pk, redemption_id=rid)
    assert (late.result, late.reason) == ("refused", "redemption_expired")
    assert ledger_check() == []


def test_a_fulfilment_received_after_the_deadline_voids_instead(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    before = lot_balances(person.pk)
    rid = redeem(client, token).json()["id"]
    deadline = Redemption.objects.get().hold_expires_at

    late = redemption_fulfil(
        provider_id=provider.institution.pk, redemption_id=rid, received_at=deadline + timedelta(seconds=1)
    )

    assert (late.result, late.status, late.reason) == ("refused", "expired", "hold_expired")
    assert lot_balances(person.pk) == before


def test_points_returned_to_a_lapsed_lot_are_swept_by_the_next_expiry_run(client, provider, bank):
    person, token = make_person("mei")
    credit(person.pk, bank.institution.pk, M1, 30_000)
    make_reward(provider, "coffee", points=30)
    rid = redeem(client, token).json()["id"]

    redemption_reject(provider_id=provider.institution.pk, redemption_id=rid, reason="late")

    assert lot_balances(person.pk) == {(bank.institution.pk, M1): 30_000}
    assert lots_expire(today=M1 + timedelta(days=1)) == 1
    assert kind_total("expired") == 30_000 and ledger_check() == []


def test_an_operator_voids_a_stuck_hold(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    before = lot_balances(person.pk)
    redeem(client, token)
    redemption = Redemption.objects.get()

    redemption_void(redemption=redemption, reason="provider gone", by="ops")

    redemption.refresh_from_db()
    assert (redemption.status, redemption.resolved_by) == ("voided", "operator:ops")
    assert lot_balances(person.pk) == before
    with pytest.raises(RedemptionNotPending):
        redemption_void(redemption=redemption, reason="again", by="ops")


def test_points_returned_after_erasure_are_forfeited_with_the_wallet(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=30)
    rid = redeem(client, token).json()["id"]
    person_erase(person=person)  # the pending hold stays with the provider
    assert kind_total("wallet_lot", person_id=person.pk) == 0

    redemption_reject(provider_id=provider.institution.pk, redemption_id=rid, reason="no")

    assert kind_total("wallet_lot", person_id=person.pk) == 0
    assert kind_total("expired") == 45_000  # 15 g forfeited at erasure, 30 g when they came back
    assert ledger_check() == []


def test_a_hold_counts_only_lots_live_on_the_schemes_today(provider, bank):
    person, _ = make_person("mei")
    credit(person.pk, bank.institution.pk, M1, 10_000)
    make_reward(provider, "coffee", points=10)
    with pytest.raises(InsufficientPoints):
        redemption_hold(person=person, reward_code="coffee", quantity=1, today=M1 + timedelta(days=1))
    assert redemption_hold(person=person, reward_code="coffee", quantity=1, today=TODAY).points == 10


def test_the_list_is_the_persons_own_newest_first(client, provider, wallet):
    _person, token = wallet
    other, other_token = make_person("lin")
    credit(other.pk, provider.institution.pk, M1, 10_000)
    make_reward(provider, "coffee", points=5)
    ids = [redeem(client, token).json()["id"] for _ in range(3)]
    redeem(client, other_token)

    listed = client.get("/api/v1/me/redemptions", headers=auth(token)).json()

    assert [r["id"] for r in listed["results"]] == ids[::-1]
    assert listed["next"] is None


def test_the_beat_task_voids_holds_past_their_deadline(client, provider, wallet, settings):
    from clearinghouse.celery import app
    from settlement.tasks import redemptions_expire_due

    _person, token = wallet
    settings.HUB_REDEMPTION_HOLD_HOURS = 0  # due as soon as it is made
    make_reward(provider, "coffee", points=30)
    redeem(client, token)
    entry = settings.CELERY_BEAT_SCHEDULE["settlement-redemptions-expire"]
    assert entry["task"] == redemptions_expire_due.name and entry["task"] in app.tasks

    assert redemptions_expire_due.apply().get() == 1
    assert Redemption.objects.get().status == "expired"


def test_the_schema_documents_the_redemption_endpoints(client):
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    create = schema["paths"]["/api/v1/me/redemptions"]["post"]
    assert {(p["name"], p["in"], p["required"]) for p in create["parameters"]} >= {("Idempotency-Key", "header", True)}
    assert {"201", "409", "422"} <= set(create["responses"])
    assert "get" in schema["paths"]["/api/v1/rewards"]
    # The list is documented as what it answers: a cursor page of redemptions.
    listing = schema["paths"]["/api/v1/me/redemptions"]["get"]
    assert "cursor" in {p["name"] for p in listing["parameters"]}
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"next", "previous", "results"} <= set(schema["components"]["schemas"][page]["properties"])


def test_the_export_lists_the_persons_redemptions(client, provider, wallet):
    _person, token = wallet
    make_reward(provider, "coffee", points=5)
    first, second = (redeem(client, token).json() for _ in range(2))

    exported = client.get("/api/v1/me/export", headers=auth(token)).json()

    listed = client.get("/api/v1/me/redemptions", headers=auth(token)).json()["results"]
    assert [r["id"] for r in exported["redemptions"]] == [first["id"], second["id"]]  # oldest first
    assert exported["redemptions"] == listed[::-1]


def test_erasure_deletes_the_answers_kept_for_the_persons_keys_and_keeps_the_redemptions(client, provider, wallet):
    person, token = wallet
    make_reward(provider, "coffee", points=5)
    redeem(client, token, key="k-1")
    assert RedemptionRequest.objects.filter(person=person).count() == 1

    person_erase(person=person)

    assert not RedemptionRequest.objects.filter(person=person).exists()
    assert Redemption.objects.filter(person=person).count() == 1
