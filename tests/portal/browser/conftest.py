"""Fixtures of the browser tests (harness.py says what they offer)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.portal.browser.harness import CHROMIUM, Site, chromium_problem, launch_arguments


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the session's browser tests."""
    problem = chromium_problem()
    if problem is not None:
        if os.environ.get("CLEARINGHOUSE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"CLEARINGHOUSE_REQUIRE_SERVICES=1 and the browser tests cannot run: {problem}")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    # Playwright's synchronous API keeps an event loop in this thread, where Django then refuses ORM calls
    # as if from async code (SynchronousOnlyOperation); the tests' own ORM calls are synchronous.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=launch_arguments())
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def site(browser: Any, live_server: Any) -> Site:
    """The hub on pytest-django's live server (this process, the suite's test database)."""
    return Site(url=live_server.url, browser=browser)
