"""The Content-Security-Policy the persons' pages brought covers every HTML page of the hub: the admin and
the API's documentation must work under it too, with no violation in the browser."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from tests.portal.browser.harness import DESKTOP, Site

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "an operator's long passphrase"


def test_the_admin_and_the_api_docs_run_under_the_policy_and_an_operator_gets_a_page_here(site: Site) -> None:
    get_user_model().objects.create_superuser("ops", password=PASSWORD)
    with site.page(language="en", width=DESKTOP) as visit:
        page = visit.page
        visit.goto(site.at("/admin/login/"))
        visit.fill({"username": "ops", "password": PASSWORD})
        with page.expect_navigation(wait_until="load"):
            page.locator("input[type=submit]").click()
        assert page.locator("#site-name").count() == 1
        for path in ("/admin/wallets/person/", "/admin/auth/user/add/", "/admin/settlement/cycle/"):
            visit.goto(site.at(path))
        visit.goto(site.at("/api/v1/docs/"))
        page.locator(".swagger-ui .info").wait_for()  # drawn by its script: the page's code ran
        assert not visit.problems, visit.problems

        visit.goto(site.at("/"))
        assert visit.heading() == "This account has no carbon account"
        visit.audit("operator")
