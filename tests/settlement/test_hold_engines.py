"""The two ways a hold runs give the same results.

On PostgreSQL a hold is one call of the database function ``settlement_redemption_hold``
(settlement/sql), which posts through the ledger's ``ledger_post`` and writes its webhook through the
edge's ``institutions_outbox_enqueue``; SQLite, and PostgreSQL with ``HUB_REDEMPTION_HOLD_IN_DATABASE``
off, run the same steps from Python (settlement.services.hold_portable). Here one story of requests
runs through each, on the same data, and everything they wrote or answered must match: answers,
redemptions, allocations, ledger accounts and their keys, balances, transfers and postings, stored
answers, webhooks (byte for byte but their ids and times) and stock. Ids the database hands out and
random public ids are replaced by their order of appearance.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from institutions import crypto
from institutions.models import Institution, OutboxMessage
from institutions.outbox import outbox_body
from ledger.models import Account, Posting, Transfer
from ledger.selectors import ledger_check
from settlement.exceptions import IdempotencyKeyReused, InvalidReward, RedemptionRefused
from settlement.models import Redemption, RedemptionAllocation, RedemptionRequest, Reward
from settlement.services import redemption_hold, redemption_request
from tests.conftest import make_sender
from tests.settlement.conftest import make_reward, month_end
from tests.wallets.conftest import credit, make_person, owe
from wallets.models import Membership

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

NOW = timezone.now()


class _Undo(Exception):
    """Raised to roll one engine's run back, so the other starts from the same data."""


def story(person: Any, other: Any) -> list[Any]:
    """Requests of every outcome; returns what each answered (an answer, a refusal or an error)."""
    outcomes: list[Any] = []

    def ask(key: str | None, reward: str, quantity: Any, who: Any = person) -> None:
        try:
            if key is None:
                held = redemption_hold(person=who, reward_code=reward, quantity=quantity, now=NOW)
                outcomes.append(("held without a key", held.public_id, held.points))
            else:
                answer = redemption_request(
                    person=who, idempotency_key=key, reward_code=reward, quantity=quantity, now=NOW
                )
                outcomes.append(("held" if answer.held else answer.body["code"], answer.body, answer.replayed))
        except (RedemptionRefused, IdempotencyKeyReused, InvalidReward) as exc:
            outcomes.append((type(exc).__name__, exc.problem()))

    ask("k1", "tea", 2)  # spans lots of two issuers, soonest-expiring first
    ask("k1", "tea", 2)  # the stored answer again
    ask("k1", "tea", 3)  # another request under the key
    ask("k2", "mug", 1)  # stocked, limited to 2, the person is linked at the provider
    ask("k3", "mug", 2)  # over the limit
    ask("k4", "rare", 3)  # more than the stock
    ask("k4", "rare", 3)  # a refusal's stored answer again
    ask("k5", "closed", 1)  # outside its window
    ask("k6", "nope", 1)  # no such reward
    ask("k7", "feast", 1)  # more than the wallet holds less the debt
    ask(None, "tea", 1)  # a hold without a key
    ask(None, "feast", 1)
    ask(None, "tea", 0)
    ask("k8", "tea", 1, who=other)  # a wallet with nothing
    ask("k9", "tea", 2)  # from the last lot
    return outcomes


def snapshot(person: Any) -> dict[str, Any]:
    """Everything a hold writes, keyed by what does not depend on ids handed out."""
    codes = dict(Institution.objects.values_list("id", "code"))
    accounts = {a.id: a for a in Account.objects.all()}

    def account(pk: int) -> str:
        a = accounts[pk]
        return f"{a.kind}:{codes[a.issuer_id]}:{a.expires_on}:{'r' if a.redemption_id else ''}"

    redemptions = list(Redemption.objects.order_by("id"))
    return {
        "redemptions": [
            (r.person_id == person.pk, r.reward.code, r.quantity, r.points, r.status, r.created_at, r.hold_expires_at)
            for r in redemptions
        ],
        "allocations": [
            (account(a.lot_id), codes[a.issuer_id], a.expires_on, a.milligrams)
            for a in RedemptionAllocation.objects.order_by("redemption_id", "id")
        ],
        "balances": sorted((account(a.id), a.balance) for a in accounts.values()),
        "hold accounts": sorted(
            re.sub(r"r=\d+", f"r={[r.id for r in redemptions].index(a.redemption_id)}", a.key)
            for a in accounts.values()
            if a.redemption_id
        ),
        "transfers": [
            (re.sub(r"\d+", "#", t.idempotency_key), t.kind, sorted(t.metadata))
            for t in Transfer.objects.filter(kind="hold").order_by("id")
        ],
        "postings": [
            (account(p.account_id), p.amount)
            for p in Posting.objects.filter(transfer__kind="hold").order_by("transfer_id", "id")
        ],
        "stored answers": [
            (r.key, r.redemption_id is not None, r.response)
            for r in RedemptionRequest.objects.order_by("person_id", "key")
        ],
        "webhooks": [webhook(m, codes) for m in OutboxMessage.objects.order_by("id")],
        "stock": dict(Reward.objects.values_list("code", "stock")),
        "ledger check": ledger_check(),
    }


def webhook(message: OutboxMessage, codes: dict[int, str]) -> tuple[Any, ...]:
    """A webhook as stored, byte for byte but its id and time (the engines' envelopes are built by the
    edge, in SQL and in Python), and its data's subject as sent."""
    sent = json.loads(outbox_body(message))
    body = re.sub(r'"id":"msg_[0-9a-f]{32}"', '"id":"msg"', message.body)
    body = re.sub(r'"time":"[^"]+"', '"time":"T"', body)
    return (codes[message.institution_id], message.type, body, message.subject_sealed != "", sent["data"]["subject"])


def ordinals(value: Any) -> Any:
    """Public redemption ids replaced by their order of first appearance."""
    seen: dict[str, str] = {}
    text = json.dumps(value, default=str, sort_keys=True)
    return json.loads(re.sub(r"rdm_[0-9a-f]{24}", lambda m: seen.setdefault(m.group(0), f"rdm#{len(seen)}"), text))


def run(settings: Any, in_database: bool, person: Any, other: Any) -> tuple[Any, Any]:
    settings.HUB_REDEMPTION_HOLD_IN_DATABASE = in_database
    result: list[Any] = []
    try:
        with transaction.atomic():
            outcomes = story(person, other)
            result.append((ordinals(outcomes), ordinals(snapshot(person))))
            raise _Undo
    except _Undo:
        pass
    return result[0]


@pytest.fixture
def world() -> tuple[Any, Any]:
    provider = make_sender("coffee-co", provider=True)
    banks = [make_sender(code).institution for code in ("bank-a", "bank-b", "bus-co")]
    person, _ = make_person("mei")
    other, _ = make_person("ana")
    credit(person.pk, banks[0].pk, month_end(4), 15_500)
    credit(person.pk, banks[1].pk, month_end(1), 7_250)
    credit(person.pk, banks[2].pk, month_end(1), 3_000)
    credit(person.pk, banks[0].pk, month_end(9), 40_000)
    owe(person.pk, banks[1].pk, 2_000)
    Membership.objects.create(
        institution=provider.institution,
        person=person,
        subject_ref=crypto.subject_ref(provider.code, "member-7"),
        subject_sealed=crypto.seal("member-7"),
    )
    make_reward(provider, "tea", points=10)
    make_reward(provider, "mug", points=5, stock=50, per_person_limit=2)
    make_reward(provider, "rare", points=1, stock=2)
    make_reward(provider, "closed", points=1, active_until=NOW - timedelta(days=1))
    make_reward(provider, "feast", points=1_000)
    return person, other


def test_the_database_function_and_the_portable_path_write_and_answer_the_same(settings, world):
    person, other = world
    in_database = run(settings, True, person, other)
    portable = run(settings, False, person, other)

    outcomes, written = in_database
    assert outcomes == portable[0]
    assert written == portable[1]
    # And the story did what it says: each kind of outcome, and the same-key replays.
    assert [o[0] for o in outcomes] == [
        *("held", "held", "IdempotencyKeyReused", "held"),
        *("redemption-limit-reached", "out-of-stock", "out-of-stock", "reward-unavailable", "reward-not-found"),
        *("insufficient-points", "held without a key", "InsufficientPoints", "InvalidReward"),
        *("insufficient-points", "held"),
    ]
    assert [o[1]["status"] for o in outcomes[4:10]] == [409, 409, 409, 409, 404, 409]
    assert outcomes[1][2] is True and outcomes[1][1] == outcomes[0][1]
    assert outcomes[6][2] is True and outcomes[6][1] == outcomes[5][1]
    assert [a["institution"] for a in outcomes[0][1]["allocations"]] == ["bank-a", "bank-b", "bus-co"]
    assert written["ledger check"] == []
    assert len(written["webhooks"]) == 4 and {w[4] for w in written["webhooks"]} == {"member-7"}


def test_a_lapsed_lot_is_not_spent_by_either(settings, world):
    """A lot past its expiry that the expiry job has not swept yet still holds points; neither path spends it."""
    person, _ = world
    results = []
    for in_database in (True, False):
        settings.HUB_REDEMPTION_HOLD_IN_DATABASE = in_database
        try:
            with transaction.atomic():
                today = month_end(1) + timedelta(days=1)  # the two month-1 lots have lapsed
                held = redemption_hold(person=person, reward_code="tea", quantity=5, now=NOW, today=today)
                results.append(
                    sorted(
                        (a.issuer.code, a.expires_on, a.milligrams)
                        for a in RedemptionAllocation.objects.filter(redemption=held).select_related("issuer")
                    )
                )
                raise _Undo
        except _Undo:
            pass
    assert results[0] == results[1]
    assert {expires for _, expires, _ in results[0]} == {month_end(4), month_end(9)}
