"""The pages' language: from Accept-Language, else the switcher's cookie; numbers and dates per locale;
the API and the admin stay in English."""

from __future__ import annotations

import re
from datetime import date

import pytest

from tests.portal.conftest import EN, ZH
from tests.wallets.conftest import credit
from wallets.models import Person

pytestmark = pytest.mark.django_db


def html_lang(response) -> str:
    match = re.search(r'<html lang="([^"]+)"', response.content.decode())
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("zh", "zh-Hans"),
        ("zh-CN", "zh-Hans"),
        ("zh-cn", "zh-Hans"),
        ("zh-Hans", "zh-Hans"),
        ("zh-Hans-CN", "zh-Hans"),
        ("zh-SG", "zh-Hans"),
        # Traditional Chinese: its readers read simplified characters far more easily than English.
        ("zh-TW", "zh-Hans"),
        ("zh-HK", "zh-Hans"),
        ("fr-FR, zh;q=0.8, en;q=0.5", "zh-Hans"),
        ("en", "en"),
        ("en-US,en;q=0.9", "en"),
        ("en-GB, zh;q=0.5", "en"),
        ("fr", "en"),
        ("ja-JP", "en"),
        ("*", "en"),
        ("", "en"),
    ],
)
def test_the_language_comes_from_accept_language(client, accept, expected):
    response = client.get("/signin/", HTTP_ACCEPT_LANGUAGE=accept)
    assert html_lang(response) == expected
    assert response["Content-Language"] == expected.lower()
    assert "Accept-Language" in response["Vary"]


def test_without_accept_language_the_pages_are_english(client):
    assert html_lang(client.get("/signin/")) == "en"


def test_the_switcher_sets_a_lasting_cookie_that_wins_over_the_browser(client):
    page = client.get("/standard/", **ZH).content.decode()
    switcher = re.search(r'<form class="language" action="([^"]+)" method="post">(.*?)</form>', page, re.DOTALL)
    assert switcher is not None and switcher.group(1) == "/i18n/setlang/"
    assert 'name="csrfmiddlewaretoken"' in switcher.group(2)
    assert 'name="next" value="/standard/"' in switcher.group(2)
    response = client.post("/i18n/setlang/", {"language": "en", "next": "/standard/"}, **ZH)
    assert response.status_code == 302 and response["Location"] == "/standard/"
    cookie = response.cookies["django_language"]
    assert cookie.value == "en"
    assert int(cookie["max-age"]) == 365 * 24 * 3600
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    assert html_lang(client.get("/standard/", **ZH)) == "en"
    client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"}, **EN)
    assert html_lang(client.get("/standard/", **EN)) == "zh-Hans"


def test_the_switcher_names_each_language_in_itself_and_marks_the_current_one(client):
    page = client.get("/", **ZH).content.decode()
    assert re.search(r'value="zh-hans" lang="zh-Hans" aria-current="true">简体中文<', page)
    assert re.search(r'value="en" lang="en">English<', page)


def test_the_switcher_never_sends_anyone_to_another_site(client):
    response = client.post("/i18n/setlang/", {"language": "en", "next": "https://evil.example/"})
    assert response["Location"] == "/"


@pytest.mark.parametrize("path", ["/api/v1/me/wallet", "/api/v1/standard/scenarios"])
def test_the_api_answers_in_english_whatever_the_browser_asks(client, path):
    response = client.get(path, **ZH)
    assert response.get("Content-Language") is None
    if response.status_code == 401:
        assert response.json()["detail"] == "Authentication credentials were not provided."


def test_the_admin_stays_in_english(client):
    response = client.get("/admin/login/", **ZH)
    assert response.status_code == 200
    assert '<html lang="en-us"' in response.content.decode() or '<html lang="en"' in response.content.decode()
    assert "Log in" in response.content.decode()


def test_numbers_and_dates_follow_the_pages_language(client, person: Person, bank):
    credit(person.pk, bank.institution.pk, date(2031, 1, 31), 1_234_567_000)  # 1,234,567 points
    client.post("/signin/", {"username": "mei", "password": "a long and unusual passphrase"})
    zh = client.get("/", **ZH).content.decode()
    assert '<span class="balance__number">1,234,567</span>' in zh
    assert "相当于减排 1,234.567 千克二氧化碳当量。" in zh
    assert "最早一笔于 2031年1月31日 到期。" in zh
    client.post("/i18n/setlang/", {"language": "en", "next": "/"})
    en = client.get("/").content.decode()
    assert '<span class="balance__number">1,234,567</span>' in en
    assert "They stand for 1,234.567 kg of CO₂e avoided." in en
    assert "The soonest expire on Jan. 31, 2031." in en


def test_the_standards_figures_and_dates_per_language(client):
    zh = client.get("/standard/", **ZH).content.decode()
    assert "每公里 46.8 克 CO₂e" in zh
    assert "每件 25,000 克 CO₂e" in zh  # a second-hand phone, grouped by thousands
    assert "每步 0.0164 克 CO₂e" in zh  # small factors keep their digits
    assert ">2021年1月1日</time>" in zh
    en = client.get("/standard/", **EN).content.decode()
    assert "46.8 g CO₂e per km" in en
    assert "25,000 g CO₂e per item" in en
    assert ">Jan. 1, 2021</time>" in en
