"""A person's account in a real browser: open one in Chinese, sign out and in, change the password,
switch to English; the public standard; each at 360 px and at desktop width, every page audited
(harness.Visit.audit: both languages, both widths, axe-core, no horizontal scrolling, screenshots)."""

from __future__ import annotations

import re
from datetime import date

import pytest
from django.contrib.auth import get_user_model

from tests.conftest import make_sender
from tests.portal.browser.harness import DESKTOP, PHONE, Site
from tests.wallets.conftest import credit
from wallets.models import Person

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "green tea and a metro ride"
NEW_PASSWORD = "a bicycle under the plane trees"


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
def test_a_person_opens_an_account_in_chinese_and_manages_it(site: Site, width: int) -> None:
    audit = width == PHONE  # every page is audited at both widths once; the desktop run walks the flow only
    with site.page(language="zh-hans", width=width) as visit:
        page = visit.page
        visit.goto(site.at("/"))
        assert visit.heading() == "您的低碳积分，汇集到一个账户"
        if audit:
            visit.audit("landing")

        page.get_by_role("link", name="注册账户").first.click()
        assert visit.heading() == "注册账户"
        if audit:
            visit.audit("signup")
        # A mismatch first: the errors are tied to their fields.
        visit.fill({"username": "xiaoming", "password1": PASSWORD, "password2": PASSWORD + "!"})
        visit.submit("立即注册")
        assert page.locator("#id_password2").get_attribute("aria-invalid") == "true"
        assert "id_password2_errors" in (page.locator("#id_password2").get_attribute("aria-describedby") or "")
        assert "两次输入的密码不一致" in page.locator("#id_password2_errors").inner_text()
        if audit:
            visit.check("signup-errors")
        visit.fill({"password1": PASSWORD, "password2": PASSWORD})
        visit.submit("立即注册")

        assert visit.heading() == "我的碳账户"
        assert page.locator(".balance__number").inner_text() == "0"
        assert "欢迎" in page.locator(".messages").inner_text()
        assert Person.objects.filter(user__username="xiaoming").exists()
        if audit:
            visit.audit("home-empty")
            person = Person.objects.get(user__username="xiaoming")
            credit(person.pk, make_sender("bank-a").institution.pk, date(2031, 1, 31), 12_345_678)
            credit(person.pk, make_sender("green-pay").institution.pk, date(2030, 6, 30), 2_000_000)
            page.reload()
            assert page.locator(".balance__number").inner_text() == "14,345"
            visit.audit("home")

        visit.submit("退出登录")
        assert visit.heading() == "您的低碳积分，汇集到一个账户"
        assert "您已安全退出" in page.locator(".messages").inner_text()

        page.get_by_role("link", name="登录").first.click()
        visit.fill({"username": "xiaoming", "password": "not it at all"})
        visit.submit("登录")
        assert "用户名或密码不正确" in page.locator(".alert").inner_text()
        if audit:
            visit.check("signin-errors")
            visit.audit("signin")
        visit.fill({"username": "xiaoming", "password": PASSWORD})
        visit.submit("登录")
        assert visit.heading() == "我的碳账户"

        page.get_by_role("link", name="密码").click()
        assert visit.heading() == "修改密码"
        if audit:
            visit.audit("password")
        visit.fill({"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
        visit.submit("修改密码")
        assert "密码已修改" in page.locator(".messages").inner_text()
        assert get_user_model().objects.get(username="xiaoming").check_password(NEW_PASSWORD)

        visit.submit("English")
        assert visit.heading() == "My carbon account"
        assert page.evaluate("document.documentElement.lang") == "en"
        page.get_by_role("link", name="Standard", exact=True).click()
        assert visit.heading() == "The carbon standard"
        assert re.search(r"46\.8 g CO₂e per km", page.locator("main").inner_text())
        # The choice persists: a new visit in this browser stays in English whatever the browser asks.
        visit.goto(site.at("/"))
        assert visit.heading() == "My carbon account"


def test_the_standard_is_public(site: Site) -> None:
    with site.page(language="zh-hans") as visit:
        visit.goto(site.at("/standard/"))
        assert visit.heading() == "碳减排核算标准"
        text = visit.page.locator("main").inner_text()
        assert "每公里 46.8 克 CO₂e" in text
        assert "2021年1月1日" in text
        visit.page.locator("details summary").first.click()
        visit.check("standard-history-open")
        visit.audit("standard")
