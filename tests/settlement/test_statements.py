"""Statements: the institution's JSON endpoint (bearer token)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from settlement import apis
from settlement.models import Cycle, Instruction
from settlement.services import cycle_run
from tests.settlement.conftest import CUT, WORKED, bearer, canonical_digest, record

pytestmark = pytest.mark.django_db

URL = "/api/v1/institutions/{}/settlements"


@pytest.fixture
def ran(senders) -> Cycle:
    record(senders, WORKED)
    run = cycle_run(now=CUT, minimum_minor=25)  # A pays 80, B receives 40; C and D carry 20 each
    assert run is not None
    return run.cycle


def test_a_statement_holds_opening_obligations_net_instruction_confirmation_closing(client, senders, ran):
    response = client.get(URL.format("bank-a"), headers=bearer(senders["A"]))
    assert response.status_code == 200
    body = response.json()
    assert body["next"] is None and body["previous"] is None
    (statement,) = body["results"]
    instruction = Instruction.objects.get(institution=senders["A"].institution)
    lines = statement.pop("obligations").pop("lines")
    assert statement == {
        "cycle_id": ran.pk,
        "cycle_state": "instructed",
        "cut_off_at": "2030-03-01T13:00:00Z",
        "currency": "CNY",
        "institution": "bank-a",
        "opening_minor": 0,
        "net_minor": -80,
        "instruction": {
            "instruction_id": instruction.instruction_id,
            "direction": "pay",
            "amount_minor": 80,
            "currency": "CNY",
            "value_date": "2030-03-04",
            "statement_digest": instruction.statement_digest,
            "state": "sent",
        },
        "confirmation": None,
        "closing_minor": 0,
    }
    assert sorted((x["source"], x["debtor"], x["creditor"], x["amount_minor"]) for x in lines) == [
        ("test:0", "bank-a", "bank-b", 100),
        ("test:2", "bank-c", "bank-a", 50),
        ("test:3", "bank-a", "bank-d", 30),
    ]
    assert canonical_digest(lines) == instruction.statement_digest
    obligations = client.get(URL.format("bank-a"), headers=bearer(senders["A"])).json()["results"][0]["obligations"]
    assert (obligations["count"], obligations["gross_in_minor"], obligations["gross_out_minor"]) == (3, 50, 130)

    carried = client.get(URL.format("bank-c"), headers=bearer(senders["C"])).json()["results"][0]
    assert carried["instruction"] is None and (carried["net_minor"], carried["closing_minor"]) == (20, 20)


def test_only_the_institutions_own_token_reads_its_statements(client, senders, ran):
    assert client.get(URL.format("bank-a")).status_code == 401
    wrong = client.get(URL.format("bank-a"), headers={"Authorization": "Bearer chtok_not-a-token"})
    assert wrong.status_code == 401 and wrong["Content-Type"] == "application/problem+json"
    other = client.get(URL.format("bank-a"), headers=bearer(senders["B"]))
    assert other.status_code == 404 and other.json()["code"] == "not-found"
    unknown = client.get(URL.format("no-such-bank"), headers=bearer(senders["B"]))
    assert unknown.status_code == 404  # the same answer as another institution's code


def test_statements_page_newest_first_and_filter_by_cycle(client, senders, ran, monkeypatch):
    cycles = [ran.pk]
    for n in range(1, 3):
        record(senders, [("A", "B", 1000 * n)], at=CUT + timedelta(hours=n), tag=f"more{n}")
        run = cycle_run(now=CUT + timedelta(hours=n, minutes=30), minimum_minor=25)
        assert run is not None
        cycles.append(run.cycle.pk)
    monkeypatch.setattr(apis.StatementCursor, "page_size", 2)
    first = client.get(URL.format("bank-a"), headers=bearer(senders["A"])).json()
    assert [s["cycle_id"] for s in first["results"]] == cycles[::-1][:2]
    second = client.get(first["next"], headers=bearer(senders["A"])).json()
    assert [s["cycle_id"] for s in second["results"]] == cycles[:1] and second["next"] is None

    one = client.get(URL.format("bank-a"), {"cycle": cycles[1]}, headers=bearer(senders["A"])).json()
    assert [s["cycle_id"] for s in one["results"]] == [cycles[1]]
    # C's 20 under the minimum rides along with every later cut until it clears the minimum.
    (c_last,) = client.get(URL.format("bank-c"), {"cycle": cycles[2]}, headers=bearer(senders["C"])).json()["results"]
    assert (c_last["opening_minor"], c_last["net_minor"], c_last["closing_minor"]) == (20, 20, 20)
    none = client.get(URL.format("bank-c"), {"cycle": cycles[2] + 1}, headers=bearer(senders["C"])).json()
    assert none["results"] == []
    bad = client.get(URL.format("bank-a"), {"cycle": "latest"}, headers=bearer(senders["A"]))
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "cycle"


def test_the_schema_documents_the_endpoint(client):
    schema = client.get("/api/v1/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/api/v1/institutions/{code}/settlements"]["get"]
    assert operation["operationId"] == "settlements_list"
    assert {p["name"] for p in operation["parameters"]} >= {"code", "cycle", "cursor"}
    assert "Cursor-paginated" in operation["description"]
    assert operation["security"] == [{"institutionToken": []}]
    assert schema["components"]["securitySchemes"]["institutionToken"]["scheme"] == "bearer"
