"""The demo's stories: the unified standard, a person linking accounts, a capped day, an act reported
twice and an action the standard does not know.

Each story sends its events one at a time through the real intake (order matters: caps and duplicate
checks depend on what came before), follows each with ``GET /api/v1/institutions/{code}/events/{id}``
and the institution's token until the hub has handled it, prints what came back and checks it. The
grams and points a story expects are worked out from the published standard
(``GET /api/v1/standard/scenarios``), so the stories check the hub against its own published figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from institutions.demo.client import Answer, Hub, Sender

EAST, WEST, METRO = "demo-bank-east", "demo-pay-west", "demo-metro-card"
ACTIVITY = "carbon.activity.recorded"
ACCOUNT_LINKED = "carbon.account.linked"
FOLLOW_TIMEOUT_SECONDS = 15.0
MILLI = Decimal("0.001")
CLEAN_PLATE = "food.clean_plate"
CAP_REACHED = "cap_reached"

# The unified standard: (institution, action, quantity and unit as sent, quantity in the scenario's unit).
UNITS_STORY = (
    (METRO, "transit.metro", "12.5", "km", "12.5"),
    (EAST, "transit.metro", "8400", "m", "8.4"),
    (WEST, "mobility.walking", "6000", "step", "6000"),
    (WEST, CLEAN_PLATE, "1", "check-in", "1"),
    (EAST, "paper.e_bill", "2", "bills", "2"),
    (EAST, "energy.electricity_saved", "1500", "Wh", "1.5"),
)


class StoryAborted(Exception):
    """A step the rest depends on failed: the hub unreachable, a request refused, an event not handled."""


@dataclass(frozen=True)
class Published:
    """A scenario as ``GET /api/v1/standard/scenarios`` publishes it."""

    unit: str
    grams_per_unit: Decimal
    day_cap: Decimal | None


@dataclass(frozen=True)
class Expect:
    """What the demo expects of a handled event: its status and some fields of its outcome."""

    status: str
    outcome: dict[str, Any]

    def mismatches(self, status: str, outcome: Any) -> list[str]:
        got = outcome if isinstance(outcome, dict) else {}
        problems = [] if status == self.status else [f"event status {status}, expected {self.status}"]
        return problems + [
            f"{key} {got.get(key)!r}, expected {want}"
            for key, want in self.outcome.items()
            if not _same(got.get(key), want)
        ]


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, Decimal):  # "8.4" and "8.400" are the same quantity
        try:
            return Decimal(str(got)) == want
        except InvalidOperation:
            return False
    return bool(got == want)


def _institutions(links: Any) -> str:
    return ", ".join(sorted(str(link.get("institution")) for link in links))


def _linked_at_east_and_west(links: Any) -> list[str]:
    found = {link.get("institution") for link in links}
    return [] if found == {EAST, WEST} else [f"linked at {sorted(map(str, found))}, expected {EAST} and {WEST}"]


def _wallet_line(wallet: Any) -> str:
    parts = ", ".join(f"{row.get('institution')} {row.get('points')}" for row in wallet.get("by_institution", []))
    return f"{wallet.get('points')} points ({wallet.get('grams')} g): {parts}"


def _pooled(wallet: Any, credited_mg: int) -> list[str]:
    """The wallet holds exactly what the person's activities were credited, from all three institutions."""
    problems = []
    issuers = {row.get("institution") for row in wallet.get("by_institution", [])}
    if issuers != {EAST, WEST, METRO}:
        problems.append(f"points from {sorted(issuers)}, expected {sorted({EAST, WEST, METRO})}")
    if Decimal(str(wallet.get("grams", "0"))) * 1000 != credited_mg:
        problems.append(f"{wallet.get('grams')} g in the wallet, {credited_mg / 1000:.3f} g credited")
    return problems


def describe(outcome: Any) -> str:
    """An event's outcome in a few words: what was measured and credited, whether it linked, or why not."""
    if not isinstance(outcome, dict) or not outcome:
        return "-"
    reason = outcome.get("reason")
    if "scenario" in outcome:
        text = (
            f"{outcome['scenario']} {outcome.get('quantity')} {outcome.get('unit')}: "
            f"{outcome.get('grams')} g, {outcome.get('points')} points"
        )
        if outcome.get("status") not in (None, "credited"):
            text += f", {outcome['status']}"
        return f"{text} ({reason})" if reason else text
    if "linked" in outcome:
        return "linked" if outcome["linked"] else f"not linked ({reason})"
    return ": ".join(str(part) for part in (reason, outcome.get("detail")) if part) or json.dumps(outcome)


class Storyteller:
    """Tells the stories through ``hub`` as the demo institutions and one new demo person."""

    def __init__(self, hub: Hub, senders: Iterable[Sender], *, run: str, write: Callable[[str], None]):
        self.hub = hub
        self.senders = {sender.code: sender for sender in senders}
        self.run = run
        self.suffix = run.rsplit("-", 1)[-1]
        self.write = write
        self.failures: list[str] = []
        self.standard: dict[str, Published] = {}
        self.person_token = ""
        self.key = ""
        self.stories = itertools.count(1)
        self.steps = itertools.count(1)
        # Every story act happens within one hour of yesterday (noon in China), so a day cap is one day.
        self.day = (datetime.now(UTC) - timedelta(days=1)).replace(hour=4, minute=0, second=0, microsecond=0)

    def tell(self) -> list[str]:
        """Tell every story in order; returns what went otherwise than the demo expects, one line each."""
        self.write("")
        self.write(
            "Stories: each event is sent on its own, then followed with GET /api/v1/institutions/{code}/events/{id}"
        )
        try:
            missing = sorted({EAST, WEST, METRO} - set(self.senders))
            if missing:
                raise StoryAborted(f"no credentials for {', '.join(missing)}; run manage.py demo_setup")
            self.standard = self._published_standard()
            self.units()
            self.linking()
            self.capped_day()
            self.reported_twice()
            self.pooled_wallet()
            self.unknown_action()
        except StoryAborted as exc:
            self.failures.append(f"story {self.key or 'setup'!r}: {exc}")
            self.write(f"  FAIL {exc}")
            self.write("       The remaining stories are skipped.")
        return self.failures

    # --- The stories ----------------------------------------------------------------------------------

    def units(self) -> None:
        self._begin(
            "units",
            "One standard, many units: each institution reports in its own unit, the hub measures",
            "in the scenario's unit with the factor it publishes.",
        )
        for code, action, quantity, unit, canonical in UNITS_STORY:
            self._act(code, "guest", action, quantity, unit, self._measured(action, canonical))

    def linking(self) -> None:
        username = f"demo-person-{self.suffix}"
        self._begin("link", f"A person links accounts: {username} signs up, then links {EAST} and {WEST}.")
        credentials = {"username": username, "password": secrets.token_urlsafe(18)}
        signed_up = self._person("POST", "/api/v1/auth/signup", 201, payload=credentials, show=lambda _: username)
        self.person_token = str(signed_up.get("token", ""))
        unlinked = self._measured("transit.metro", "5")
        self._act(EAST, "person", "transit.metro", "5", "km", unlinked, note="the subject's own: not linked yet")
        for code in (EAST, WEST):
            issued = self._person("POST", "/api/v1/me/link-codes", 201, show=lambda d: f"code {d.get('code')}")
            self._event(
                code,
                ACCOUNT_LINKED,
                "person",
                {"link_code": issued.get("code")},
                sent=f"{ACCOUNT_LINKED} with that code",
                expect=Expect("processed", {"linked": True, "reason": "linked"}),
            )
        self._person("GET", "/api/v1/me/links", 200, show=_institutions, check=_linked_at_east_and_west)
        note = "the person's now"
        self._act(EAST, "person", "paper.e_bill", "1", "bill", self._measured("paper.e_bill", "1"), note=note)
        self._act(
            WEST, "person", "mobility.walking", "8000", "steps", self._measured("mobility.walking", "8000"), note=note
        )

    def capped_day(self) -> None:
        published = self.standard.get(CLEAN_PLATE)
        cap = published.day_cap if published else None
        if cap is None or cap < 1:
            raise StoryAborted(f"the published standard has no day cap of at least 1 for {CLEAN_PLATE}")
        self._begin(
            "cap",
            f"A capped day: {CLEAN_PLATE} credits at most {cap} check-ins a day per person, whichever",
            "institution reports them (both accounts are the person's now).",
        )
        institutions = itertools.cycle((WEST, EAST))
        for _ in range(int(cap) - 1):
            self._act(next(institutions), "person", CLEAN_PLATE, "1", "checkin", self._measured(CLEAN_PLATE, "1"))
        partial = self._measured(CLEAN_PLATE, "2", credited="1", reason=CAP_REACHED)
        self._act(next(institutions), "person", CLEAN_PLATE, "2", "checkin", partial, note="one of the two fits")
        capped = self._measured(CLEAN_PLATE, "1", credited="0", status="capped", reason=CAP_REACHED)
        self._act(next(institutions), "person", CLEAN_PLATE, "1", "checkin", capped)

    def reported_twice(self) -> None:
        self._begin(
            "twice",
            "One act, two reports: the bank and the wallet both report the same utility payment",
            "(the same fingerprint); the person is credited once.",
        )
        fingerprint = hashlib.sha256(f"utility-bill|{self.suffix}|{self.day.date()}".encode()).hexdigest()
        action = "payment.online_utility"
        first = self._measured(action, "1")
        second = self._measured(action, "1", credited="0", status="duplicate", reason="duplicate_act")
        for code, expect in ((EAST, first), (WEST, second)):
            self._act(code, "person", action, "1", "payment", expect, fingerprint=fingerprint)

    def pooled_wallet(self) -> None:
        self._begin(
            "wallet",
            f"One pooled wallet: the person links {METRO} too; small balances from three institutions",
            "pool into one wallet, by issuer, with their expiry.",
        )
        issued = self._person("POST", "/api/v1/me/link-codes", 201, show=lambda d: f"code {d.get('code')}")
        self._event(
            METRO,
            ACCOUNT_LINKED,
            "person",
            {"link_code": issued.get("code")},
            sent=f"{ACCOUNT_LINKED} with that code",
            expect=Expect("processed", {"linked": True, "reason": "linked"}),
        )
        bus = self._measured("transit.bus", "1")
        self._act(METRO, "person", "transit.bus", "1", "trip", bus, note="the person's now")
        activities = self._person(
            "GET", "/api/v1/me/activities", 200, show=lambda d: f"{len(d.get('results', []))} activities"
        )
        credited_mg = sum(int(a.get("credited_mg", 0)) for a in activities.get("results", []))
        self._person("GET", "/api/v1/me/wallet", 200, show=_wallet_line, check=lambda d: _pooled(d, credited_mg))

    def unknown_action(self) -> None:
        self._begin(
            "unknown",
            "An action the standard does not know is quarantined, not dropped: an operator maps it",
            "(admin, Action mappings) and replays it (admin, Inbox events).",
        )
        self._act(METRO, "guest", "transit.hyperloop", "30", "km", Expect("quarantined", {"reason": "unknown_action"}))

    # --- Steps ----------------------------------------------------------------------------------------

    def _begin(self, key: str, title: str, *more: str) -> None:
        self.key = key
        self.write("")
        self.write(f"{next(self.stories)}. {title}")
        for line in more:
            self.write(f"   {line}")

    def _act(
        self,
        code: str,
        who: str,
        action: str,
        quantity: str,
        unit: str,
        expect: Expect,
        *,
        fingerprint: str = "",
        note: str = "",
    ) -> None:
        data = {"action": action, "quantity": quantity, "unit": unit}
        sent = f"{action} {quantity} {unit}"
        if fingerprint:
            data["fingerprint"] = fingerprint
            sent += f" #{fingerprint[:8]}"
        self._event(code, ACTIVITY, who, data, sent=sent, expect=expect, note=note)

    def _event(
        self, code: str, event_type: str, who: str, data: dict[str, Any], *, sent: str, expect: Expect, note: str = ""
    ) -> None:
        """Send one event as ``code`` for its subject ``who``, follow it until handled and check it."""
        sender = self.senders[code]
        number = next(self.steps)
        event_id = f"story-{self.run}-{self.key}-{number}"
        subject = f"{code.rsplit('-', 1)[-1]}-{who}-{self.suffix}"
        event = sender.event(event_id, event_type, subject, data, self.day + timedelta(minutes=number))
        answer = self._ask(
            self.hub.events_post,
            sender,
            json.dumps(event).encode(),
            msg_id=f"msg_{event_id}",
            versions=sender.signature_choices()[-1],
            batch=False,
        )
        results = answer.document.get("results") if isinstance(answer.document, dict) else None
        if answer.status != 202 or not results or results[0].get("status") != "accepted":
            raise StoryAborted(f"{code} {event_id}: HTTP {answer.status}: {results or answer.detail}")

        followed = self._ask(self.hub.event_follow, sender, event_id, timeout=FOLLOW_TIMEOUT_SECONDS)
        document = followed.document if isinstance(followed.document, dict) else {}
        status = str(document.get("status", "?"))
        if followed.status != 200:
            raise StoryAborted(f"GET {code} event {event_id}: HTTP {followed.status}: {followed.detail}")
        if status == "received":
            raise StoryAborted(
                f"{code} event {event_id} still received after {FOLLOW_TIMEOUT_SECONDS:g} s: "
                "is anything processing the inbox (a Celery worker, with REDIS_URL set)?"
            )
        shown = describe(document.get("outcome"))
        self._line(
            code,
            sent,
            status,
            f"{shown}; {note}" if note else shown,
            expect.mismatches(status, document.get("outcome")),
        )

    def _person(
        self,
        method: str,
        path: str,
        status: int,
        *,
        payload: Any = None,
        show: Callable[[Any], str] = lambda document: "",
        check: Callable[[Any], list[str]] = lambda document: [],
    ) -> Any:
        """A call of the person's app with their token; raises :class:`StoryAborted` on another status."""
        authorization = f"Token {self.person_token}" if self.person_token else ""
        answer = self._ask(self.hub.call, method, path, payload=payload, authorization=authorization)
        if answer.status != status:
            raise StoryAborted(f"{method} {path}: HTTP {answer.status}, expected {status}: {answer.detail}")
        self._line("person", f"{method} {path}", str(answer.status), show(answer.document), check(answer.document))
        return answer.document

    def _line(self, who: str, sent: str, status: str, shown: str, problems: list[str]) -> None:
        self.write(f"  {'ok' if not problems else 'FAIL':<4} {who:<16} {sent:<42} {status:<11} {shown}")
        if problems:
            self.failures.append(f"story {self.key!r}, {who} {sent}: " + "; ".join(problems))
            self.write(f"       expected otherwise: {'; '.join(problems)}")

    @staticmethod
    def _ask(call: Callable[..., Answer], *args: Any, **kwargs: Any) -> Answer:
        try:
            return call(*args, **kwargs)
        except OSError as exc:
            raise StoryAborted(f"the hub cannot be reached: {exc}") from exc

    # --- The standard ---------------------------------------------------------------------------------

    def _published_standard(self) -> dict[str, Published]:
        answer = self._ask(self.hub.call, "GET", "/api/v1/standard/scenarios")
        if answer.status != 200 or not isinstance(answer.document, dict):
            raise StoryAborted(f"GET /api/v1/standard/scenarios: HTTP {answer.status}: {answer.detail}")
        published = {}
        for scenario in answer.document.get("scenarios", []):
            if scenario.get("factor"):
                caps = {cap["period"]: Decimal(cap["max_quantity"]) for cap in scenario.get("caps", [])}
                published[scenario["code"]] = Published(
                    scenario["unit"], Decimal(scenario["factor"]["grams_per_unit"]), caps.get("day")
                )
        return published

    def _measured(
        self,
        scenario: str,
        quantity: str,
        *,
        credited: str | None = None,
        status: str = "credited",
        reason: str | None = None,
    ) -> Expect:
        """The outcome the published standard gives ``quantity`` (in the scenario's unit) of an
        automatically recorded act of which ``credited`` (default: all) counts."""
        published = self.standard.get(scenario)
        if published is None:
            raise StoryAborted(f"{scenario} has no factor in the published standard")
        measured = Decimal(quantity)
        counted = measured if credited is None else Decimal(credited)
        credited_mg = (counted * published.grams_per_unit * 1000).quantize(Decimal(1), ROUND_HALF_EVEN)
        return Expect(
            "processed",
            {
                "scenario": scenario,
                "quantity": measured,
                "unit": published.unit,
                "grams": (measured * published.grams_per_unit).quantize(MILLI, ROUND_HALF_EVEN),
                "points": int(credited_mg) // 1000,
                "status": status,
                "reason": reason,
            },
        )
