"""A provider answers redemptions with signed events, through the real intake and dispatcher."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from institutions.models import OutboxMessage
from ledger.models import Account
from ledger.selectors import ledger_check
from settlement.models import Obligation, Redemption
from tests.conftest import activity, make_sender
from tests.settlement.conftest import make_reward, outcome, redeem
from tests.wallets.conftest import auth, link_event, make_person, new_code

pytestmark = pytest.mark.django_db


def answer(kind: str, redemption_id: str, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{uuid.uuid4().hex[:10]}",
        "source": "/coffee-co/shop",
        "type": f"carbon.redemption.{kind}",
        "data": {"redemption_id": redemption_id, **data},
    }


def test_points_earned_at_a_bank_buy_a_coffee_the_provider_fulfils(client, bank, deliver):
    coffee = make_sender("coffee-co", provider=True)
    _person, token = make_person("mei")
    code = new_code(client, token)
    # The bank links its customer and reports four 25 km metro rides: 4 x 25 x 46.8 g = 4,680 points.
    deliver(bank, link_event(code, subject="cust-1"))
    deliver(bank, *(activity(subject="cust-1", quantity="25") for _ in range(4)))
    assert client.get("/api/v1/me/wallet", headers=auth(token)).json()["points"] == 4_680
    make_reward(coffee, "latte", points=1_000)

    created = redeem(client, token, "latte", 1)

    assert created.status_code == 201, created.content
    rid = created.json()["id"]
    requested = json.loads(OutboxMessage.objects.get(institution=coffee.institution).body)
    assert requested["data"] == {
        "redemption_id": rid,
        "reward": "latte",
        "points": 1_000,
        "quantity": 1,
        "subject": None,
    }

    # The bank is no provider of it: its "fulfilment" is understood, and refused.
    (forged,) = deliver(bank, answer("fulfilled", rid, voucher="FREE"))
    assert outcome(forged) == {
        "redemption_id": rid,
        "result": "refused",
        "status": None,
        "reason": "unknown_redemption",
    }
    assert Redemption.objects.get().status == "pending"

    (fulfilled,) = deliver(coffee, answer("fulfilled", rid, voucher="LATTE-2291"))
    assert outcome(fulfilled) == {"redemption_id": rid, "result": "fulfilled", "status": "fulfilled", "reason": None}
    # Sent again (a new event id, the same answer): nothing more happens.
    (again,) = deliver(coffee, answer("fulfilled", rid, voucher="LATTE-2291"))
    assert outcome(again)["result"] == "already_fulfilled"

    redemption = Redemption.objects.get()
    assert (redemption.status, redemption.voucher, redemption.resolved_by) == (
        "fulfilled",
        "LATTE-2291",
        fulfilled.event_id,
    )
    redeemed = Account.objects.get(kind="redeemed", provider_id=coffee.institution.pk)
    assert (redeemed.issuer_id, redeemed.balance) == (bank.institution.pk, 1_000_000)
    # 1,000 points at the seeded 10 fen per 1,000 points: the bank owes the coffee shop 10 fen.
    (obligation,) = Obligation.objects.filter(source=f"redemption:{redemption.pk}")
    assert (obligation.debtor_id, obligation.creditor_id, obligation.amount_minor) == (
        bank.institution.pk,
        coffee.institution.pk,
        10,
    )
    assert client.get("/api/v1/me/wallet", headers=auth(token)).json()["points"] == 3_680
    listed = client.get("/api/v1/me/redemptions", headers=auth(token)).json()["results"]
    assert [(r["status"], r["voucher"]) for r in listed] == [("fulfilled", "LATTE-2291")]
    status = client.get(
        f"/api/v1/institutions/coffee-co/events/{fulfilled.event_id}",
        headers={"Authorization": f"Bearer {coffee.api_token}"},
    ).json()
    assert status["status"] == "processed" and status["outcome"]["result"] == "fulfilled"
    assert ledger_check() == []


def test_a_rejected_redemption_returns_its_points_and_a_late_fulfilment_is_refused(client, bank, deliver):
    coffee = make_sender("coffee-co", provider=True)
    _person, token = make_person("mei")
    code = new_code(client, token)
    deliver(bank, link_event(code, subject="cust-1"))
    deliver(bank, activity(subject="cust-1", quantity="10"))  # 468 points
    make_reward(coffee, "cake", points=400, stock=2)
    rid = redeem(client, token, "cake").json()["id"]
    assert client.get("/api/v1/me/wallet", headers=auth(token)).json()["points"] == 68

    # The bank cannot reject the coffee shop's redemption either.
    (forged,) = deliver(bank, answer("rejected", rid, reason="no"))
    assert outcome(forged)["reason"] == "unknown_redemption"
    (rejected,) = deliver(coffee, answer("rejected", rid, reason="out of cake"))

    assert outcome(rejected) == {"redemption_id": rid, "result": "rejected", "status": "rejected", "reason": None}
    assert client.get("/api/v1/me/wallet", headers=auth(token)).json()["points"] == 468
    redemption = Redemption.objects.get()
    assert (redemption.status, redemption.reason) == ("rejected", "out of cake")
    (late,) = deliver(coffee, answer("fulfilled", rid, voucher="CAKE-1"))
    assert outcome(late) == {
        "redemption_id": rid,
        "result": "refused",
        "status": "rejected",
        "reason": "redemption_rejected",
    }
    assert Redemption.objects.get().status == "rejected" and not Obligation.objects.exists()
    assert not Account.objects.filter(kind="redeemed").exists()
    (unknown,) = deliver(coffee, answer("fulfilled", "rdm_nope"))
    assert outcome(unknown)["reason"] == "unknown_redemption"
    assert ledger_check() == []
