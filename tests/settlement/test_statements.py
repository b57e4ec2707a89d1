"""Statements: the institution's JSON endpoint (bearer token) and the operator's CSV export and admin."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.urls import reverse

from settlement import apis
from settlement.models import Cycle, CycleState, Instruction
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
    obligations = statement.pop("obligations")
    lines = obligations.pop("lines")
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


# --- Admin ------------------------------------------------------------------------------------------


def rows_of(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def test_admin_exports_a_cycles_statements_as_csv(admin_client, senders, ran):
    response = admin_client.post(
        reverse("admin:settlement_cycle_changelist"), {"action": "export_statements", "_selected_action": [ran.pk]}
    )
    assert f'filename="statements-cycle-{ran.pk}.csv"' in response["Content-Disposition"]
    rows = rows_of(response)
    by_bank = {code: [r for r in rows if r["institution"] == code] for code in ("bank-a", "bank-b", "bank-c", "bank-d")}
    a = by_bank["bank-a"]
    assert [r["item"] for r in a] == [
        "opening",
        "obligation",
        "obligation",
        "obligation",
        "gross_in",
        "gross_out",
        "digest",
        "net",
        "instruction",
        "closing",
    ]
    value = {r["item"]: r["amount_minor"] for r in a if r["item"] != "obligation"}
    assert (value["opening"], value["gross_in"], value["gross_out"], value["net"]) == ("0", "50", "130", "-80")
    assert (value["instruction"], value["closing"]) == ("-80", "0")
    instruction = Instruction.objects.get(institution=senders["A"].institution)
    (digest,) = [r["detail"] for r in a if r["item"] == "digest"]
    assert digest == instruction.statement_digest
    (detail,) = [r["detail"] for r in a if r["item"] == "instruction"]
    assert detail == f"{instruction.instruction_id} pay value 2030-03-04 sent"
    lines = [
        {
            "id": int(r["obligation_id"]),
            "source": r["source"],
            "debtor": r["debtor"],
            "creditor": r["creditor"],
            "amount_minor": int(r["amount_minor"]),
            "currency": r["currency"],
        }
        for r in a
        if r["item"] == "obligation"
    ]
    assert canonical_digest(lines) == digest  # the CSV alone proves the figure
    c = {r["item"]: r for r in by_bank["bank-c"]}
    assert "instruction" not in c and c["closing"]["amount_minor"] == "20"
    assert all(r["cycle_id"] == str(ran.pk) and r["currency"] == "CNY" for r in rows)


def test_admin_exports_one_institutions_statement_and_escapes_formulas(admin_client, senders, ran):
    record(senders, [("B", "A", 500)], at=CUT + timedelta(hours=1), tag="=HYPERLINK(1)")
    later = cycle_run(now=CUT + timedelta(hours=2), minimum_minor=25)
    assert later is not None
    position = later.cycle.positions.get(institution=senders["A"].institution)
    response = admin_client.post(
        reverse("admin:settlement_netposition_changelist"),
        {"action": "export_statements", "_selected_action": [position.pk]},
    )
    rows = rows_of(response)
    assert {r["institution"] for r in rows} == {"bank-a"}
    (line,) = [r for r in rows if r["item"] == "obligation"]
    assert line["source"] == "'=HYPERLINK(1):0" and line["amount_minor"] == "500"


def test_admin_pages_load_and_run_now_cuts_a_cycle(admin_client, senders):
    record(senders, [(d, c, amount * 100) for d, c, amount in WORKED], at=CUT - timedelta(days=3650))
    page = admin_client.get(reverse("admin:settlement_cycle_changelist"))
    assert page.status_code == 200 and "Run settlement now" in page.content.decode()
    assert admin_client.get(reverse("admin:settlement_cycle_run")).status_code == 403  # POST only
    response = admin_client.post(reverse("admin:settlement_cycle_run"), follow=True)
    cycle = Cycle.objects.get()
    assert cycle.state == CycleState.INSTRUCTED and cycle.instructions.count() == 4
    assert f"Cycle {cycle.pk} instructed: 4 position(s), 4 instruction(s)." in [
        str(m) for m in response.context["messages"]
    ]
    again = admin_client.post(reverse("admin:settlement_cycle_run"), follow=True)
    assert "Nothing to settle." in [str(m) for m in again.context["messages"]]

    instruction = cycle.instructions.first()
    assert instruction is not None
    for url in (
        reverse("admin:settlement_cycle_change", args=[cycle.pk]),
        reverse("admin:settlement_instruction_changelist"),
        reverse("admin:settlement_instruction_change", args=[instruction.pk]),
        reverse("admin:settlement_obligation_changelist") + "?waiting=no",
        reverse("admin:settlement_netposition_changelist"),
    ):
        assert admin_client.get(url).status_code == 200, url
    detail = admin_client.get(reverse("admin:settlement_cycle_change", args=[cycle.pk])).content.decode()
    assert instruction.instruction_id in detail
    assert (
        instruction.statement_digest
        in admin_client.get(reverse("admin:settlement_instruction_change", args=[instruction.pk])).content.decode()
    )
