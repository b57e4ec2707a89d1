"""Rewards: the reward_create command (CONTRACT section 6) and the admin, which both go through the service;
the read-only redemption books in the admin and the void action."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from ledger.selectors import ledger_check
from settlement.models import Redemption, Reward
from settlement.services import redemption_hold
from tests.conftest import make_sender
from tests.settlement.conftest import lot_balances, make_reward, month_end
from tests.wallets.conftest import credit, make_person

pytestmark = pytest.mark.django_db


def create(*args: str) -> str:
    out = StringIO()
    call_command("reward_create", *args, stdout=out)
    return out.getvalue()


def test_reward_create_prints_exactly_the_contracts_json(provider):
    printed = create("coffee-co", "latte", "--title", "Oat latte", "--points", "300", "--stock", "50")
    assert printed.endswith("\n") and printed.count("\n") == 1  # one object on one line, nothing else
    assert json.loads(printed) == {
        "code": "latte",
        "provider": "coffee-co",
        "title": "Oat latte",
        "points": 300,
        "stock": 50,
    }
    assert list(json.loads(printed)) == ["code", "provider", "title", "points", "stock"]
    reward = Reward.objects.get(code="latte")
    assert (reward.provider, reward.points, reward.stock) == (provider.institution, 300, 50)


def test_reward_create_without_stock_is_unlimited(provider):
    printed = json.loads(create("coffee-co", "tea", "--title", "Tea", "--points", "80", "--per-person-limit", "2"))
    assert printed["stock"] is None
    assert Reward.objects.get(code="tea").per_person_limit == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody", "latte", "--title", "T", "--points", "1"), "No institution 'nobody'"),
        (("bank-a", "latte", "--title", "T", "--points", "1"), "not a provider"),
        (("coffee-co", "Latte!", "--title", "T", "--points", "1"), "[a-z0-9-]{2,40}"),
        (("coffee-co", "latte", "--title", "T", "--points", "0"), "positive"),
        (("coffee-co", "latte", "--title", "T", "--points", "1", "--stock", "-1"), "negative"),
        (("coffee-co", "latte", "--title", "T", "--points", "1", "--active-from", "2030-01-01"), "offset"),
        (
            (
                "coffee-co",
                "latte",
                "--title",
                "T",
                "--points",
                "1",
                "--active-from",
                "2030-01-02T00:00:00+08:00",
                "--active-until",
                "2030-01-01T00:00:00+08:00",
            ),
            "end after it starts",
        ),
    ],
)
def test_reward_create_refuses_bad_input_and_changes_nothing(provider, bank, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        create(*args)
    assert not Reward.objects.exists()


def test_reward_codes_are_unique_across_providers(provider):
    create("coffee-co", "latte", "--title", "Latte", "--points", "300")
    make_sender("tea-co", provider=True)
    with pytest.raises(CommandError, match="taken"):
        create("tea-co", "latte", "--title", "Latte", "--points", "200")
    assert Reward.objects.get().provider == provider.institution


# --- Admin ----------------------------------------------------------------------------------------------


def test_the_admin_adds_a_reward_through_the_service_and_offers_only_providers(admin_client, provider, bank):
    page = admin_client.get(reverse("admin:settlement_reward_add"))
    assert page.status_code == 200
    choices = [value for value, _ in page.context["adminform"].form.fields["provider"].choices if value]
    assert [str(v) for v in choices] == [str(provider.institution.pk)]

    response = admin_client.post(
        reverse("admin:settlement_reward_add"),
        {"provider": provider.institution.pk, "code": "latte", "title": "Latte", "points": 300, "stock": 5},
    )
    assert response.status_code == 302, response.content
    assert Reward.objects.get().stock == 5
    duplicate = admin_client.post(
        reverse("admin:settlement_reward_add"),
        {"provider": provider.institution.pk, "code": "latte", "title": "Again", "points": 1},
    )
    assert duplicate.status_code == 200 and Reward.objects.count() == 1  # the form says why
    assert admin_client.get(reverse("admin:settlement_reward_changelist")).status_code == 200


def test_the_admin_shows_redemptions_read_only_and_voids_a_stuck_hold(admin_client, provider, bank):
    person, _ = make_person("mei")
    credit(person.pk, bank.institution.pk, month_end(2), 50_000)
    make_reward(provider, "latte", points=30)
    before = lot_balances(person.pk)
    held = redemption_hold(person=person, reward_code="latte", quantity=1)

    assert admin_client.get(reverse("admin:settlement_redemption_changelist")).status_code == 200
    page = admin_client.get(reverse("admin:settlement_redemption_change", args=[held.pk]))
    assert page.status_code == 200
    assert f"redemption:{held.pk}:hold" in page.content.decode()
    assert admin_client.get(reverse("admin:settlement_redemption_add")).status_code == 403

    response = admin_client.post(
        reverse("admin:settlement_redemption_changelist"),
        {"action": "void", "_selected_action": [str(held.pk)]},
        follow=True,
    )

    assert [str(m) for m in response.context["messages"]] == ["Voided 1 redemption(s)."]
    held.refresh_from_db()
    assert (held.status, held.resolved_by) == ("voided", "operator:admin")
    assert lot_balances(person.pk) == before
    again = admin_client.post(
        reverse("admin:settlement_redemption_changelist"),
        {"action": "void", "_selected_action": [str(held.pk)]},
        follow=True,
    )
    assert [str(m) for m in again.context["messages"]] == ["Voided 0 redemption(s); skipped 1 not pending."]
    assert Redemption.objects.get().status == "voided"
    assert ledger_check() == []
