"""The demo: demo_setup registers institutions idempotently; demo_traffic pushes them through real HTTP."""

from __future__ import annotations

import json
import stat
import time
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db.models import QuerySet

from demo import stories
from demo.client import Hub, Sender
from demo.management.commands.demo_setup import DEMO_INSTITUTIONS, DEMO_REWARDS, PROVIDER
from demo.receiver import DemoReceiver
from demo.stories import POOLED_REWARD, _statement_problems, statement_digest
from institutions import crypto
from institutions.models import Credential, InboxEvent, Institution, OutboxMessage
from institutions.services import hub_public_keys, hub_signing_key, institution_set_status
from methodology.models import ActionMapping, NormalizedActivity, Scenario
from methodology.services import standard_changed
from settlement.models import Confirmation, Cycle, Instruction, Obligation, Redemption, Reward
from settlement.selectors import statements
from tests.conftest import free_port
from wallets.models import Membership, Person

EAST, WEST, METRO = "demo-bank-east", "demo-pay-west", "demo-metro-card"


def setup(tmp_path: Path, receiver_url: str = "http://127.0.0.1:8001") -> tuple[str, dict]:
    out = StringIO()
    call_command("demo_setup", receiver_url=receiver_url, stdout=out)
    return out.getvalue(), json.loads((tmp_path / "demo-credentials.json").read_text())


@pytest.fixture
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    settings.HUB_ALLOW_PRIVATE_ENDPOINTS = True  # the demo receiver is on loopback, as `make run` allows
    return tmp_path


@pytest.fixture
def receiver_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def snapshot() -> tuple:
    return (
        sorted(Institution.objects.values_list("code", "name", "status", "is_provider")),
        sorted(Credential.objects.values_list("pk", "status")),
    )


@pytest.mark.django_db
def test_demo_setup_registers_issuers_and_a_provider_with_every_signing_set_up(var_dir):
    printed, saved = setup(var_dir)
    codes = {spec.code for spec in DEMO_INSTITUTIONS}
    assert {"demo-bank-east", "demo-pay-west", "demo-metro-card", "demo-rewards"} <= codes
    assert set(Institution.objects.values_list("code", flat=True)) == codes
    assert Institution.objects.get(code="demo-rewards").is_provider
    kinds = {
        spec.code: set(Credential.objects.filter(institution__code=spec.code).values_list("kind", flat=True))
        for spec in DEMO_INSTITUTIONS
    }
    assert kinds["demo-bank-east"] == {"hmac", "api_token"}
    assert kinds["demo-pay-west"] == {"ed25519", "api_token"}
    assert kinds["demo-metro-card"] == {"hmac", "ed25519", "api_token"}
    assert "registered" in printed and "demo-bank-east" in printed

    # The file holds what the sender needs, matching what the hub verifies with, and only its owner reads it.
    path = var_dir / "demo-credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for code, entry in saved["institutions"].items():
        active = Credential.objects.filter(institution__code=code, status="active")
        assert active.filter(kind="api_token", token_hash=crypto.hash_token(entry["api_token"])).exists()
        if entry["hmac_secret"]:
            assert entry["hmac_secret"] in {crypto.unseal(c.secret_sealed) for c in active.filter(kind="hmac")}
        if entry["ed25519_private_key"]:
            private = crypto.private_key_from_string(entry["ed25519_private_key"])
            public = crypto.format_public_key(private.public_key().public_bytes_raw())
            assert public == entry["ed25519_public_key"]
            assert active.filter(kind="ed25519", public_key=public.removeprefix("whpk_")).exists()
    admin = User.objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(saved["admin"]["password"])


@pytest.mark.django_db
def test_demo_setup_is_idempotent(var_dir):
    _, first = setup(var_dir)
    before = snapshot()
    printed, second = setup(var_dir)
    assert second == first
    assert snapshot() == before
    assert "registered" not in printed and "kept" in printed


@pytest.mark.django_db
def test_demo_setup_rotates_fresh_credentials_in_when_the_file_is_gone(var_dir):
    _, first = setup(var_dir)
    (var_dir / "demo-credentials.json").unlink()
    printed, second = setup(var_dir)
    assert "rotated" in printed
    assert Institution.objects.count() == len(DEMO_INSTITUTIONS)
    for code, entry in second["institutions"].items():
        assert entry["api_token"] != first["institutions"][code]["api_token"]
        assert Credential.objects.filter(token_hash=crypto.hash_token(entry["api_token"]), status="active").exists()
    # Nothing was retired: someone may still hold the old secrets.
    assert not Credential.objects.filter(status="retired").exists()
    assert User.objects.get(username="admin").check_password(second["admin"]["password"])


@pytest.mark.django_db
def test_demo_setup_replaces_saved_secrets_the_hub_does_not_know(var_dir):
    _, first = setup(var_dir)
    stale = json.loads(json.dumps(first))
    stale["institutions"]["demo-bank-east"]["hmac_secret"] = crypto.new_hmac_secret()
    (var_dir / "demo-credentials.json").write_text(json.dumps(stale))
    printed, second = setup(var_dir)
    assert "rotated    demo-bank-east" in printed and "kept       demo-pay-west" in printed
    east = second["institutions"]["demo-bank-east"]
    assert east["hmac_secret"] != stale["institutions"]["demo-bank-east"]["hmac_secret"]
    assert east["hmac_secret"] in {crypto.unseal(c.secret_sealed) for c in Credential.objects.filter(kind="hmac")}
    assert second["institutions"]["demo-pay-west"] == first["institutions"]["demo-pay-west"]


def test_demo_traffic_says_so_when_the_hub_cannot_be_reached(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    (tmp_path / "demo-credentials.json").write_text(
        json.dumps({"institutions": {"x-bank": {"api_token": "t", "hmac_secret": crypto.new_hmac_secret()}}})
    )
    with pytest.raises(CommandError, match="not ready"):
        call_command(
            "demo_traffic", url=f"http://127.0.0.1:{free_port()}", wait=0, stdout=StringIO(), stderr=StringIO()
        )


def test_demo_traffic_needs_demo_setup_first(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    with pytest.raises(CommandError, match="demo_setup"):
        call_command("demo_traffic", url="http://127.0.0.1:9", wait=0, stdout=StringIO(), stderr=StringIO())


def story_events(key: str) -> QuerySet[InboxEvent]:
    return InboxEvent.objects.filter(event_id__startswith="story-", event_id__contains=f"-{key}-").order_by("pk")


def story_activities(key: str) -> QuerySet[NormalizedActivity]:
    return NormalizedActivity.objects.filter(inbox_event__in=story_events(key)).order_by("inbox_event_id")


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_pushes_signed_events_through_a_live_hub(var_dir, live_server, receiver_url):
    setup(var_dir, receiver_url)
    out, err = StringIO(), StringIO()
    call_command("demo_traffic", url=live_server.url, wait=5, events=40, seed=3, stdout=out, stderr=err)
    printed = out.getvalue()

    # 40 activity events, plus the good half of the batch that carries the rejected one.
    bulk = InboxEvent.objects.filter(event_id__startswith="ev-")
    assert bulk.count() == 41
    assert not InboxEvent.objects.filter(data__has_key="gps").exists()
    issuers = {spec.code for spec in DEMO_INSTITUTIONS if not spec.provider}
    assert set(bulk.values_list("institution__code", flat=True).distinct()) == issuers
    assert set(bulk.values_list("type", flat=True).distinct()) == {"carbon.activity.recorded"}
    assert {"transit.metro", "mobility.walking"} <= set(bulk.values_list("data__action", flat=True))
    # Processed in process right after each commit: normalized under the standard, none left waiting.
    assert set(bulk.values_list("status", flat=True)) == {"processed"}
    assert NormalizedActivity.objects.filter(inbox_event__in=bulk).count() == 41

    assert "every request got the answer and every story the outcome the demo expects" in printed
    assert "FAIL" not in printed
    for case in ("duplicate resend", "same id, other content", "field outside the contract"):
        assert case in printed
    assert "data.gps unexpected_field" in printed
    assert "total" in printed and "202x" in printed
    assert "requests" in err.getvalue()  # the progress bar
    stories = ("1. One standard", "2. A person links", "3. A capped day", "4. One act, two reports", "5. One pooled")
    for story in (*stories, "6. An action", "7. Small balances pool past a reward's price", "8. Settlement"):
        assert story in printed
    assert "cap_reached" in printed and "duplicate_act" in printed and "quarantined" in printed

    assert_units_measured_in_the_scenarios_units()
    person = assert_person_linked_at_east_and_west()
    assert_capped_day(person)
    assert_act_reported_twice_is_credited_once(person)
    assert_unknown_action_quarantined()
    assert_pooled_redemption_fulfilled_by_the_provider(person)
    assert_cycle_instructed_confirmed_and_reconciled()
    assert "insufficient-points" in printed and "the same Idempotency-Key again" in printed
    assert "minimum of 1 fen" in printed and "reconciled" in printed


def assert_pooled_redemption_fulfilled_by_the_provider(person: Person) -> None:
    (redemption,) = Redemption.objects.filter(person=person)
    assert (redemption.reward.code, redemption.status, redemption.points) == (POOLED_REWARD, "fulfilled", 950)
    assert redemption.voucher.startswith("DEMO-")
    issuers = set(redemption.allocations.values_list("issuer__code", flat=True))
    assert issuers == {EAST, WEST, METRO}  # only the pool of all three reached the price
    # The provider fulfilled through the intake, answering the hub's signed webhook, which it got once.
    fulfilled = InboxEvent.objects.get(type="carbon.redemption.fulfilled")
    assert (fulfilled.institution.code, fulfilled.status, fulfilled.data["redemption_id"]) == (
        PROVIDER,
        "processed",
        redemption.public_id,
    )
    requested = OutboxMessage.objects.get(type="carbon.redemption.requested")
    assert (requested.institution.code, requested.status, requested.attempts) == (PROVIDER, "delivered", 1)
    # The unaffordable reward was refused: nothing held for it.
    assert not Redemption.objects.exclude(pk=redemption.pk).exists()


def assert_cycle_instructed_confirmed_and_reconciled() -> None:
    (cycle,) = Cycle.objects.all()
    assert cycle.state == "reconciled"
    assert not Obligation.objects.filter(cycle__isnull=True).exists()  # a minimum of 1 fen carried nothing
    instructions = Instruction.objects.filter(cycle=cycle).select_related("institution", "message")
    by_code = {i.institution.code: i for i in instructions}
    assert set(by_code) == {EAST, WEST, METRO, PROVIDER}
    assert by_code[PROVIDER].direction == "receive" and by_code[PROVIDER].state == "received"
    assert {by_code[c].direction for c in (EAST, WEST, METRO)} == {"pay"}
    assert {by_code[c].state for c in (EAST, WEST, METRO)} == {"paid"}
    assert by_code[PROVIDER].amount_minor == sum(by_code[c].amount_minor for c in (EAST, WEST, METRO))
    assert all(i.message is not None and i.message.status == "delivered" for i in instructions)
    assert Confirmation.objects.filter(instruction__cycle=cycle, reference__startswith="DEMO-BANK-").count() == 4


def assert_units_measured_in_the_scenarios_units() -> None:
    rows = list(story_activities("units").values_list("scenario__code", "quantity", "status", "person"))
    assert rows == [
        ("transit.metro", Decimal("12.5"), "credited", None),  # sent in km
        ("transit.metro", Decimal("8.4"), "credited", None),  # sent as 8400 m
        ("mobility.walking", Decimal("6000"), "credited", None),  # step
        ("food.clean_plate", Decimal("1"), "credited", None),  # sent as check-in
        ("paper.e_bill", Decimal("2"), "credited", None),  # sent as bills
        ("energy.electricity_saved", Decimal("1.5"), "credited", None),  # sent as 1500 Wh
    ]
    metro_m = story_activities("units").get(quantity=Decimal("8.4"))
    assert metro_m.grams == Decimal("8.4") * Decimal("46.8") and metro_m.credited_mg == 393120


def assert_person_linked_at_east_and_west() -> Person:
    person = Person.objects.get(user__username__startswith="demo-person-")
    links = Membership.objects.filter(person=person, unlinked_at__isnull=True)
    # East and West in story 2, Metro Card in story 5 (the pooled wallet).
    assert set(links.values_list("institution__code", flat=True)) == {EAST, WEST, METRO}

    linked_events = story_events("link").filter(type="carbon.account.linked").order_by("id")
    assert [(e.institution.code, e.status, e.outcome) for e in linked_events] == [
        (EAST, "processed", {"linked": True, "reason": "linked"}),
        (WEST, "processed", {"linked": True, "reason": "linked"}),
    ]
    assert all(e.data == {"link_code": "[redacted]"} for e in linked_events)

    before, *after = story_activities("link")
    # Before the link the subject's act was its own (owner key of the subject, points in a holding
    # lot); the link bound that very subject and pooled the act into the person's wallet.
    assert before.owner_key.startswith("s:") and before.person_id == person.pk
    assert before.subject_ref == links.get(institution__code=EAST).subject_ref
    assert [(a.institution.code, a.person_id, a.owner_key) for a in after] == [
        (EAST, person.pk, f"p:{person.pk}"),
        (WEST, person.pk, f"p:{person.pk}"),
    ]
    return person


def assert_capped_day(person: Person) -> None:
    rows = list(
        story_activities("cap").values_list(
            "institution__code", "person", "quantity", "credited_quantity", "status", "reason"
        )
    )
    assert rows == [
        (WEST, person.pk, 1, 1, "credited", ""),
        (EAST, person.pk, 1, 1, "credited", ""),
        (WEST, person.pk, 2, 1, "credited", "cap_reached"),  # partly credited: one of two fits under the cap
        (EAST, person.pk, 1, 0, "capped", "cap_reached"),
    ]
    assert sum(row[3] for row in rows) == 3  # the day cap of food.clean_plate, across both institutions


def assert_act_reported_twice_is_credited_once(person: Person) -> None:
    first, second = story_activities("twice")
    assert first.fingerprint and first.fingerprint == second.fingerprint
    assert (first.institution.code, first.person_id, first.status, first.reason) == (EAST, person.pk, "credited", "")
    assert (second.institution.code, second.person_id, second.status, second.reason) == (
        WEST,
        person.pk,
        "duplicate",
        "duplicate_act",
    )
    assert first.credited_mg > 0 and second.credited_mg == 0


def assert_unknown_action_quarantined() -> None:
    (event,) = story_events("unknown")
    assert (event.status, event.last_error, event.data["action"]) == (
        "quarantined",
        "unknown_action",
        "transit.hyperloop",
    )
    assert not NormalizedActivity.objects.filter(inbox_event=event).exists()


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_fails_when_a_story_ends_otherwise(var_dir, live_server, receiver_url):
    setup(var_dir, receiver_url)
    # An operator maps the action the demo expects to be unknown: its story no longer ends quarantined.
    ActionMapping.objects.create(
        institution=Institution.objects.get(code="demo-metro-card"),
        action_code="transit.hyperloop",
        scenario=Scenario.objects.get(code="transit.metro"),
    )
    standard_changed()
    out = StringIO()
    with pytest.raises(CommandError, match=r"story 'unknown'.*event status processed, expected quarantined"):
        call_command("demo_traffic", url=live_server.url, wait=5, events=3, seed=1, stdout=out, stderr=StringIO())
    assert "FAIL" in out.getvalue() and "6. An action" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_fails_when_the_hub_refuses_a_request(var_dir, live_server, receiver_url):
    setup(var_dir, receiver_url)
    institution_set_status(institution=Institution.objects.get(code="demo-pay-west"), status="suspended")
    with pytest.raises(CommandError, match="401"):
        call_command(
            "demo_traffic", url=live_server.url, wait=5, events=9, seed=1, stdout=StringIO(), stderr=StringIO()
        )


@pytest.mark.django_db
def test_demo_setup_gives_the_provider_its_rewards_and_every_institution_the_receiver(var_dir):
    printed, saved = setup(var_dir, "http://127.0.0.1:8123")
    assert saved["receiver_url"] == "http://127.0.0.1:8123"
    for spec in DEMO_INSTITUTIONS:
        assert Institution.objects.get(code=spec.code).endpoint_url == f"http://127.0.0.1:8123/hooks/{spec.code}"
    rewards = set(Reward.objects.values_list("provider__code", "code", "points"))
    assert rewards == {(PROVIDER, reward.code, reward.points) for reward in DEMO_REWARDS}
    assert "created    reward demo-tote-bag" in printed

    # Again, elsewhere: the endpoints follow the receiver; the rewards are kept as they are.
    Reward.objects.filter(code=POOLED_REWARD).update(points=990)
    printed, saved = setup(var_dir, "http://127.0.0.1:8124")
    assert saved["receiver_url"] == "http://127.0.0.1:8124"
    assert Institution.objects.get(code=EAST).endpoint_url == "http://127.0.0.1:8124/hooks/demo-bank-east"
    assert Reward.objects.count() == len(DEMO_REWARDS) and Reward.objects.get(code=POOLED_REWARD).points == 990
    assert "kept       reward demo-tote-bag" in printed


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_refuses_to_start_when_the_hub_may_not_reach_its_receiver(settings, tmp_path, live_server):
    settings.VAR_DIR = tmp_path
    settings.HUB_ALLOW_PRIVATE_ENDPOINTS = False
    (tmp_path / "demo-credentials.json").write_text(
        json.dumps(
            {
                "receiver_url": "http://127.0.0.1:8001",
                "institutions": {"x-bank": {"api_token": "t", "hmac_secret": crypto.new_hmac_secret()}},
            }
        )
    )
    with pytest.raises(CommandError, match="HUB_ALLOW_PRIVATE_ENDPOINTS=1"):
        call_command("demo_traffic", url=live_server.url, wait=5, stdout=StringIO(), stderr=StringIO())


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_fails_when_one_issuer_alone_could_pay_the_reward(var_dir, live_server, receiver_url):
    setup(var_dir, receiver_url)
    # An operator cheapens the tote bag: the redemption still works, but the story no longer shows pooling.
    Reward.objects.filter(code=POOLED_REWARD).update(points=300)
    out = StringIO()
    with pytest.raises(CommandError, match=r"story 'redeem'.*alone reach the price 300"):
        call_command("demo_traffic", url=live_server.url, wait=5, events=3, seed=1, stdout=out, stderr=StringIO())
    assert "7. Small balances" in out.getvalue() and "8. Settlement" in out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_demo_traffic_fails_when_the_provider_is_not_answered(var_dir, live_server, receiver_url, monkeypatch):
    # The story waits this long for a reply that never comes (the refusal itself arrives at once).
    monkeypatch.setattr(stories, "REPLY_TIMEOUT_SECONDS", 1.0)
    setup(var_dir, receiver_url)
    # The provider's endpoint points where the receiver plays no institution: it refuses the webhook.
    Institution.objects.filter(code=PROVIDER).update(endpoint_url=f"{receiver_url}/hooks/nobody")
    with pytest.raises(CommandError, match=r"story 'redeem'.*got no carbon.redemption.requested.*no demo institution"):
        call_command(
            "demo_traffic", url=live_server.url, wait=5, events=3, seed=1, stdout=StringIO(), stderr=StringIO()
        )


# --- The demo receiver and the statement checks, on their own ---------------------------------------


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    status, _, _ = Hub(url).request("POST", "/hooks/demo-bank-east", body=body, headers=headers)
    return status


@pytest.mark.django_db
def test_the_receiver_takes_only_the_hubs_signature_and_each_webhook_once(receiver_url):
    _, hub_key = hub_signing_key()
    public = [crypto.public_key_bytes(k.public_key) for k in hub_public_keys()]
    secret = crypto.hmac_secret_bytes(crypto.new_hmac_secret())
    sender = Sender("demo-bank-east", "token", provider=False, hmac_secret=secret)
    body = json.dumps({"type": "carbon.example", "data": {}}).encode()
    stranger = Ed25519PrivateKey.generate()

    def headers(msg_id: str, keys: list, secrets: list) -> dict[str, str]:
        return crypto.webhook_headers(
            body, msg_id=msg_id, timestamp=int(time.time()), hmac_secrets=secrets, ed25519_keys=keys
        )

    with DemoReceiver(Hub("http://127.0.0.1:9"), [sender], url=receiver_url, hub_keys=public) as receiver:
        assert post(receiver_url, body, headers("msg_1", [hub_key], [secret])) == 200
        assert post(receiver_url, body, headers("msg_1", [hub_key], [secret])) == 200  # a redelivery
        assert post(receiver_url, body, headers("msg_2", [stranger], [secret])) == 401
        assert post(receiver_url, body, headers("msg_3", [hub_key], [])) == 401  # the institution's v1 is missing
        assert post(receiver_url, b'{"x": 1}', headers("msg_4", [hub_key], [secret])) == 401  # other bytes signed
    assert [w.webhook_id for w in receiver.webhooks] == ["msg_1"]
    assert receiver.duplicates == ["msg_1"]
    assert [why.split(":", 1)[0] for why in receiver.refused] == [
        "demo-bank-east msg_2",
        "demo-bank-east msg_3",
        "demo-bank-east msg_4",
    ]


@pytest.mark.django_db
def test_the_statement_check_recomputes_what_the_hub_lists(var_dir):
    from settlement.models import NetPosition
    from settlement.services import ObligationSpec, cycle_run, obligations_record

    setup(var_dir)
    east, shop = Institution.objects.get(code=EAST), Institution.objects.get(code=PROVIDER)
    obligations_record(
        source="redemption:1", obligations=[ObligationSpec(debtor_id=east.pk, creditor_id=shop.pk, amount_minor=7)]
    )
    run = cycle_run(minimum_minor=1)
    assert run is not None
    (statement,) = statements(list(NetPosition.objects.filter(cycle=run.cycle, institution=east)))
    statement = json.loads(json.dumps(statement, default=str))
    instruction = {**statement["instruction"], "state": "paid"}
    statement["instruction"]["state"], statement["confirmation"] = "paid", {"status": "paid", "reference": "r"}
    # The demo's own canonical form gives the hub's digest.
    assert statement_digest(statement["obligations"]["lines"]) == statement["obligations"]["digest"]
    assert _statement_problems(statement, EAST, instruction) == []

    tampered = json.loads(json.dumps(statement))
    tampered["obligations"]["lines"][0]["amount_minor"] = 8
    problems = _statement_problems(tampered, EAST, instruction)
    assert any("digest" in p for p in problems) and any("gross in/out" in p for p in problems)
