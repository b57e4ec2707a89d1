"""``manage.py demo_traffic``: the demo institutions push signed CloudEvents through the real HTTP intake.

It is a client, like an institution's own sender: it talks to the hub only over HTTP and signs with
:func:`institutions.crypto.webhook_headers`, the same code the hub verifies with. The secrets come
from the file ``demo_setup`` writes, because the hub shows them only once. After the bulk traffic,
:mod:`demo.stories` tells the stories of the unified standard and of a person's linked
accounts, event by event, then a redemption and a settlement cycle, with the demo receiver
(:mod:`demo.receiver`) answering the hub's webhooks as the institutions would. To run the
cycle it acts as the operator and calls the settlement service directly: it shares the hub's database.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from demo.client import Hub, Sender
from demo.management.commands.demo_setup import default_credentials_path, read_credentials
from demo.receiver import DemoReceiver
from demo.stories import ACTIVITY, Settled, Storyteller, describe
from institutions import crypto
from settlement.selectors import cycle_positions
from settlement.services import cycle_run
from settlement.webhooks import instruction_webhook_data

# --- What the demo institutions report --------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """One kind of low-carbon act an institution reports: a hub scenario code and a unit it sends."""

    action: str
    unit: str
    quantity: Callable[[random.Random], str]
    weight: int = 1
    evidence: tuple[str, ...] = ("automatic",)
    issuer_points: Callable[[random.Random, str], int] | None = None


def _one(rng: random.Random) -> str:
    return "1"


def _km(low: float, high: float) -> Callable[[random.Random], str]:
    return lambda rng: f"{rng.uniform(low, high):.1f}"


def _whole(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(low, high))


# Units follow methodology/factors.csv; a few are spellings the standard converts (m, steps, check-in).
PROFILES: dict[str, tuple[str, list[Act]]] = {
    # A bank: paperless statements, utility bills paid online, metro rides paid by card (in metres).
    "demo-bank-east": (
        "east",
        [
            Act("paper.e_bill", "bill", _one, weight=4, issuer_points=lambda rng, q: 10),
            Act("payment.online_utility", "payment", _one, weight=2, issuer_points=lambda rng, q: 20),
            Act("transit.metro", "m", _whole(1500, 24000), weight=2),
        ],
    ),
    # A payment app: step counts, clean-plate check-ins with a photo or self-declared, no-cutlery orders.
    "demo-pay-west": (
        "west",
        [
            Act("mobility.walking", "step", _whole(2000, 16000), weight=4),
            Act("food.clean_plate", "check-in", _one, weight=2, evidence=("upload", "self_declared")),
            Act("food.no_cutlery", "order", _one, weight=2),
        ],
    ),
    # A transit card: metro kilometres, bus trips, battery-electric bus kilometres.
    "demo-metro-card": (
        "metro",
        [
            Act("transit.metro", "km", _km(1.5, 28.0), weight=4, issuer_points=lambda rng, q: round(float(q))),
            Act("transit.bus", "trip", _one, weight=3),
            Act("transit.bus_electric", "km", _km(1.0, 12.0), weight=2),
        ],
    ),
}
DEFAULT_PROFILE = ("cust", [Act("paper.e_invoice", "invoice", _one), Act("mobility.cycling", "trip", _one)])
SUBJECTS_PER_INSTITUTION = 40


@dataclass
class PlannedRequest:
    sender: Sender
    events: list[dict[str, Any]]
    batch: bool
    versions: tuple[str, ...]
    msg_id: str
    expected: list[str]  # per-event status the demo expects
    purpose: str = ""  # set on the deliberate cases
    body: bytes = b""
    # Filled in when sent:
    http_status: int | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""

    def __post_init__(self) -> None:
        if not self.body:
            payload: Any = self.events if self.batch else self.events[0]
            self.body = json.dumps(payload, separators=(",", ":")).encode()


class Command(BaseCommand):
    help = (
        "Push signed demo traffic from the institutions demo_setup registered through the hub's real HTTP "
        "intake: single and batch CloudEvents requests, v1 (HMAC) and v1a (Ed25519) signatures, activity "
        "events for metro rides, walking, clean-plate check-ins, e-bills and more, plus three deliberate "
        "cases: a duplicate resend, an event reusing an id with other content (conflict) and an event "
        "with a field outside the contract (rejected). Then tell eight stories event by event, each event "
        "followed with GET /api/v1/institutions/{code}/events/{id}: the unified standard measuring acts "
        "reported in other units (m, Wh, steps, check-ins); a new person (demo-person-<run>, signed up "
        "through the person API) whose bank reports for them before and after they link it with a link "
        "code; a capped day of clean-plate check-ins across two institutions; one act reported twice "
        "(the same fingerprint, credited once); an unknown action, quarantined; a redemption that only "
        "the pooled balance of three issuers pays, fulfilled by the provider; a settlement cycle, its "
        "instructions confirmed and its statements checked. Meanwhile it runs the demo receiver at the URL "
        "demo_setup registered as every demo institution's endpoint (loopback: needs "
        "HUB_ALLOW_PRIVATE_ENDPOINTS=1 for the hub and for this command). Exits non-zero when the "
        "hub cannot be reached, a request fails (401, 5xx or any other answer but 202), or a result or a "
        "story's outcome differs from what the demo expects."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url", default="http://127.0.0.1:8000", help="Base URL of the hub (default: %(default)s)."
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="How long to wait for GET <url>/readyz to answer 200 before giving up (default: %(default)s).",
        )
        parser.add_argument(
            "--events",
            type=int,
            default=120,
            metavar="N",
            help="Activity events to send, spread over the issuers (default: %(default)s); the deliberate "
            "cases come on top.",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=None,
            metavar="S",
            help="Seed for the random choices (acts, quantities, batching), to repeat a run's shape; event "
            "ids stay unique per run. Default: random, printed.",
        )
        parser.add_argument(
            "--credentials-file",
            type=Path,
            default=None,
            help="Secrets written by demo_setup (default: VAR_DIR/demo-credentials.json).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["events"] < 1:
            raise CommandError("--events must be at least 1.")
        path: Path = options["credentials_file"] or default_credentials_path()
        senders = self._load_senders(path)
        issuers = [s for s in senders if not s.provider]
        if not issuers:
            raise CommandError(f"{path} holds no issuing institution; run manage.py demo_setup.")
        try:
            hub = Hub(options["url"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        seed = options["seed"] if options["seed"] is not None else secrets.randbelow(1_000_000)
        rng = random.Random(seed)  # noqa: S311 (shapes demo data; the secrets come from demo_setup)

        self._wait_until_ready(hub, options["wait"])
        run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        plan = self._plan(issuers, options["events"], rng, run)
        self.stdout.write(
            f"demo_traffic: {hub.url}: {len(plan)} requests, {sum(len(r.events) for r in plan)} events from "
            f"{len(issuers)} institutions (seed {seed}, run {run})"
        )

        with self._receiver(hub, senders, path) as receiver:
            self._send_all(hub, plan)
            failures = self._report_requests(plan, issuers)
            failures += self._report_statuses(hub, plan, issuers)
            storyteller = Storyteller(
                hub, senders, run=run, write=self.stdout.write, receiver=receiver, settle=self._settle
            )
            failures += storyteller.tell()
            failures += [f"demo receiver refused a webhook: {why}" for why in receiver.refused]
        self.stdout.write("")
        if failures:
            raise CommandError(f"demo_traffic: {len(failures)} unexpected answer(s):\n  " + "\n  ".join(failures))
        self.stdout.write(
            self.style.SUCCESS(
                "demo_traffic: every request got the answer and every story the outcome the demo expects."
            )
        )

    # --- Setup ----------------------------------------------------------------------------------------

    def _load_senders(self, path: Path) -> list[Sender]:
        document = read_credentials(path)
        entries = document.get("institutions") or {}
        if not entries:
            raise CommandError(f"No demo credentials in {path}; run manage.py demo_setup first.")
        senders = []
        for code, entry in sorted(entries.items()):
            try:
                sender = Sender(code=code, api_token=entry["api_token"], provider=bool(entry.get("provider")))
                if entry.get("hmac_secret"):
                    sender.hmac_secret = crypto.hmac_secret_bytes(entry["hmac_secret"])
                if entry.get("ed25519_private_key"):
                    sender.private_key = crypto.private_key_from_string(entry["ed25519_private_key"])
            except (KeyError, ValueError) as exc:
                raise CommandError(f"{path}: the entry for {code} is unusable ({exc}); run demo_setup again.") from exc
            if sender.hmac_secret or sender.private_key:
                senders.append(sender)
        return senders

    def _receiver(self, hub: Hub, senders: list[Sender], path: Path) -> DemoReceiver:
        """The demo receiver, at the URL demo_setup registered as every demo institution's endpoint."""
        url = read_credentials(path).get("receiver_url")
        if not url:
            raise CommandError(f"{path} names no demo receiver; run manage.py demo_setup again.")
        if not settings.HUB_ALLOW_PRIVATE_ENDPOINTS:
            # The settlement story's instructions are delivered from this process (tasks run in process).
            raise CommandError(
                f"The demo receiver listens on {url}, a loopback address the hub delivers to only with "
                "HUB_ALLOW_PRIVATE_ENDPOINTS=1: set it for the hub and for demo_traffic (make run does)."
            )
        try:
            keys = hub.call("GET", "/api/v1/hub/keys")
            hub_keys = [crypto.public_key_bytes(k["public_key"]) for k in keys.document["keys"]]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CommandError(f"GET {hub.url}/api/v1/hub/keys gave no usable keys ({exc}).") from exc
        try:
            return DemoReceiver(hub, senders, url=url, hub_keys=hub_keys)
        except (OSError, ValueError) as exc:
            raise CommandError(f"The demo receiver cannot listen on {url}: {exc}.") from exc

    @staticmethod
    def _settle(minimum_minor: int) -> Settled | None:
        """Run a settlement cycle as the operator would (``settlement_run``): demo_traffic shares the hub's
        database. The instructions' webhooks go out when it commits, to the demo receiver."""
        run = cycle_run(minimum_minor=minimum_minor)
        if run is None:
            return None
        codes = {p.institution_id: p.institution.code for p in cycle_positions(cycle=run.cycle)}
        return Settled(
            cycle_id=run.cycle.pk,
            instructions=[
                {"institution": codes[i.institution_id], **instruction_webhook_data(i)} for i in run.instructions
            ],
            institutions=sorted(codes.values()),
        )

    def _wait_until_ready(self, hub: Hub, wait: float) -> None:
        deadline = time.monotonic() + max(wait, 0)
        announced = False
        while True:
            try:
                status, _, body = hub.request("GET", "/readyz")
                last = f"HTTP {status} {body[:200].decode(errors='replace')}"
                if status == 200:
                    return
            except OSError as exc:
                last = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                raise CommandError(
                    f"The hub at {hub.url} is not ready: GET /readyz did not answer 200 within {wait:g} s "
                    f"(last: {last}). Is it running? Start it with `make run` or `manage.py runserver`."
                )
            if not announced:
                self.stderr.write(f"demo_traffic: waiting up to {wait:g} s for {hub.url}/readyz ...", style_func=str)
                announced = True
            time.sleep(0.5)

    # --- The plan -------------------------------------------------------------------------------------

    def _plan(self, issuers: list[Sender], total: int, rng: random.Random, run: str) -> list[PlannedRequest]:
        message_numbers = itertools.count(1)
        event_numbers = itertools.count(1)

        def msg_id() -> str:
            return f"msg_{run}_{next(message_numbers):04d}"

        def new_event(sender: Sender) -> dict[str, Any]:
            return self._activity(sender, rng, f"ev-{run}-{next(event_numbers):05d}")

        per_sender: dict[str, list[PlannedRequest]] = {}
        for index, sender in enumerate(issuers):
            share = total // len(issuers) + (1 if index < total % len(issuers) else 0)
            requests: list[PlannedRequest] = []
            while share > 0:
                size = 1 if rng.random() < 0.3 else min(share, rng.randint(2, 25))
                events = [new_event(sender) for _ in range(size)]
                requests.append(
                    PlannedRequest(
                        sender,
                        events,
                        batch=size > 1 or rng.random() < 0.2,  # a batch of one is legal too
                        versions=rng.choice(sender.signature_choices()),
                        msg_id=msg_id(),
                        expected=["accepted"] * size,
                    )
                )
                share -= size
            per_sender[sender.code] = requests

        # Interleave the institutions, as real traffic would arrive.
        plan: list[PlannedRequest] = []
        queues = [per_sender[s.code] for s in issuers]
        while any(queues):
            for queue in queues:
                if queue:
                    plan.append(queue.pop(0))

        first = plan[0]
        # 1. A sender retry: the very same body and webhook-id, freshly timestamped and signed.
        plan.append(
            PlannedRequest(
                first.sender,
                first.events,
                first.batch,
                first.versions,
                first.msg_id,
                expected=["duplicate"] * len(first.events),
                purpose="duplicate resend",
                body=first.body,
            )
        )
        # 2. An event id reused with other content.
        second = next((r for r in plan if r.sender is not first.sender), first)
        original = second.events[0]
        conflicting = {**original, "data": {**original["data"], "quantity": "999"}}
        plan.append(
            PlannedRequest(
                second.sender,
                [conflicting],
                False,
                rng.choice(second.sender.signature_choices()),
                msg_id(),
                expected=["conflict"],
                purpose="same id, other content",
            )
        )
        # 3. A batch where one event carries a field the contract does not allow (no GPS traces).
        third = issuers[-1]
        bad = new_event(third)
        bad["data"]["gps"] = "22.5431,114.0579"
        plan.append(
            PlannedRequest(
                third,
                [new_event(third), bad],
                True,
                rng.choice(third.signature_choices()),
                msg_id(),
                expected=["accepted", "rejected"],
                purpose="field outside the contract",
            )
        )
        return plan

    @staticmethod
    def _activity(sender: Sender, rng: random.Random, event_id: str) -> dict[str, Any]:
        prefix, acts = PROFILES.get(sender.code, DEFAULT_PROFILE)
        act = rng.choices(acts, weights=[a.weight for a in acts])[0]
        subject = f"{prefix}-cust-{rng.randint(1, SUBJECTS_PER_INSTITUTION):04d}"
        moment = datetime.now(UTC) - timedelta(seconds=rng.randint(60, 6 * 24 * 3600))
        quantity = act.quantity(rng)
        data: dict[str, Any] = {"action": act.action, "quantity": quantity, "unit": act.unit}
        if act.issuer_points is not None:
            data["issuer_points"] = act.issuer_points(rng, quantity)
        if rng.random() < 0.5:
            # An opaque hash of the real-world act, so a second report of it (another issuer) is spotted.
            data["fingerprint"] = hashlib.sha256(
                f"{sender.code}|{subject}|{act.action}|{moment:%Y-%m-%dT%H:%M:%S}".encode()
            ).hexdigest()
        evidence = rng.choice(act.evidence)
        if evidence != "automatic" or rng.random() < 0.3:
            data["evidence"] = evidence
        return sender.event(event_id, ACTIVITY, subject, data, moment)

    # --- Sending --------------------------------------------------------------------------------------

    def _send_all(self, hub: Hub, plan: list[PlannedRequest]) -> None:
        interactive = self.stderr.isatty()
        for done, request in enumerate(plan, start=1):
            self._send(hub, request)
            if interactive or done == len(plan):
                self._progress(done, len(plan), request.sender.code, final=done == len(plan))

    def _progress(self, done: int, total: int, label: str, *, final: bool) -> None:
        width = 32
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        self.stderr.write(
            f"\r[{bar}] {done:>4}/{total} requests  {label:<18}", ending="\n" if final else "", style_func=str
        )
        self.stderr.flush()

    @staticmethod
    def _send(hub: Hub, request: PlannedRequest) -> None:
        try:
            answer = hub.events_post(
                request.sender, request.body, msg_id=request.msg_id, versions=request.versions, batch=request.batch
            )
        except OSError as exc:
            request.problem = f"unreachable: {exc}"
            return
        request.http_status = answer.status
        document = answer.document
        if isinstance(document, dict) and isinstance(document.get("results"), list):
            request.results = document["results"]
        if answer.status != 202:
            request.problem = f"HTTP {answer.status}: {answer.detail}"

    # --- Reporting ------------------------------------------------------------------------------------

    def _report_requests(self, plan: list[PlannedRequest], issuers: list[Sender]) -> list[str]:
        failures: list[str] = []
        rows = []
        totals: Counter[str] = Counter()
        for sender in issuers:
            mine = [r for r in plan if r.sender is sender]
            tally: Counter[str] = Counter(result.get("status", "?") for r in mine for result in r.results)
            http = Counter(str(r.http_status or "error") for r in mine)
            totals.update(tally)
            totals["requests"] += len(mine)
            rows.append(
                [
                    sender.code,
                    str(len(mine)),
                    *(str(tally[k]) for k in ("accepted", "duplicate", "conflict", "rejected")),
                    " ".join(f"{code}x{n}" for code, n in sorted(http.items())),
                ]
            )
        rows.append(
            [
                "total",
                str(totals["requests"]),
                *(str(totals[k]) for k in ("accepted", "duplicate", "conflict", "rejected")),
                "",
            ]
        )
        self.stdout.write("")
        self._table(
            ["institution", "requests", "accepted", "duplicate", "conflict", "rejected", "HTTP"],
            rows,
            numeric=(1, 2, 3, 4, 5),
        )

        for request in plan:
            where = f"{request.sender.code} {request.msg_id}"
            if request.problem:
                failures.append(f"{where}: {request.problem}")
                continue
            got = [result.get("status") for result in request.results]
            if got != request.expected:
                failures.append(f"{where}: expected {request.expected}, got {got}")

        self.stdout.write("")
        self.stdout.write("Deliberate cases:")
        for request in (r for r in plan if r.purpose):
            got = [result.get("status") for result in request.results]
            errors = [e for result in request.results for e in result.get("errors", [])]
            detail = "; ".join(f"{e.get('field')} {e.get('code')}" for e in errors)
            summary = ", ".join(f"{n} {status}" for status, n in Counter(got).items())
            verdict = "as expected" if got == request.expected and not request.problem else "UNEXPECTED"
            self.stdout.write(
                f"  {request.purpose:<28} {request.sender.code:<16} HTTP {request.http_status or '-'} "
                f"{summary or request.problem}{f' ({detail})' if detail else ''}: {verdict}"
            )
        return failures

    def _report_statuses(self, hub: Hub, plan: list[PlannedRequest], issuers: list[Sender]) -> list[str]:
        """Read a few events back with each institution's bearer token, as its back office would."""
        failures: list[str] = []
        picks: list[tuple[Sender, str]] = []
        for sender in issuers:
            accepted = [r for r in plan if r.sender is sender and not r.purpose and r.results]
            picks += [(sender, request.events[0]["id"]) for request in accepted[:2]]

        rows = []
        for sender, event_id in picks:
            try:
                answer = hub.event_get(sender, event_id)
            except OSError as exc:
                failures.append(f"GET {sender.code} event {event_id}: unreachable: {exc}")
                continue
            document = answer.document if isinstance(answer.document, dict) else {}
            if answer.status == 200:
                status, outcome = document.get("status", "?"), describe(document.get("outcome"))
                rows.append([sender.code, event_id, str(answer.status), status, outcome])
            else:
                rows.append([sender.code, event_id, str(answer.status), "-", document.get("code", "")])
                failures.append(f"GET {sender.code} event {event_id}: HTTP {answer.status} ({answer.detail})")
        self.stdout.write("")
        self.stdout.write("Event statuses (GET /api/v1/institutions/{code}/events/{id}, bearer token):")
        self._table(["institution", "event id", "HTTP", "status", "outcome"], rows)
        if any(row[3] == "received" for row in rows):
            self.stdout.write(
                "(received: stored durably, not processed yet; with REDIS_URL set, a Celery worker processes "
                "the inbox.)"
            )
        return failures

    def _table(self, header: list[str], rows: list[list[str]], *, numeric: tuple[int, ...] = ()) -> None:
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                str(c).rjust(w) if i in numeric else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        self.stdout.write(line(header))
        self.stdout.write("  ".join("-" * w for w in widths))
        for row in rows:
            self.stdout.write(line(row))
