"""The demo's stories: the unified standard, a person linking accounts, a capped day, an act reported
twice, a pooled wallet, an action the standard does not know, a redemption the pooled balance pays and
a settlement cycle.

Each story sends its events one at a time through the real intake (order matters: caps and duplicate
checks depend on what came before), follows each with ``GET /api/v1/institutions/{code}/events/{id}``
and the institution's token until the hub has handled it, prints what came back and checks it. The
grams and points a story expects are worked out from the published standard
(``GET /api/v1/standard/scenarios``), so the stories check the hub against its own published figures.
The last two stories also wait for the demo receiver's answers to the hub's webhooks, and check the
settlement statements by recomputing their digests from their lines as an institution would.
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

from demo.client import Answer, Hub, Sender
from demo.management.commands.demo_setup import PROVIDER
from demo.receiver import DemoReceiver, Reply

EAST, WEST, METRO = "demo-bank-east", "demo-pay-west", "demo-metro-card"
ACTIVITY = "carbon.activity.recorded"
ACCOUNT_LINKED = "carbon.account.linked"
FOLLOW_TIMEOUT_SECONDS = 15.0
MILLI = Decimal("0.001")
STATEMENT_INDENT = 7 + 16 + 1 + 42 + 1 + 11 + 1  # under the "shown" column of a step's line
CLEAN_PLATE = "food.clean_plate"
CAP_REACHED = "cap_reached"
REDEMPTIONS = "/api/v1/me/redemptions"
POOLED_REWARD = "demo-tote-bag"  # more than any issuer's share, and than any two: only the pool reaches it
OUT_OF_REACH = "demo-bike-year"
REPLY_TIMEOUT_SECONDS = 15.0
# HUB_SETTLEMENT_MIN_MINOR (100 fen) would roll the demo's few fen forward; the demo settles from 1 fen.
DEMO_SETTLEMENT_MINIMUM_MINOR = 1

# The unified standard: (institution, action, quantity and unit as sent, quantity in the scenario's unit).
UNITS_STORY = (
    (METRO, "transit.metro", "12.5", "km", "12.5"),
    (EAST, "transit.metro", "8400", "m", "8.4"),
    (WEST, "mobility.walking", "6000", "step", "6000"),
    (WEST, CLEAN_PLATE, "1", "check-in", "1"),
    (EAST, "paper.e_bill", "2", "bills", "2"),
    (EAST, "energy.electricity_saved", "1500", "Wh", "1.5"),
)


@dataclass(frozen=True)
class Settled:
    """A settlement cycle the operator ran: its id and its instructions (each as its webhook's data,
    plus the ``institution`` code), and every institution with a net position in it."""

    cycle_id: int
    instructions: list[dict[str, Any]]
    institutions: list[str]


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


def _points_by_issuer(wallet: Any) -> dict[str, int]:
    return {str(row.get("institution")): int(row.get("points", 0)) for row in wallet.get("by_institution", [])}


def _only_the_pool_reaches(wallet: Any, price: int) -> list[str]:
    """Every issuer's share is under ``price``, and so is every two issuers' together; the pool is not."""
    shares = _points_by_issuer(wallet)
    total = int(wallet.get("points", 0))
    if set(shares) != {EAST, WEST, METRO}:
        return [f"points from {sorted(shares)}, expected {sorted({EAST, WEST, METRO})}"]
    problems = [] if total >= price else [f"{total} points pooled, under the price {price}"]
    if total - min(shares.values()) >= price:
        problems.append(f"two issuers' {total - min(shares.values())} points alone reach the price {price}")
    return problems


def _catalogue_line(catalogue: Any) -> str:
    return ", ".join(f"{r.get('code')} {r.get('points')}" for r in catalogue if isinstance(r, dict))


def _redemption_line(redemption: Any) -> str:
    parts = ", ".join(f"{a.get('institution')} {a.get('points')}" for a in redemption.get("allocations", []))
    text = f"{redemption.get('id')} {redemption.get('status')}, {redemption.get('points')} points: {parts}"
    return text + (f", voucher {redemption['voucher']}" if redemption.get("voucher") else "")


def _held_across_the_issuers(redemption: Any, price: int) -> list[str]:
    allocated = {str(a.get("institution")): int(a.get("points", 0)) for a in redemption.get("allocations", [])}
    problems = [] if redemption.get("status") == "pending" else [f"status {redemption.get('status')}, expected pending"]
    if redemption.get("points") != price or sum(allocated.values()) != price:
        problems.append(f"{redemption.get('points')} points allocated as {allocated}, expected {price}")
    if {code for code, points in allocated.items() if points > 0} != {EAST, WEST, METRO}:
        problems.append(f"allocated from {sorted(allocated)}, expected all of {EAST}, {WEST} and {METRO}")
    return problems


def _problem_code(expected: str) -> Callable[[Any], list[str]]:
    def check(document: Any) -> list[str]:
        code = document.get("code") if isinstance(document, dict) else None
        return [] if code == expected else [f"problem {code!r}, expected {expected!r}"]

    return check


def statement_digest(lines: Iterable[dict[str, Any]]) -> str:
    """The digest of a statement's obligation lines, recomputed as an institution would from the documented
    canonical form (``id|source|debtor|creditor|amount_minor|currency``, the hub as empty, lines sorted by
    their bytes, each ending in a newline), independently of the hub's own code."""
    canonical = sorted(
        "|".join(
            (
                str(line["id"]),
                str(line["source"]),
                line["debtor"] or "",
                line["creditor"] or "",
                str(int(line["amount_minor"])),
                str(line["currency"]),
            )
        ).encode()
        + b"\n"
        for line in lines
    )
    return "sha256:" + hashlib.sha256(b"".join(canonical)).hexdigest()


def _statement_problems(statement: dict[str, Any], code: str, instruction: dict[str, Any] | None) -> list[str]:
    """What in one institution's statement does not add up: lines, totals, digest, net, instruction."""
    obligations = statement.get("obligations") or {}
    lines = obligations.get("lines") or []
    gross_in = sum(int(line["amount_minor"]) for line in lines if line.get("creditor") == code)
    gross_out = sum(int(line["amount_minor"]) for line in lines if line.get("debtor") == code)
    problems = []
    if obligations.get("count") != len(lines):
        problems.append(f"count {obligations.get('count')} for {len(lines)} lines")
    if (obligations.get("gross_in_minor"), obligations.get("gross_out_minor")) != (gross_in, gross_out):
        problems.append(
            f"gross in/out {obligations.get('gross_in_minor')}/{obligations.get('gross_out_minor')}, "
            f"the lines add up to {gross_in}/{gross_out}"
        )
    recomputed = statement_digest(lines)
    if obligations.get("digest") != recomputed:
        problems.append(f"digest {obligations.get('digest')}, the lines give {recomputed}")
    if instruction is not None and instruction.get("statement_digest") != recomputed:
        problems.append(f"the instruction's digest {instruction.get('statement_digest')}, the lines give {recomputed}")
    net = statement.get("net_minor")
    if net != gross_in - gross_out:
        problems.append(f"net {net}, gross in - gross out is {gross_in - gross_out}")
    listed = statement.get("instruction") or {}
    signed = 0
    if instruction is not None:
        sign = -1 if instruction["direction"] == "pay" else 1
        signed = sign * int(instruction["amount_minor"])
        expected = (instruction["instruction_id"], _confirmed(instruction))
        if (listed.get("instruction_id"), listed.get("state")) != expected:
            problems.append(f"instruction {listed.get('instruction_id')} {listed.get('state')}, expected it confirmed")
        confirmation = statement.get("confirmation") or {}
        if confirmation.get("status") != _confirmed(instruction):
            problems.append(f"confirmation {confirmation.get('status')}, expected {_confirmed(instruction)}")
    if net != signed + int(statement.get("closing_minor", 0)):
        problems.append(f"net {net} is not instructed {signed} + closing {statement.get('closing_minor')}")
    return problems


def _money(amount_minor: Any, currency: str) -> str:
    return f"{amount_minor} fen" if currency == "CNY" else f"{amount_minor} {currency} minor units"


def _confirmed(instruction: dict[str, Any]) -> str:
    return "paid" if instruction["direction"] == "pay" else "received"


def _statement_text(statement: dict[str, Any]) -> list[str]:
    obligations = statement.get("obligations") or {}
    instruction = statement.get("instruction")
    confirmation = statement.get("confirmation")
    lines = [
        f"opening {statement.get('opening_minor')}; {obligations.get('count')} obligation(s): "
        f"in {obligations.get('gross_in_minor')}, out {obligations.get('gross_out_minor')}, "
        f"digest {obligations.get('digest')}",
        f"net {statement.get('net_minor'):+}; "
        + (
            f"instruction {instruction['direction']} {_money(instruction['amount_minor'], instruction['currency'])} "
            f"on {instruction['value_date']}, {instruction['state']}"
            if instruction
            else "no instruction"
        )
        + (f"; confirmation {confirmation['status']} {confirmation['reference']}" if confirmation else "")
        + f"; closing {statement.get('closing_minor')}",
    ]
    return lines


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
    if "result" in outcome:  # a provider's answer to a redemption
        text = f"{outcome['result']} {outcome.get('redemption_id')}"
        return f"{text} ({reason})" if reason else text
    if "confirmed" in outcome:  # an institution's confirmation of a settlement instruction
        if not outcome["confirmed"]:
            return f"not confirmed ({reason})"
        return f"confirmed {outcome.get('status')}; cycle {outcome.get('cycle_id')} {outcome.get('cycle_state')}"
    return ": ".join(str(part) for part in (reason, outcome.get("detail")) if part) or json.dumps(outcome)


class Storyteller:
    """Tells the stories through ``hub`` as the demo institutions and one new demo person."""

    def __init__(
        self,
        hub: Hub,
        senders: Iterable[Sender],
        *,
        run: str,
        write: Callable[[str], None],
        receiver: DemoReceiver,
        settle: Callable[[int], Settled | None],
    ):
        self.hub = hub
        self.senders = {sender.code: sender for sender in senders}
        self.receiver = receiver
        self.settle = settle
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
            missing = sorted({EAST, WEST, METRO, PROVIDER} - set(self.senders))
            if missing:
                raise StoryAborted(f"no credentials for {', '.join(missing)}; run manage.py demo_setup")
            self.standard = self._published_standard()
            self.units()
            self.linking()
            self.capped_day()
            self.reported_twice()
            self.pooled_wallet()
            self.unknown_action()
            self.redemption()
            self.settlement()
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

    def redemption(self) -> None:
        self._begin(
            "redeem",
            f"Small balances pool past a reward's price: the person redeems {POOLED_REWARD}, which costs more",
            "than any one issuer's points (and any two issuers'); the hold takes points from all three, and",
            f"{PROVIDER}'s receiver (a verified carbon.redemption.requested webhook) fulfils it with a voucher.",
        )
        catalogue = self._person("GET", "/api/v1/rewards", 200, show=_catalogue_line)
        prices = {r.get("code"): r.get("points") for r in catalogue if isinstance(r, dict)}
        price = prices.get(POOLED_REWARD)
        if not isinstance(price, int) or OUT_OF_REACH not in prices:
            raise StoryAborted(f"the catalogue lacks {POOLED_REWARD} or {OUT_OF_REACH}; run manage.py demo_setup")
        before = self._person(
            "GET", "/api/v1/me/wallet", 200, show=_wallet_line, check=lambda d: _only_the_pool_reaches(d, price)
        )
        request = {"reward": POOLED_REWARD, "quantity": 1}
        key = {"Idempotency-Key": f"demo-{self.run}-{POOLED_REWARD}"}
        held = self._person(
            "POST",
            REDEMPTIONS,
            201,
            payload=request,
            headers=key,
            show=_redemption_line,
            check=lambda d: _held_across_the_issuers(d, price),
        )
        self._person(
            "POST",
            REDEMPTIONS,
            201,
            payload=request,
            headers=key,
            show=lambda d: f"the same Idempotency-Key again: {d.get('id')}, the first answer",
            check=lambda d: [] if d == held else [f"answered {d}, not the first answer {held}"],
        )
        redemption_id = str(held.get("id"))
        reply = self._reply(f"redemption:{redemption_id}", f"carbon.redemption.requested for {redemption_id}")
        voucher = reply.data.get("voucher")
        self._line(PROVIDER, "webhook carbon.redemption.requested", "verified", f"{redemption_id}: hands it out", [])
        self._follow(
            PROVIDER,
            reply.event_id,
            sent="carbon.redemption.fulfilled",
            expect=Expect("processed", {"result": "fulfilled", "status": "fulfilled"}),
            note=f"voucher {voucher}",
        )

        def fulfilled(page: Any) -> list[str]:
            mine = [r for r in page.get("results", []) if r.get("id") == redemption_id]
            if not mine:
                return [f"{redemption_id} is not listed"]
            got = (mine[0].get("status"), mine[0].get("voucher"))
            return [] if got == ("fulfilled", voucher) else [f"{got}, expected ('fulfilled', {voucher!r})"]

        self._person(
            "GET",
            REDEMPTIONS,
            200,
            show=lambda d: next(
                (_redemption_line(r) for r in d.get("results", []) if r.get("id") == redemption_id), ""
            ),
            check=fulfilled,
        )
        spent = int(before.get("points", 0)) - price
        self._person(
            "GET",
            "/api/v1/me/wallet",
            200,
            show=lambda d: f"{_wallet_line(d)} (was {before.get('points')}, less {price})",
            check=lambda d: [] if d.get("points") == spent else [f"{d.get('points')} points, expected {spent}"],
        )
        self._person(
            "POST",
            REDEMPTIONS,
            409,
            payload={"reward": OUT_OF_REACH, "quantity": 1},
            headers={"Idempotency-Key": f"demo-{self.run}-{OUT_OF_REACH}"},
            show=lambda d: f"{d.get('code')}: {d.get('detail')}",
            check=_problem_code("insufficient-points"),
        )

    def settlement(self) -> None:
        minimum = DEMO_SETTLEMENT_MINIMUM_MINOR
        self._begin(
            "settle",
            "Settlement: the operator runs a cycle (cut, net through the hub, instruct). The redemption's",
            "obligations come to a few fen; HUB_SETTLEMENT_MIN_MINOR would carry nets that small forward, so the",
            f"demo runs the cycle with a minimum of {minimum} fen. Each institution's receiver gets its signed",
            "instruction and confirms it; each statement is fetched, its digest recomputed from its lines.",
        )
        settled = self.settle(minimum)
        if settled is None:
            raise StoryAborted("the cycle found nothing to settle: the redemption left no obligation")
        self._line(
            "operator",
            f"settlement_run --minimum-minor {minimum}",
            f"cycle {settled.cycle_id}",
            f"{len(settled.instructions)} instruction(s) for {', '.join(settled.institutions)}",
            [] if settled.instructions else ["no instruction"],
        )
        by_code = {i["institution"]: i for i in settled.instructions}
        for instruction in settled.instructions:
            code = instruction["institution"]
            want = "receive" if code == PROVIDER else "pay"
            amount = _money(instruction["amount_minor"], instruction["currency"])
            self._line(
                code,
                f"instruction {instruction['direction']} {amount}",
                str(instruction["value_date"]),
                f"{instruction['instruction_id']}, digest {instruction['statement_digest']}",
                [] if instruction["direction"] == want else [f"direction {instruction['direction']}, expected {want}"],
            )
        if PROVIDER not in by_code:
            self.failures.append(f"story 'settle': no instruction for {PROVIDER}, the redemption's creditor")
        for instruction in settled.instructions:
            code, instruction_id = instruction["institution"], instruction["instruction_id"]
            reply = self._reply(f"instruction:{instruction_id}", f"carbon.settlement.instruction {instruction_id}")
            self._follow(
                code,
                reply.event_id,
                sent=f"carbon.settlement.confirmed {reply.data['status']}",
                expect=Expect("processed", {"confirmed": True, "status": _confirmed(instruction)}),
                note=f"bank reference {reply.data['reference']}",
            )
        nets: dict[str, int] = {}
        hub_lines: dict[Any, int] = {}
        states = set()
        for code in settled.institutions:
            statement = self._statement(code, settled.cycle_id, by_code.get(code))
            nets[code] = int(statement.get("net_minor", 0))
            states.add(statement.get("cycle_state"))
            for line in (statement.get("obligations") or {}).get("lines") or []:
                if line.get("creditor") is None or line.get("debtor") is None:  # the hub's own (carries)
                    hub_lines[line["id"]] = int(line["amount_minor"]) * (1 if line.get("creditor") is None else -1)
        hub = sum(hub_lines.values())
        total = sum(nets.values()) + hub
        shown = ", ".join(f"{code} {net:+}" for code, net in nets.items()) + f", hub {hub:+}: sum {total}"
        problems = [] if total == 0 else [f"the nets sum to {total}, not 0"]
        if states != {"reconciled"}:
            problems.append(f"cycle state {sorted(map(str, states))}, expected reconciled")
        self._line("hub", f"nets of cycle {settled.cycle_id}", ", ".join(sorted(map(str, states))), shown, problems)

    # --- Steps ----------------------------------------------------------------------------------------

    def _reply(self, key: str, webhook: str) -> Reply:
        """The demo receiver's answer to a webhook, sent through the intake; aborts when none came."""
        reply = self.receiver.reply_to(key, timeout=REPLY_TIMEOUT_SECONDS)
        if reply is None:
            refused = f" (it refused: {'; '.join(self.receiver.refused[-3:])})" if self.receiver.refused else ""
            raise StoryAborted(
                f"the demo receiver at {self.receiver.url} got no {webhook} within {REPLY_TIMEOUT_SECONDS:g} s"
                f"{refused}: does the hub deliver to loopback endpoints (HUB_ALLOW_PRIVATE_ENDPOINTS=1)?"
            )
        if not reply.accepted:
            status = reply.answer.status if reply.answer else "-"
            detail = reply.error or (reply.answer.detail if reply.answer else "")
            raise StoryAborted(f"{reply.institution} {reply.event_id}: HTTP {status}: {detail}")
        return reply

    def _statement(self, code: str, cycle_id: int, instruction: dict[str, Any] | None) -> dict[str, Any]:
        """Fetch, print and check ``code``'s statement of the cycle with its own bearer token."""
        sender = self.senders.get(code)
        if sender is None:
            raise StoryAborted(f"{code} has a position in cycle {cycle_id} but no demo credentials")
        path = f"/api/v1/institutions/{code}/settlements?cycle={cycle_id}"
        answer = self._ask(self.hub.call, "GET", path, authorization=f"Bearer {sender.api_token}")
        results = answer.document.get("results") if isinstance(answer.document, dict) else None
        if answer.status != 200 or not results or len(results) != 1:
            raise StoryAborted(f"GET {path}: HTTP {answer.status}, expected one statement: {answer.detail}")
        statement = results[0]
        first, *more = _statement_text(statement)
        self._line(code, f"GET .../settlements?cycle={cycle_id}", "200", first, [])
        for line in more:
            self.write(f"{'':<{STATEMENT_INDENT}}{line}")
        problems = _statement_problems(statement, code, instruction)
        if problems:
            self._line(code, "statement", "FAIL", "does not add up", problems)
        return dict(statement)

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
        self._follow(code, event_id, sent=sent, expect=expect, note=note)

    def _follow(self, code: str, event_id: str, *, sent: str, expect: Expect, note: str = "") -> None:
        """Follow ``code``'s event until the hub has handled it, print and check it."""
        sender = self.senders[code]
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
        headers: dict[str, str] | None = None,
        show: Callable[[Any], str] = lambda document: "",
        check: Callable[[Any], list[str]] = lambda document: [],
    ) -> Any:
        """A call of the person's app with their token; raises :class:`StoryAborted` on another status."""
        authorization = f"Token {self.person_token}" if self.person_token else ""
        answer = self._ask(self.hub.call, method, path, payload=payload, authorization=authorization, headers=headers)
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
