"""The person's view: the wallet from ledger balances, and the activity history page by page."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ledger.services import AccountKey, accounts_ensure, lot_expiry
from methodology.models import NormalizedActivity
from methodology.selectors import GRAMS_PLACES
from tests.conftest import activity, make_sender
from tests.wallets.conftest import PASSWORD, auth, credit, link_event, make_person, new_code, outcome, owe
from wallets import selectors
from wallets.selectors import wallet_summary

pytestmark = pytest.mark.django_db

TODAY = date(2028, 11, 10)  # "expiring soon" reaches to 2028-12-10
NOV, DEC, JAN, MAR, JUN = (
    date(2028, 11, 30),
    date(2028, 12, 31),
    date(2029, 1, 31),
    date(2029, 3, 31),
    date(2029, 6, 30),
)
OCT = date(2028, 10, 31)  # lapsed before TODAY, not swept yet


@pytest.fixture
def today(monkeypatch):
    monkeypatch.setattr(selectors, "standard_today", lambda: TODAY)
    return TODAY


@pytest.fixture
def three_issuers(bank, other_bank):
    return bank.institution, other_bank.institution, make_sender("bus-co").institution


def test_wallet_from_balances_across_three_institutions(client, today, three_issuers):
    bank_a, bank_b, bus = three_issuers
    person, token = make_person("wallet-mei")
    other, _ = make_person("wallet-lin")
    credit(person.pk, bank_a.pk, NOV, 40_500)
    credit(person.pk, bank_a.pk, NOV, 1_000)  # the same lot again: balances, not postings, are read
    credit(person.pk, bank_a.pk, MAR, 60_000)
    credit(person.pk, bank_b.pk, NOV, 3_200)
    credit(person.pk, bank_b.pk, JUN, 25_000)
    credit(person.pk, bus.pk, DEC, 15_300)  # lapses after the 30-day horizon
    credit(person.pk, bus.pk, JAN, 800)
    credit(person.pk, bank_a.pk, OCT, 7_000)  # lapsed: no longer the person's to spend
    credit(other.pk, bank_a.pk, NOV, 99_000)  # someone else's
    accounts_ensure(keys=[AccountKey.wallet_lot(person_id=person.pk, issuer_id=bus.pk, expires_on=MAR)])  # empty

    response = client.get("/api/v1/me/wallet", headers=auth(token))

    assert response.status_code == 200, response.content
    # 41,500 + 60,000 + 3,200 + 25,000 + 15,300 + 800 mg = 145.8 g. Each figure is rounded down on its
    # own: the institutions' 101 + 28 + 16 points add up to one less than the total's 146.
    assert response.json() == {
        "points": 145,
        "grams": "145.800",
        "by_institution": [
            {"institution": "bank-a", "points": 101, "next_expiry": "2028-11-30"},
            {"institution": "bank-b", "points": 28, "next_expiry": "2028-11-30"},
            {"institution": "bus-co", "points": 16, "next_expiry": "2028-12-31"},
        ],
        "expiring_soon": [{"points": 44, "expires_on": "2028-11-30"}],
    }


def test_expiring_soon_groups_by_date_soonest_first_within_the_setting(client, today, three_issuers, settings):
    bank_a, bank_b, bus = three_issuers
    settings.HUB_EXPIRING_SOON_DAYS = 90  # to 2029-02-08
    person, token = make_person("wallet-soon")
    credit(person.pk, bus.pk, JAN, 2_000)
    credit(person.pk, bank_a.pk, DEC, 5_000)
    credit(person.pk, bank_b.pk, DEC, 1_500)
    credit(person.pk, bank_a.pk, NOV, 999)  # under a point: not worth a line
    credit(person.pk, bank_a.pk, MAR, 70_000)

    body = client.get("/api/v1/me/wallet", headers=auth(token)).json()

    assert body["expiring_soon"] == [
        {"points": 6, "expires_on": "2028-12-31"},
        {"points": 2, "expires_on": "2029-01-31"},
    ]
    assert body["by_institution"][0] == {"institution": "bank-a", "points": 75, "next_expiry": "2028-11-30"}


def test_an_empty_wallet(client, today):
    _, token = make_person("wallet-empty")
    response = client.get("/api/v1/me/wallet", headers=auth(token))
    assert response.json() == {"points": 0, "grams": "0.000", "by_institution": [], "expiring_soon": []}


def test_debts_show_as_points_owed_rounded_up(client, today, three_issuers):
    bank_a, bank_b, _ = three_issuers
    person, token = make_person("wallet-owes")
    credit(person.pk, bank_a.pk, MAR, 10_000)
    owe(person.pk, bank_b.pk, 1_500)
    owe(person.pk, bank_a.pk, 1_000)

    body = client.get("/api/v1/me/wallet", headers=auth(token)).json()

    assert body["points"] == 10
    assert body["debt_points"] == 3  # 2.5 points owed


def test_wallet_needs_a_person(client):
    assert client.get("/api/v1/me/wallet").status_code == 401


# --- Cost ---------------------------------------------------------------------------------------------


def test_wallet_summary_takes_two_queries_however_many_lots(client, today, three_issuers, django_assert_num_queries):
    person, token = make_person("wallet-many")
    credit(person.pk, three_issuers[0].pk, MAR, 1_000)
    with django_assert_num_queries(2):
        assert wallet_summary(person).points == 1

    months = [lot_expiry(date(2029 + m // 12, m % 12 + 1, 1)) for m in range(20)]
    for month in months:  # 3 issuers x 20 months, each lot posted to twice
        for issuer in three_issuers:
            credit(person.pk, issuer.pk, month, 1_000)
            credit(person.pk, issuer.pk, month, 1_000)
    with django_assert_num_queries(2):
        summary = wallet_summary(person)
    assert summary.points == 121
    assert len(summary.by_institution) == 3
    # The endpoint adds only the token, with its user and person: 3 queries.
    with django_assert_num_queries(3):
        assert client.get("/api/v1/me/wallet", headers=auth(token)).json()["points"] == 121


@pytest.mark.postgres
def test_wallet_query_uses_the_ledger_person_index(today):
    person, _ = make_person("wallet-index")
    with CaptureQueriesContext(connection) as queries:
        wallet_summary(person)
    sql = queries.captured_queries[0]["sql"]
    assert "ledger_account" in sql
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a tiny table would be scanned whatever the indexes
        cursor.execute(f"EXPLAIN {sql}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "ledger_account_person" in plan, plan


# --- Activities ---------------------------------------------------------------------------------------


def test_activities_page_by_page_newest_first(client, bank, deliver, django_assert_max_num_queries):
    person, token = make_person("history-mei")
    (linked,) = deliver(bank, link_event(new_code(client, token), subject="mei-77"))
    assert outcome(linked)["linked"] is True
    start = datetime(2026, 11, 1, 8, 0)
    events = [
        activity(subject="mei-77", action="mobility.walking", quantity="200", unit="step")
        | {"time": (start + timedelta(minutes=index // 2)).strftime("%Y-%m-%dT%H:%M:%SZ")}  # pairs share a time
        for index in range(120)
    ]
    deliver(bank, *events)
    deliver(bank, activity(subject="someone-else"))
    assert NormalizedActivity.objects.filter(person=person).count() == 120

    seen = []
    url = "/api/v1/me/activities"
    pages = 0
    while url:
        with django_assert_max_num_queries(3):  # token, person, the page (institution and scenario joined)
            response = client.get(url, headers=auth(token))
        assert response.status_code == 200, response.content
        body = response.json()
        assert set(body) == {"next", "previous", "results"}
        assert len(body["results"]) <= 50
        seen.extend(body["results"])
        url = body["next"]
        pages += 1

    assert pages == 3
    expected = list(NormalizedActivity.objects.filter(person=person).order_by("-occurred_at", "-id"))
    assert len(seen) == len(expected) == 120
    assert [(item["time"], item["credited_mg"], item["status"]) for item in seen] == [
        (a.occurred_at.strftime("%Y-%m-%dT%H:%M:%SZ"), a.credited_mg, a.status) for a in expected
    ]
    newest = expected[0]
    assert seen[0] == {
        "institution": "bank-a",
        "scenario": "mobility.walking",
        "time": "2026-11-01T08:59:00Z",
        "grams": str(newest.grams.quantize(GRAMS_PLACES)),
        "points": newest.credited_mg // 1000,
        "credited_mg": newest.credited_mg,
        "status": newest.status,
        "reason": newest.reason or None,
    }


def test_activities_show_what_was_not_credited_and_why(client, bank, deliver):
    _, token = make_person("history-capped")
    deliver(bank, link_event(new_code(client, token), subject="plate-1"))
    deliver(
        bank,
        *[activity(subject="plate-1", action="food.clean_plate", quantity="2", unit="checkin") for _ in range(3)],
    )

    results = client.get("/api/v1/me/activities", headers=auth(token)).json()["results"]

    by_status = sorted((r["status"], r["reason"] or "", r["points"] > 0) for r in results)
    assert by_status == [("capped", "cap_reached", False), ("credited", "", True), ("credited", "cap_reached", True)]
    assert None in [r["reason"] for r in results]  # no reason is null, not an empty string
    assert all(r["grams"].count(".") == 1 and len(r["grams"].split(".")[1]) == 3 for r in results)


def test_activities_of_someone_else_are_not_shown(client, bank, deliver):
    _, alice = make_person("history-alice")
    _, bob = make_person("history-bob")
    deliver(bank, link_event(new_code(client, alice), subject="alice-1"))
    deliver(bank, activity(subject="alice-1"))
    assert len(client.get("/api/v1/me/activities", headers=auth(alice)).json()["results"]) == 1
    assert client.get("/api/v1/me/activities", headers=auth(bob)).json()["results"] == []


def test_the_admin_person_page_shows_the_wallet(client, today, three_issuers):
    bank_a, bank_b, _ = three_issuers
    person, _ = make_person("wallet-admin")
    credit(person.pk, bank_a.pk, NOV, 2_500)
    credit(person.pk, bank_b.pk, MAR, 40_000)
    owe(person.pk, bank_b.pk, 500)
    client.force_login(get_user_model().objects.create_superuser("root", password=PASSWORD))

    html = client.get(f"/admin/wallets/person/{person.pk}/change/").content.decode()

    assert "42 points (42.500 g)" in html
    assert "bank-a: 2 points, next lapse 2028-11-30" in html
    assert "expiring soon: 2 points on 2028-11-30" in html
    assert "owes 1 points" in html
