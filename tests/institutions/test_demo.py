"""The demo: demo_setup registers institutions idempotently; demo_traffic pushes them through real HTTP."""

from __future__ import annotations

import json
import socket
import stat
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db.models import QuerySet

from institutions import crypto
from institutions.management.commands.demo_setup import DEMO_INSTITUTIONS
from institutions.models import Credential, InboxEvent, Institution
from institutions.services import institution_set_status
from methodology.models import ActionMapping, NormalizedActivity, Scenario
from methodology.services import standard_changed
from wallets.models import Membership, Person

EAST, WEST, METRO = "demo-bank-east", "demo-pay-west", "demo-metro-card"


def setup(tmp_path: Path) -> tuple[str, dict]:
    out = StringIO()
    call_command("demo_setup", stdout=out)
    return out.getvalue(), json.loads((tmp_path / "demo-credentials.json").read_text())


@pytest.fixture
def var_dir(settings, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    return tmp_path


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def test_demo_traffic_pushes_signed_events_through_a_live_hub(var_dir, live_server):
    setup(var_dir)
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
    for story in (*stories, "6. An action"):
        assert story in printed
    assert "cap_reached" in printed and "duplicate_act" in printed and "quarantined" in printed

    assert_units_measured_in_the_scenarios_units()
    person = assert_person_linked_at_east_and_west()
    assert_capped_day(person)
    assert_act_reported_twice_is_credited_once(person)
    assert_unknown_action_quarantined()


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
def test_demo_traffic_fails_when_a_story_ends_otherwise(var_dir, live_server):
    setup(var_dir)
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
def test_demo_traffic_fails_when_the_hub_refuses_a_request(var_dir, live_server):
    setup(var_dir)
    institution_set_status(institution=Institution.objects.get(code="demo-pay-west"), status="suspended")
    with pytest.raises(CommandError, match="401"):
        call_command(
            "demo_traffic", url=live_server.url, wait=5, events=9, seed=1, stdout=StringIO(), stderr=StringIO()
        )
