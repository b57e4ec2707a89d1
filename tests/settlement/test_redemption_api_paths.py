"""``POST /me/redemptions`` has two paths: plain requests are served without DRF
(``settlement.apis._redemption_post_direct``), every other one by DRF. Both must answer alike.

One script of requests runs twice, for two persons with the same wallet: once as served, once with
the direct path turned off. Every answer (status, media type, replay header, body with its ids
numbered) must be the same, and the direct path must have served exactly the plain requests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from settlement import apis
from tests.settlement.conftest import make_reward, month_end
from tests.wallets.conftest import credit, make_person

pytestmark = pytest.mark.django_db

# (what it is, body as sent, headers besides the token's; None: no Authorization header at all)
SCRIPT: list[tuple[str, str, dict[str, str]]] = [
    ("hold", '{"reward": "coffee", "quantity": 1}', {"Idempotency-Key": "k1"}),
    ("replay", '{"reward": "coffee", "quantity": 1}', {"Idempotency-Key": "k1"}),
    ("key reused", '{"reward": "coffee", "quantity": 2}', {"Idempotency-Key": "k1"}),
    ("quantity by default", '{"reward": "coffee"}', {"Idempotency-Key": "k2", "Accept": "application/json"}),
    ("no key", '{"reward": "coffee"}', {}),
    ("bad key", '{"reward": "coffee"}', {"Idempotency-Key": "é"}),
    ("unknown reward", '{"reward": "tea"}', {"Idempotency-Key": "k3"}),
    ("too few points", '{"reward": "coffee", "quantity": 50}', {"Idempotency-Key": "k4"}),
    ("refusal replayed", '{"reward": "coffee", "quantity": 50}', {"Idempotency-Key": "k4"}),
    ("extra field", '{"reward": "coffee", "note": "x"}', {"Idempotency-Key": "k5", "Accept": "*/*"}),
    # Left to DRF: what its parsing, validation, negotiation or authentication answers or changes.
    ("spaces trimmed", '{"reward": " coffee "}', {"Idempotency-Key": "k6"}),
    ("quantity as text", '{"reward": "coffee", "quantity": "1"}', {"Idempotency-Key": "k7"}),
    ("quantity 0", '{"reward": "coffee", "quantity": 0}', {"Idempotency-Key": "k8"}),
    ("quantity true", '{"reward": "coffee", "quantity": true}', {"Idempotency-Key": "k9"}),
    ("no reward", '{"quantity": 1}', {"Idempotency-Key": "k10"}),
    ("a list", '[{"reward": "coffee"}]', {"Idempotency-Key": "k11"}),
    ("a long body", '{"reward": "coffee", "note": "%s"}' % ("x" * 1024), {"Idempotency-Key": "k17"}),
    ("bad JSON", '{"reward": ', {"Idempotency-Key": "k12"}),
    ("NaN", '{"reward": "coffee", "x": NaN}', {"Idempotency-Key": "k18"}),
    ("a NUL", '{"reward": "cof\\u0000fee"}', {"Idempotency-Key": "k19"}),
    ("a lone surrogate", '{"reward": "\\ud800"}', {"Idempotency-Key": "k20"}),
    ("a BOM", '\ufeff{"reward": "coffee"}', {"Idempotency-Key": "k21"}),
    ("a key twice", '{"reward": "tea", "reward": "coffee"}', {"Idempotency-Key": "k23"}),
    ("a lone surrogate elsewhere", '{"reward": "coffee", "note": "\\udc00"}', {"Idempotency-Key": "k24"}),
    ("Accept empty", '{"reward": "coffee"}', {"Idempotency-Key": "k22", "Accept": ""}),
    ("HTML only", '{"reward": "coffee"}', {"Idempotency-Key": "k13", "Accept": "text/html"}),
    ("bad token", '{"reward": "coffee"}', {"Idempotency-Key": "k14", "Authorization": "Token nope"}),
    ("no token", '{"reward": "coffee"}', {"Idempotency-Key": "k15", "Authorization": ""}),
    ("not a person", '{"reward": "coffee"}', {"Idempotency-Key": "k16", "Authorization": "operator"}),
]
DIRECT = {"hold", "replay", "key reused", "quantity by default", "no key", "bad key", "unknown reward"}
DIRECT |= {"too few points", "refusal replayed", "extra field"}


def play(client: Any, token: str, operator_token: str, direct: list[int]) -> tuple[list[Any], set[str]]:
    """Every answer to the script, and which requests the direct path answered (``direct`` counts them)."""
    answers, served_directly = [], set()
    for name, body, extra in SCRIPT:
        headers = {"Authorization": f"Token {token}", **extra}
        if headers["Authorization"] == "operator":
            headers["Authorization"] = f"Token {operator_token}"
        if not headers["Authorization"]:
            del headers["Authorization"]
        before = len(direct)
        response = client.post("/api/v1/me/redemptions", data=body, content_type="application/json", headers=headers)
        if len(direct) > before:
            served_directly.add(name)
        text = re.sub(r"rdm_[0-9a-f]{24}", "rdm_#", response.content.decode())
        text = re.sub(r'"(created_at|hold_expires_at)":"[^"]+"', r'"\1":"#"', text)
        answers.append(
            (
                name,
                response.status_code,
                response["Content-Type"],
                response.get("Idempotent-Replayed"),
                response.get("WWW-Authenticate"),
                response.get("Vary"),
                response.get("Allow"),
                json.loads(text),
            )
        )
    return answers, served_directly


def test_the_direct_path_and_drf_answer_alike(client, provider, bank, monkeypatch):
    make_reward(provider, "coffee", points=30)
    served, answered_directly = apis._redemption_post_direct, []

    def counted(request: Any) -> Any:
        response = served(request)
        if response is not None:
            answered_directly.append(1)
        return response

    operator = get_user_model().objects.create_user(username="operator", password="x" * 12)
    operator_token = Token.objects.create(user=operator).key
    runs = []
    for name, path in (("mei", counted), ("lin", lambda request: None)):
        person, token = make_person(name)
        credit(person.pk, bank.institution.pk, month_end(3), 300_000)  # ten coffees, not fifty
        monkeypatch.setattr(apis, "_redemption_post_direct", path)
        runs.append(play(client, token, operator_token, answered_directly))

    (direct_answers, served_directly), (drf_answers, none) = runs
    assert served_directly == DIRECT and none == set()
    for ours, drfs in zip(direct_answers, drf_answers, strict=True):
        assert ours == drfs
    statuses = {name: status for name, status, *_ in direct_answers}
    assert statuses["hold"] == statuses["replay"] == statuses["spaces trimmed"] == 201
    assert statuses["too few points"] == statuses["refusal replayed"] == 409
    assert (statuses["bad token"], statuses["not a person"], statuses["HTML only"]) == (401, 403, 406)
    assert statuses["a key twice"] == statuses["a lone surrogate elsewhere"] == statuses["a BOM"] == 400
