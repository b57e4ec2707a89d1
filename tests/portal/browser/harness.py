"""The browser-test harness of the persons' pages: Debian's Chromium driven by Playwright for Python.

What it offers a test (through the fixtures of ``conftest.py`` beside it):

* ``browser``: one headless Chromium for the whole session (``/usr/bin/chromium``, or
  ``HUB_CHROMIUM``); Playwright never downloads a browser here. Without Chromium or Playwright the
  browser tests skip, saying why, or fail under ``CLEARINGHOUSE_REQUIRE_SERVICES=1`` (CI).
* ``site``: the hub on a live server (pytest-django's, on the suite's PostgreSQL test database) and
  :meth:`Site.page`, a fresh browser (own cookies) at a width and an ``Accept-Language``.
* :meth:`Visit.audit`: the page reloaded in both languages at 360 px and 1280 px; at each, no
  horizontal scrolling, no control under 44 x 44 px, no axe-core violation of impact serious or
  critical, no Content-Security-Policy complaint, no failed request, and a full-page screenshot in
  ``var/screenshots/`` (git-ignored), named ``<name>-<language>-<width>.png``; then back to the
  language and width it had.
* :meth:`Visit.check`: the same checks and one screenshot of the page as it is now (after a POST, say).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
SCREENSHOTS = Path(os.environ.get("HUB_SCREENSHOTS_DIR") or ROOT / "var" / "screenshots")
CHROMIUM = os.environ.get("HUB_CHROMIUM") or "/usr/bin/chromium"
PHONE, DESKTOP = 360, 1280
WIDTHS = (PHONE, DESKTOP)
LANGUAGES = {"zh-hans": "zh-CN,zh;q=0.9", "en": "en-GB,en;q=0.9"}
# What fails a page: axe-core's two highest impacts.
FAILING_IMPACTS = ("serious", "critical")
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_problem() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
        from axe_playwright_python.sync_playwright import Axe  # noqa: F401
    except ImportError as error:
        return f"Playwright or axe-playwright-python is not installed ({error}): pip install -e '.[dev]'"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium fonts-noto-cjk)"
    return None


def launch_arguments() -> list[str]:
    # Chromium refuses to run as root with its sandbox on (CI runs as root).
    return CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else [])


@dataclass
class Visit:
    """A page of a fresh browser context, and what went wrong on it since it opened."""

    page: Any
    language: str
    width: int
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        self.page.on("requestfailed", lambda request: self.problems.append(f"request failed: {request.url}"))
        self.page.on("response", self._response)

    def _console(self, message: Any) -> None:
        document = message.location.get("url") == self.page.url
        if document and message.text.startswith("Failed to load resource"):
            return  # the page's own status (a 403, 404 or 429 page): the test asserts it
        if message.type == "error" or "Content Security Policy" in message.text:
            self.problems.append(f"console {message.type}: {message.text} ({message.location.get('url')})")

    def _response(self, response: Any) -> None:
        # A page's own answer may be an error on purpose (404 page, 429 refusal); its assets may not.
        if response.status >= 400 and response.request.resource_type != "document":
            self.problems.append(f"{response.status} for {response.url}")

    # --- Navigation ------------------------------------------------------------------------------

    def goto(self, url: str) -> Any:
        return self.page.goto(url, wait_until="load")

    def submit(self, button_name: str) -> None:
        with self.page.expect_navigation(wait_until="load"):
            self.page.get_by_role("button", name=button_name, exact=True).click()

    def fill(self, fields: dict[str, str]) -> None:
        for name, value in fields.items():
            self.page.locator(f"[name={name}]").fill(value)

    def heading(self) -> str:
        headings = self.page.locator("h1")
        assert headings.count() == 1, f"{headings.count()} <h1> on {self.page.url}"
        return str(headings.inner_text()).strip()

    # --- Checks ------------------------------------------------------------------------------------

    def check(self, name: str) -> None:
        """No horizontal scrolling, no serious or critical axe violation, no CSP complaint or failed
        request so far, and a screenshot of the page as it is (``<name>-<language>-<width>.png``)."""
        language = self.page.evaluate("document.documentElement.lang")
        self.screenshot(f"{name}-{language.lower()}-{self.width}")
        overflow = self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name}: {overflow} px of horizontal scrolling at {self.width} px"
        small = self.page.evaluate(SMALL_TARGETS)
        assert not small, f"{name} ({language}, {self.width} px): touch targets under 44 px: {small}"
        violations = axe_violations(self.page)
        assert not violations, f"{name} ({language}, {self.width} px): " + "; ".join(violations)
        assert not self.problems, f"{name}: " + "; ".join(self.problems)

    def audit(self, name: str) -> None:
        """:meth:`check` of this page reloaded in each language at each width, then back as it was."""
        context = self.page.context
        cookies = context.cookies()
        width = self.width
        try:
            for language in LANGUAGES:
                context.add_cookies([{"name": "django_language", "value": language, "url": self.page.url}])
                for each in WIDTHS:
                    self.resize(each)
                    self.page.reload(wait_until="load")
                    self.check(name)
        finally:
            context.clear_cookies()
            context.add_cookies(cookies)
            self.resize(width)
            self.page.reload(wait_until="load")

    def resize(self, width: int) -> None:
        self.width = width
        self.page.set_viewport_size({"width": width, "height": 800})

    def screenshot(self, stem: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{stem}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


# Controls a finger must hit: at least 44 x 44 CSS px (links inside a sentence are exempt, as in WCAG 2.5.5).
# Returns the offenders as "tag.class text WxH".
SMALL_TARGETS = """
() => [...document.querySelectorAll(
    'button, input:not([type=hidden]), select, textarea, summary, nav a, a.button, a.brand, .site-footer a'
  )]
  .filter(element => element.getClientRects().length > 0)
  .map(element => [element, element.getBoundingClientRect()])
  .filter(([element, box]) => box.width < 44 || box.height < 44)
  .map(([element, box]) => `${element.tagName.toLowerCase()}.${element.className} `
    + `"${(element.innerText || element.value || '').trim().slice(0, 30)}" `
    + `${Math.round(box.width)}x${Math.round(box.height)}`)
"""

_axe: Any = None


def axe_violations(page: Any) -> list[str]:
    """axe-core's violations of impact serious or critical on ``page``, one line each."""
    global _axe
    from axe_playwright_python.sync_playwright import Axe

    _axe = _axe or Axe()
    results = _axe.run(page)
    found = []
    for violation in results.response["violations"]:
        if violation.get("impact") in FAILING_IMPACTS:
            targets = [", ".join(node["target"]) for node in violation["nodes"]][:5]
            found.append(f"{violation['id']} ({violation['impact']}): {violation['help']} at {targets}")
    return found


@dataclass
class Site:
    """The hub on a live server, and fresh browsers on it."""

    url: str
    browser: Any

    @contextmanager
    def page(self, *, language: str = "zh-hans", width: int = PHONE) -> Iterator[Visit]:
        context = self.browser.new_context(
            viewport={"width": width, "height": 800},
            extra_http_headers={"Accept-Language": LANGUAGES[language]},
            locale="zh-CN" if language == "zh-hans" else "en-GB",
        )
        try:
            visit = Visit(context.new_page(), language, width)
            yield visit
        finally:
            context.close()

    def at(self, path: str) -> str:
        return self.url + path
