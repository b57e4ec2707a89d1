"""What ``tests/test_migrations.py`` runs inside ``manage.py shell`` on its scratch database: the data
written at the newest migrations, and the answers read back after migrating down and up again.

Each function prints one JSON document for the test to read."""

from __future__ import annotations

import json
from datetime import timedelta

from django.utils import timezone

from institutions.models import Institution
from institutions.services import institution_register
from ledger.selectors import ledger_check
from ledger.services import AccountKey, TransferSpec, accounts_ensure, lot_expiry, transfers_post
from settlement.models import Reward
from settlement.services import redemption_request, reward_create
from wallets.models import Person
from wallets.services import person_signup

REQUESTS = {"new-held": "coffee", "new-refused": "mug", "old-held": "coffee", "old-refused": "mug"}


def written() -> None:
    """A provider, an issuer, a person with points, two rewards (one out of stock), and two answers."""
    institution_register(code="coffee-co", name="Coffee", hmac=True, is_provider=True)
    institution_register(code="bank-a", name="Bank", hmac=True)
    provider, bank = Institution.objects.get(code="coffee-co"), Institution.objects.get(code="bank-a")
    person = person_signup(username="mei", password="a long enough password 1").person
    lot = AccountKey.wallet_lot(
        person_id=person.pk, issuer_id=bank.pk, expires_on=lot_expiry(timezone.localdate() + timedelta(days=90))
    )
    issued = AccountKey.issuer_outstanding(issuer_id=bank.pk)
    ids = accounts_ensure(keys=[lot, issued])
    transfers_post(transfers=[TransferSpec("credit:1", "credit", [(ids[issued], -100_000), (ids[lot], 100_000)])])
    reward_create(provider=provider, code="coffee", title="Coffee", points=10)
    reward_create(provider=provider, code="mug", title="Mug", points=1, stock=0)
    answers = {key: _asked(person, key) for key in ("new-held", "new-refused")}
    print(json.dumps({"person": person.pk, "answers": answers}))


def read() -> None:
    """Every key's answer again, a new hold, and the ledger's check."""
    person = Person.objects.get()
    answers = {key: _asked(person, key) for key in REQUESTS}
    answers["after"] = _asked(person, "after")
    print(
        json.dumps(
            {
                "answers": answers,
                "stock": Reward.objects.get(code="mug").stock,
                "check": [str(p) for p in ledger_check()],
            }
        )
    )


def _asked(person: Person, key: str) -> list[object]:
    """Whether the key's answer held, was replayed, and its refusal's code or its redemption's status."""
    answer = redemption_request(person=person, idempotency_key=key, reward_code=REQUESTS.get(key, "coffee"), quantity=1)
    return [answer.held, answer.replayed, answer.body.get("code", answer.body["status"])]
