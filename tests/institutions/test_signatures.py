"""Standard Webhooks signatures at the intake: v1 (HMAC), v1a (Ed25519), rotation, refusals."""

import base64
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import call_command

from institutions import crypto
from institutions.models import Credential, InboxEvent, Institution
from institutions.services import credential_add, credential_retire, institution_set_status
from tests.conftest import activity, make_sender, post_events

pytestmark = pytest.mark.django_db


def assert_refused(response, code: str = "invalid-signature") -> dict:
    assert response.status_code == 401, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert InboxEvent.objects.count() == 0
    return problem


def post_signed(client, sender, body: bytes, headers: dict[str, str]):
    return client.post(sender.url, data=body, content_type="application/cloudevents+json", headers=headers)


def event_body(event_id: str = "e1") -> bytes:
    return json.dumps(activity(event_id)).encode()


# --- Which signatures verify ------------------------------------------------------------------------


@pytest.mark.parametrize("versions", [("v1",), ("v1a",), ("v1", "v1a")])
def test_v1_only_v1a_only_and_both_are_accepted(client, bank, versions):
    response = post_events(client, bank, activity("e1"), versions=versions)
    assert response.status_code == 202, response.content
    assert InboxEvent.objects.count() == 1


def test_an_hmac_only_institution_signs_with_v1(client, db):
    sender = make_sender("hmac-only", ed25519=False)
    assert post_events(client, sender, activity("e1")).status_code == 202
    assert Credential.objects.filter(institution=sender.institution, kind="ed25519").count() == 0


def test_an_ed25519_only_institution_signs_with_v1a(client, db):
    sender = make_sender("key-only", hmac=False)
    assert sender.hmac_secret is None
    assert post_events(client, sender, activity("e1")).status_code == 202


def test_a_valid_signature_beside_unusable_entries_still_verifies(client, bank):
    body = event_body()
    headers = bank.headers(body, versions=("v1",))
    headers["webhook-signature"] = (
        f"v2,{base64.b64encode(b'x' * 32).decode()} nocomma v1,!!! " + headers["webhook-signature"]
    )
    assert post_signed(client, bank, body, headers).status_code == 202


# --- Which do not -----------------------------------------------------------------------------------


def test_a_wrong_signature_is_refused(client, bank):
    body = event_body()
    headers = bank.headers(body)
    headers["webhook-signature"] = (
        f"v1,{base64.b64encode(bytes(32)).decode()} v1a,{base64.b64encode(bytes(64)).decode()}"
    )
    assert_refused(post_signed(client, bank, body, headers))


def test_a_signature_made_with_another_institutions_keys_is_refused(client, bank, other_bank):
    body = event_body()
    headers = other_bank.headers(body)  # both of bank-b's signatures, sent to bank-a's door
    assert_refused(post_signed(client, bank, body, headers))


@pytest.mark.parametrize("versions", [("v1",), ("v1a",)])
def test_a_signature_over_another_body_is_refused(client, bank, versions):
    headers = bank.headers(event_body("e1"), versions=versions)
    assert_refused(post_signed(client, bank, event_body("e2"), headers))


def test_a_signature_over_another_message_id_is_refused(client, bank):
    body = event_body()
    headers = bank.headers(body, msg_id="msg_1")
    headers["webhook-id"] = "msg_2"
    assert_refused(post_signed(client, bank, body, headers))


def test_an_hmac_only_institution_refuses_a_v1a_signature(client, db):
    sender = make_sender("hmac-only", ed25519=False)
    stranger = make_sender("stranger")
    body = event_body()
    headers = stranger.headers(body, versions=("v1a",), msg_id="m1")
    assert_refused(post_signed(client, sender, body, headers))


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_refused(client, bank, header):
    body = event_body()
    headers = bank.headers(body)
    del headers[header]
    assert_refused(post_signed(client, bank, body, headers))


def test_an_empty_signature_header_is_refused(client, bank):
    body = event_body()
    assert_refused(post_signed(client, bank, body, {**bank.headers(body), "webhook-signature": ""}))


def relabel(header: str, transform) -> str:
    return " ".join(transform(*entry.split(",", 1)) for entry in header.split())


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda version, sig: version + sig, id="no-comma"),
        pytest.param(lambda version, sig: f"{version},{sig[:-3]}!*&", id="bad-base64"),
        pytest.param(lambda version, sig: f"v2,{sig}", id="unknown-version"),
        pytest.param(lambda version, sig: f"{version.upper()},{sig}", id="version-case"),
    ],
)
def test_a_malformed_signature_header_is_refused(client, bank, transform):
    body = event_body()
    headers = bank.headers(body)
    headers["webhook-signature"] = relabel(headers["webhook-signature"], transform)
    assert_refused(post_signed(client, bank, body, headers))


def test_a_v1a_signature_labelled_v1_is_refused(client, bank):
    body = event_body()
    headers = bank.headers(body, versions=("v1a",))
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1a,", "v1,")
    assert_refused(post_signed(client, bank, body, headers))


@pytest.mark.parametrize("timestamp", ["12.5", "soon", "-5", "1e9", "0x65", "9" * 16])
def test_a_timestamp_that_is_not_an_integer_is_refused(client, bank, timestamp):
    body = event_body()
    headers = bank.headers(body, msg_id="m1")
    # Sign the very string sent, so only its form can be what refuses it.
    content = crypto.signed_content("m1", timestamp, body)
    mac = hmac.digest(crypto.hmac_secret_bytes(bank.hmac_secret), content, "sha256")
    headers.update({"webhook-timestamp": timestamp, "webhook-signature": f"v1,{base64.b64encode(mac).decode()}"})
    assert_refused(post_signed(client, bank, body, headers))


def test_a_message_id_with_a_dot_is_refused(client, bank):
    body = event_body()
    assert_refused(post_signed(client, bank, body, bank.headers(body, msg_id="msg.1")))


@pytest.mark.parametrize("offset", [-301, 301, -86_400])
def test_a_stale_timestamp_is_refused_as_stale(client, bank, offset):
    body = event_body()
    headers = bank.headers(body, timestamp=int(time.time()) + offset)
    problem = assert_refused(post_signed(client, bank, body, headers), code="stale-timestamp")
    assert "300" in problem["detail"]


@pytest.mark.parametrize("offset", [-290, 290])
def test_a_timestamp_within_tolerance_is_accepted(client, bank, offset):
    response = post_events(client, bank, activity("e1"), timestamp=int(time.time()) + offset)
    assert response.status_code == 202


def test_a_stale_timestamp_with_a_bad_signature_says_only_invalid_signature(client, bank, other_bank):
    # Only a correctly signed request learns that its clock is off.
    body = event_body()
    headers = other_bank.headers(body, timestamp=int(time.time()) - 1000)
    assert_refused(post_signed(client, bank, body, headers))


def test_unknown_and_suspended_institutions_get_the_same_answer_as_a_bad_signature(client, bank, other_bank):
    body = event_body()
    wrong_key = assert_refused(post_signed(client, bank, body, other_bank.headers(body)))

    unknown = assert_refused(
        client.post(
            "/api/v1/institutions/no-such-bank/events",
            data=body,
            content_type="application/cloudevents+json",
            headers=bank.headers(body),
        )
    )

    institution_set_status(institution=bank.institution, status=Institution.Status.SUSPENDED)
    suspended = assert_refused(post_signed(client, bank, body, bank.headers(body)))

    assert wrong_key == unknown == suspended


def test_a_reactivated_institution_is_accepted_again(client, bank):
    institution_set_status(institution=bank.institution, status=Institution.Status.SUSPENDED)
    assert post_events(client, bank, activity("e1")).status_code == 401
    institution_set_status(institution=bank.institution, status=Institution.Status.ACTIVE)
    assert post_events(client, bank, activity("e1")).status_code == 202


# --- Rotation ---------------------------------------------------------------------------------------


def post_with_secret(client, sender, secret: str, event_id: str):
    body = event_body(event_id)
    headers = crypto.webhook_headers(
        body, msg_id=f"m-{event_id}", timestamp=int(time.time()), hmac_secrets=[crypto.hmac_secret_bytes(secret)]
    )
    return post_signed(client, sender, body, headers)


def test_a_rotated_hmac_secret_verifies_beside_the_old_until_the_old_is_retired(client, bank):
    old_secret = bank.hmac_secret
    # Warm the per-process credential cache with the old credentials.
    assert post_with_secret(client, bank, old_secret, "before").status_code == 202

    issued = credential_add(institution=bank.institution, hmac=True)
    new_secret = issued.hmac_secret
    assert new_secret and new_secret != old_secret
    assert post_with_secret(client, bank, old_secret, "old-1").status_code == 202
    assert post_with_secret(client, bank, new_secret, "new-1").status_code == 202

    old = (
        Credential.objects.filter(institution=bank.institution, kind="hmac").exclude(pk__in=issued.credential_ids).get()
    )
    credential_retire(credential=old)
    response = post_with_secret(client, bank, old_secret, "old-2")
    assert response.status_code == 401 and response.json()["code"] == "invalid-signature"
    assert post_with_secret(client, bank, new_secret, "new-2").status_code == 202
    assert set(InboxEvent.objects.values_list("event_id", flat=True)) == {"before", "old-1", "new-1", "new-2"}


def test_rotation_through_the_commands(client, bank, capsys):
    old_secret = bank.hmac_secret
    assert post_with_secret(client, bank, old_secret, "before").status_code == 202

    call_command("institution_rotate_key", bank.code, "--hmac")
    rotated = json.loads(capsys.readouterr().out)
    new_secret = rotated["hmac_secret"]
    assert rotated["code"] == bank.code and new_secret.startswith("whsec_")
    assert post_with_secret(client, bank, old_secret, "old-1").status_code == 202
    assert post_with_secret(client, bank, new_secret, "new-1").status_code == 202

    old = (
        Credential.objects.filter(institution=bank.institution, kind="hmac")
        .exclude(pk__in=rotated["credential_ids"])
        .get()
    )
    call_command("institution_retire_key", bank.code, str(old.pk))
    assert f"retired {old.pk}" in capsys.readouterr().out
    assert post_with_secret(client, bank, old_secret, "old-2").status_code == 401
    assert post_with_secret(client, bank, new_secret, "new-2").status_code == 202


def test_a_rotated_ed25519_key_verifies_and_the_retired_one_stops(client, db):
    sender = make_sender("key-bank", hmac=False)
    old_key = sender.ed25519_private
    assert post_events(client, sender, activity("before")).status_code == 202

    new_key = Ed25519PrivateKey.generate()
    public = crypto.format_public_key(new_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    issued = credential_add(institution=sender.institution, ed25519_public_key=public)
    old = (
        Credential.objects.filter(institution=sender.institution, kind="ed25519")
        .exclude(pk__in=issued.credential_ids)
        .get()
    )

    sender.ed25519_private = new_key
    assert post_events(client, sender, activity("new-1")).status_code == 202
    sender.ed25519_private = old_key
    assert post_events(client, sender, activity("old-1")).status_code == 202

    credential_retire(credential=old)
    assert post_events(client, sender, activity("old-2")).status_code == 401
    sender.ed25519_private = new_key
    assert post_events(client, sender, activity("new-2")).status_code == 202


def test_the_last_signing_credential_cannot_be_retired(client, db):
    sender = make_sender("hmac-only", ed25519=False)
    only = Credential.objects.get(institution=sender.institution, kind="hmac")
    with pytest.raises(Exception, match="last signing credential"):
        credential_retire(credential=only)
    assert Credential.objects.get(pk=only.pk).status == "active"
    assert post_events(client, sender, activity("e1")).status_code == 202
