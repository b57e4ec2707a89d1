"""The simplified Chinese catalogue: complete, translated, compiled; and no English left on a Chinese page."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import polib
import pytest
from django.contrib.auth import get_user_model
from django.template.loader import render_to_string
from django.test import Client
from django.utils import translation

import portal.urls
from portal.management.commands import portal_messages
from tests.portal.conftest import EN, ZH
from tests.wallets.conftest import PASSWORD, make_person

# Catalogue entries that may show in English on a Chinese page, each with why. (None today: units, proper
# nouns and codes that stay as they are, such as "CO₂e" or "JSON", are written inside translated sentences.)
ALLOWED_IN_ENGLISH: dict[str, str] = {}


def catalogue() -> polib.POFile:
    return polib.pofile(str(portal_messages.po_path("zh_Hans")))


def test_the_catalogue_is_complete_translated_and_compiled():
    """Every string of the templates and code is in it, translated, not fuzzy, none unused, and the
    committed django.mo is its compilation (``manage.py portal_messages`` fixes all but translating)."""
    assert portal_messages.problems("zh_Hans") == []


def test_the_catalogue_check_finds_what_is_wrong(tmp_path, monkeypatch):
    """The check above can fail: an untranslated, a fuzzy and a stale entry in a copy are all reported."""
    copy = tmp_path / "locale"
    shutil.copytree(portal_messages.LOCALE_DIR, copy)
    monkeypatch.setattr(portal_messages, "LOCALE_DIR", copy)
    po = polib.pofile(str(portal_messages.po_path("zh_Hans")))
    singular = [entry for entry in po if not entry.msgid_plural]
    singular[0].msgstr = ""
    singular[1].flags.append("fuzzy")
    singular[2].msgstr = "改过但未编译"
    po.save(str(portal_messages.po_path("zh_Hans")))
    found = "\n".join(portal_messages.problems("zh_Hans"))
    assert f"untranslated: {singular[0].msgid!r}" in found
    assert f"fuzzy: {singular[1].msgid!r}" in found
    assert "stale: django.mo" in found


def test_a_string_added_to_a_template_is_missing_until_extracted(tmp_path, monkeypatch):
    templates = tmp_path / "portal" / "templates"
    templates.mkdir(parents=True)
    (templates / "page.html").write_text(
        "{% load i18n %}<h1>{% translate 'A new heading' %}</h1>"
        "{% blocktranslate count counter=n %}{{ counter }} leaf{% plural %}{{ counter }} leaves{% endblocktranslate %}"
        "{% translate 'May' context 'month' %}"
    )
    (tmp_path / "portal" / "forms.py").write_text(
        "from django.utils.translation import gettext_lazy as _\nX = _('Label')\n"
    )
    found = portal_messages.extract(tmp_path / "portal")
    assert set(found) == {("", "A new heading"), ("", "%(counter)s leaf"), ("month", "May"), ("", "Label")}
    assert found[("", "%(counter)s leaf")][0].msgid_plural == "%(counter)s leaves"


def test_the_committed_mo_loads_without_gettext():
    """Django reads the committed .mo as it is (the hub never compiles at run time)."""
    with translation.override("zh-hans"):
        assert translation.gettext("Sign in") == "登录"
        assert translation.ngettext("point", "points", 2) == "积分"
        assert translation.pgettext("per unit", "per km") == "每公里"


# --- No English on a Chinese page ---------------------------------------------------------------------

TRANSLATED_ATTRIBUTES = ("title", "alt", "aria-label", "placeholder")


class _Text(HTMLParser):
    """The visible text of a page, one entry per text node, and the attributes a person reads."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skipping += 1
        for name, value in attrs:
            if value and name in TRANSLATED_ATTRIBUTES:
                self.texts.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skipping -= 1

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if text and not self._skipping:
            self.texts.append(text)


def _pattern(msgid: str) -> re.Pattern[str]:
    """A msgid as a pattern of what it renders to, its placeholders standing for anything."""
    parts = re.split(r"%\(\w+\)[sd]", " ".join(msgid.split()))
    return re.compile(".+?".join(re.escape(part) for part in parts))


def english_on(html: str) -> list[str]:
    """The catalogue's English strings found on a page: a text node that is one of them (placeholders
    filled in), or, for sentences of four words or more, one of them anywhere in the page's text."""
    parser = _Text()
    parser.feed(html)
    page_text = " ".join(parser.texts)
    found = []
    for entry in catalogue():
        for msgid in filter(None, (entry.msgid, entry.msgid_plural)):
            if msgid in ALLOWED_IN_ENGLISH:
                continue
            pattern = _pattern(msgid)
            if any(pattern.fullmatch(text) for text in parser.texts) or (
                len(msgid.split()) >= 4 and pattern.search(page_text)
            ):
                found.append(msgid)
    return found


def _pages(client: Client, headers: dict[str, Any]) -> dict[str, str]:
    """Every page of the portal as its visitors see it: each route of portal.urls answering GET, for
    anyone, for a person and for an operator, and the pages of refusals and errors."""
    pages: dict[str, str] = {}
    paths = ["/" + str(pattern.pattern) for pattern in portal.urls.urlpatterns]
    assert {"/", "/signin/", "/standard/"} <= set(paths), paths
    person = Client()
    person.post("/signin/", {"username": "mei", "password": PASSWORD})
    operator = Client()
    operator.force_login(get_user_model().objects.create_user("ops", is_staff=True))
    for who, browser in (("anyone", client), ("person", person), ("operator", operator)):
        for path in paths:
            response = browser.get(path, **headers)
            if response.status_code in (301, 302, 405):
                continue  # a redirect or a POST-only route: no page
            pages[f"{who} GET {path}"] = response.content.decode()
    pages["not found"] = client.get("/no/such/page/", **headers).content.decode()
    pages["sign-in refused"] = client.post("/signin/", {"username": "mei", "password": "x"}, **headers).content.decode()
    pages["sign-in empty"] = client.post("/signin/", {}, **headers).content.decode()
    pages["sign-up refused"] = client.post(
        "/signup/", {"username": "a b", "password1": "1", "password2": "2"}, **headers
    ).content.decode()
    pages["sign-up taken"] = client.post(
        "/signup/", {"username": "mei", "password1": PASSWORD, "password2": PASSWORD}, **headers
    ).content.decode()
    pages["password refused"] = person.post(
        "/password/", {"old_password": "x", "new_password1": "1", "new_password2": "2"}, **headers
    ).content.decode()
    strict = Client(enforce_csrf_checks=True)
    pages["form expired"] = strict.post("/signin/", {"username": "mei"}, **headers).content.decode()
    language = "zh-hans" if headers is ZH else "en"
    with translation.override(language):
        pages["server error"] = render_to_string("500.html")
    return pages


@pytest.mark.django_db
def test_no_english_template_string_shows_on_a_chinese_page(client):
    make_person("mei")
    pages = _pages(client, ZH)
    leaks = {name: found for name, html in pages.items() if (found := english_on(html))}
    assert not leaks, leaks
    assert all('<html lang="zh-Hans"' in html for html in pages.values())


@pytest.mark.django_db
def test_the_english_check_can_fail(client):
    """The same pages in English are full of the catalogue's strings: the check above sees them."""
    make_person("mei")
    pages = _pages(client, EN)
    assert all(english_on(html) for html in pages.values()), [
        name for name, html in pages.items() if not english_on(html)
    ]


def test_templates_hold_no_text_outside_translation_tags():
    """Text a person reads is inside {% translate %} or {% blocktranslate %}; what is left between tags is
    markup, template variables and the few characters that read the same in every language."""
    leftovers: dict[str, list[str]] = {}
    for path in sorted(Path(portal_messages.PORTAL, "templates").rglob("*.html")):
        source = path.read_text()
        source = re.sub(r"{%\s*blocktranslate.*?endblocktranslate\s*%}", " ", source, flags=re.DOTALL)
        source = re.sub(r"{#.*?#}|{%.*?%}|{{.*?}}", " ", source, flags=re.DOTALL)
        source = re.sub(r"<!--.*?-->", " ", source, flags=re.DOTALL)
        parser = _Text()
        parser.feed(source)
        words = [text for text in parser.texts if re.search(r"[A-Za-z\u4e00-\u9fff]", text)]
        if words:
            leftovers[path.name] = words
    assert not leftovers, leftovers
