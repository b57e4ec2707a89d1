"""Operator commands: institution_register (CONTRACT.md section 1) and key rotation."""

import base64
import json
import os
from io import StringIO

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import CommandError, call_command, execute_from_command_line

from institutions import crypto
from institutions.models import Credential, HubKey, Institution
from tests.conftest import Sender, activity, post_events

pytestmark = pytest.mark.django_db


def register(*args: str) -> dict:
    out = StringIO()
    call_command("institution_register", *args, stdout=out)
    return json.loads(out.getvalue())


def new_public_key() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    return private, crypto.format_public_key(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def snapshot() -> tuple:
    return (
        list(Institution.objects.values()),
        list(Credential.objects.values()),
    )


def test_register_prints_the_credentials_as_one_json_object():
    printed = register("green-bank", "--name", "Green Bank", "--hmac")
    assert set(printed) == {"code", "hmac_secret", "api_token", "hub_public_keys"}
    assert printed["code"] == "green-bank"
    assert printed["hmac_secret"].startswith("whsec_")
    assert printed["api_token"]
    assert printed["hub_public_keys"] == [k.public_key for k in HubKey.objects.exclude(status="retired")]
    assert all(key.startswith("whpk_") for key in printed["hub_public_keys"])
    institution = Institution.objects.get(code="green-bank")
    assert institution.name == "Green Bank" and institution.is_active


def test_registered_credentials_work_at_the_intake(client):
    private, public = new_public_key()
    printed = register("green-bank", "--name", "Green Bank", "--hmac", "--ed25519-public-key", public)
    sender = Sender(Institution.objects.get(code="green-bank"), printed["hmac_secret"], private, printed["api_token"])
    for versions in [("v1",), ("v1a",)]:
        response = post_events(client, sender, activity(), versions=versions)
        assert response.status_code == 202, response.content
    status = client.get(f"{sender.url}/{activity()['id']}", headers={"Authorization": f"Bearer {sender.api_token}"})
    assert status.status_code == 404  # authenticated by the printed token; no such event


def test_register_with_a_key_only_prints_no_hmac_secret():
    _, public = new_public_key()
    printed = register("key-bank", "--name", "Key Bank", "--ed25519-public-key", public)
    assert printed["hmac_secret"] is None
    kinds = set(Credential.objects.filter(institution__code="key-bank").values_list("kind", flat=True))
    assert kinds == {"ed25519", "api_token"}


def test_register_a_provider_with_an_endpoint():
    register("shop", "--name", "Shop", "--hmac", "--provider", "--endpoint", "https://shop.example/hooks")
    shop = Institution.objects.get(code="shop")
    assert shop.is_provider and shop.endpoint_url == "https://shop.example/hooks"


def test_registering_an_existing_code_again_fails_and_changes_nothing():
    register("green-bank", "--name", "Green Bank", "--hmac")
    before = snapshot()
    with pytest.raises(CommandError, match="already registered"):
        register("green-bank", "--name", "Another Name", "--hmac")
    assert snapshot() == before


@pytest.mark.parametrize(
    "key",
    [
        "not-a-key",
        "whpk_!!!notbase64!!!",
        "whpk_" + base64.b64encode(bytes(31)).decode(),
        "whpk_" + base64.b64encode(bytes(33)).decode(),
        "whsec_" + base64.b64encode(bytes(32)).decode(),
    ],
)
def test_a_malformed_ed25519_public_key_is_refused_and_nothing_is_created(key):
    with pytest.raises(CommandError, match="ed25519-public-key"):
        register("key-bank", "--name", "Key Bank", "--ed25519-public-key", key)
    assert snapshot() == ([], [])


def test_register_requires_hmac_or_a_key():
    with pytest.raises(CommandError, match="--hmac or --ed25519-public-key"):
        register("green-bank", "--name", "Green Bank")
    assert snapshot() == ([], [])


@pytest.mark.parametrize("code", ["Green-Bank", "g", "green_bank", "a" * 41, "bank-a\n", "bank a"])
def test_a_code_outside_the_pattern_is_refused(code):
    with pytest.raises(CommandError, match=r"\[a-z0-9-\]\{2,40\}"):
        register(code, "--name", "Bank", "--hmac")
    assert snapshot() == ([], [])


@pytest.mark.parametrize("name", ["   ", "x" * 201])
def test_a_blank_or_over_long_name_is_refused(name):
    with pytest.raises(CommandError, match="name"):
        register("green-bank", "--name", name, "--hmac")
    assert snapshot() == ([], [])


def test_rotate_key_adds_beside_the_old_and_retire_key_lists_and_retires(bank):
    out = StringIO()
    call_command("institution_rotate_key", bank.code, "--hmac", "--api-token", stdout=out)
    rotated = json.loads(out.getvalue())
    assert rotated["hmac_secret"].startswith("whsec_") and rotated["api_token"]
    assert Credential.objects.filter(institution=bank.institution, status="active").count() == 5

    listing = StringIO()
    call_command("institution_retire_key", bank.code, stdout=listing)
    assert len(listing.getvalue().splitlines()) == 5

    old_hmac = (
        Credential.objects.filter(institution=bank.institution, kind="hmac")
        .exclude(pk__in=rotated["credential_ids"])
        .get()
    )
    call_command("institution_retire_key", bank.code, str(old_hmac.pk), stdout=StringIO())
    old_hmac.refresh_from_db()
    assert old_hmac.status == "retired" and old_hmac.retired_at is not None


def test_retire_key_refuses_a_credential_of_another_institution(bank, other_bank):
    foreign = Credential.objects.filter(institution=other_bank.institution, kind="hmac").get()
    with pytest.raises(CommandError, match="does not belong"):
        call_command("institution_retire_key", bank.code, str(foreign.pk), stdout=StringIO())
    foreign.refresh_from_db()
    assert foreign.status == "active"


def test_rotate_key_for_an_unknown_institution_fails():
    with pytest.raises(CommandError, match="No institution"):
        call_command("institution_rotate_key", "nobody", "--hmac", stdout=StringIO())


# --- As run from a shell ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # manage.py closes the connections when it finishes
def test_from_the_command_line_stdout_is_one_json_object_and_a_rerun_exits_non_zero(capsys):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
    argv = ["manage.py", "institution_register", "green-bank", "--name", "Green Bank", "--hmac"]
    execute_from_command_line(argv)
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # the whole of stdout parses as one object
    assert isinstance(printed, dict) and printed["code"] == "green-bank"
    before = snapshot()

    with pytest.raises(SystemExit) as exit_info:
        execute_from_command_line(argv)
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "already registered" in captured.err
    assert snapshot() == before
