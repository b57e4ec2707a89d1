"""The home page: what the hub is, for anyone; the pooled points and their kilograms, for a person."""

from __future__ import annotations

from calendar import monthrange
from datetime import date

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.conftest import make_sender
from tests.portal.conftest import EN, signed_in
from tests.wallets.conftest import credit, make_person

pytestmark = pytest.mark.django_db


def test_anyone_sees_what_the_hub_is_and_how_to_start(client):
    response = client.get("/", **EN)
    html = response.content.decode()
    assert response.status_code == 200
    assert "All your low-carbon points in one account" in html
    assert 'href="/signup/"' in html and 'href="/signin/"' in html and 'href="/standard/"' in html
    assert client.head("/").status_code == 200  # monitors ask with HEAD


def test_a_new_person_sees_zero_and_how_to_get_points(person_client):
    html = person_client.get("/", **EN).content.decode()
    assert '<span class="balance__number">0</span>' in html
    assert "No points yet" in html
    assert "link code" in html


def test_a_person_sees_their_pooled_points_and_kilograms_and_no_one_elses(bank, other_bank):
    mei, _ = make_person("mei")
    lin, _ = make_person("lin")
    credit(mei.pk, bank.institution.pk, date(2031, 1, 31), 1_500_999)  # 1,500.999 g: 1,500 points
    credit(mei.pk, other_bank.institution.pk, date(2031, 6, 30), 250_000)
    credit(lin.pk, bank.institution.pk, date(2031, 1, 31), 99_000_000)
    html = signed_in(Client(), "mei").get("/", **EN).content.decode()
    assert '<span class="balance__number">1,750</span>' in html
    assert "They stand for 1.750 kg of CO₂e avoided." in html
    assert "bank-a" in html and "1,500 points" in html
    assert "bank-b" in html and "250 points" in html
    assert "99,000" not in html


def test_one_point_is_singular(person, bank):
    credit(person.pk, bank.institution.pk, date(2031, 1, 31), 1_000)
    html = signed_in(Client(), "mei").get("/", **EN).content.decode()
    assert '<span class="balance__unit">point</span>' in html
    assert "1 point</span>" in html


def test_the_home_page_costs_the_same_few_queries_however_many_lots(person):
    browser = signed_in(Client(), "mei")
    issuers = [make_sender(f"bank-{i}").institution for i in range(3)]
    credit(person.pk, issuers[0].pk, date(2031, 1, 31), 5_000)
    with CaptureQueriesContext(connection) as one_lot:
        browser.get("/")
    for issuer in issuers:
        for month in range(1, 13):
            credit(person.pk, issuer.pk, date(2031, month, monthrange(2031, month)[1]), 1_000)
    with CaptureQueriesContext(connection) as many_lots:
        response = browser.get("/")
    assert "bank-2" in response.content.decode()
    assert len(many_lots.captured_queries) == len(one_lot.captured_queries) <= 8, [
        query["sql"][:120] for query in many_lots.captured_queries
    ]
