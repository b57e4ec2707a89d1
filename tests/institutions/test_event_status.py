"""Following an event (``GET /api/v1/institutions/{code}/events/{id}``) and the hub's public keys."""

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from institutions import crypto, inbox
from institutions.models import Credential, Institution
from institutions.services import credential_retire, hub_key_rotate, hub_signing_key, institution_set_status
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def follow(client, code: str, event_id: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get(f"/api/v1/institutions/{code}/events/{event_id}", headers=headers)


def assert_problem(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == code


def test_a_received_event(client, bank):
    post_events(client, bank, activity("e1"))
    response = follow(client, bank.code, "e1", bank.api_token)
    assert response.status_code == 200
    assert response.json() == {"id": "e1", "type": "carbon.activity.recorded", "status": "received", "outcome": None}


def test_a_processed_event_shows_the_handlers_outcome(client, bank, activity_handler):
    post_events(client, bank, activity("e1"))
    inbox.inbox_drain()
    body = follow(client, bank.code, "e1", bank.api_token).json()
    assert body["status"] == "processed"
    assert body["outcome"] == {"points": 42, "reason": None}


def test_a_quarantined_event_shows_its_reason(client, bank, activity_handler):
    activity_handler.quarantine.add("e1")
    post_events(client, bank, activity("e1"))
    inbox.inbox_drain()
    body = follow(client, bank.code, "e1", bank.api_token).json()
    assert body["status"] == "quarantined"
    assert body["outcome"]["reason"] == "unknown_action"


def test_an_event_id_with_slashes_can_be_followed(client, bank):
    post_events(client, bank, activity("2026/11/24/e1"))
    assert follow(client, bank.code, "2026/11/24/e1", bank.api_token).json()["id"] == "2026/11/24/e1"


def test_an_unknown_event_is_404(client, bank):
    assert_problem(follow(client, bank.code, "nope", bank.api_token), 404, "not-found")


def test_a_token_sees_only_its_own_institutions_events(client, bank, other_bank):
    post_events(client, bank, activity("mine"))
    # Another institution's token, at the owner's path and at its own path: the event does not exist.
    assert_problem(follow(client, bank.code, "mine", other_bank.api_token), 404, "not-found")
    assert_problem(follow(client, other_bank.code, "mine", other_bank.api_token), 404, "not-found")
    # And its own token cannot read another institution's path either.
    post_events(client, other_bank, activity("theirs"))
    assert_problem(follow(client, other_bank.code, "theirs", bank.api_token), 404, "not-found")
    assert follow(client, bank.code, "mine", bank.api_token).status_code == 200


def test_a_missing_token_is_401(client, bank):
    post_events(client, bank, activity("e1"))
    response = follow(client, bank.code, "e1", None)
    assert_problem(response, 401, "not-authenticated")
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", ["Bearer chtok_made-up", "Bearer", "Bearer a b", "Token x"])
def test_an_invalid_token_is_401(client, bank, authorization):
    post_events(client, bank, activity("e1"))
    response = client.get(f"/api/v1/institutions/{bank.code}/events/e1", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] in {"not-authenticated", "authentication-failed"}


def test_a_retired_token_is_401(client, bank):
    post_events(client, bank, activity("e1"))
    credential_retire(credential=Credential.objects.get(institution=bank.institution, kind="api_token"))
    assert_problem(follow(client, bank.code, "e1", bank.api_token), 401, "authentication-failed")


def test_a_suspended_institutions_token_is_401(client, bank):
    post_events(client, bank, activity("e1"))
    institution_set_status(institution=bank.institution, status=Institution.Status.SUSPENDED)
    assert_problem(follow(client, bank.code, "e1", bank.api_token), 401, "authentication-failed")


def test_the_hmac_secret_is_not_an_api_token(client, bank):
    post_events(client, bank, activity("e1"))
    assert follow(client, bank.code, "e1", bank.hmac_secret).status_code == 401


# --- Hub keys ---------------------------------------------------------------------------------------


def test_hub_keys_are_public_and_verify_the_hubs_signatures(client, db):
    response = client.get("/api/v1/hub/keys")
    assert response.status_code == 200
    [key] = response.json()["keys"]
    assert set(key) == {"id", "public_key", "status"}
    assert key["status"] == "active"

    signing_key, private = hub_signing_key()
    assert signing_key.key_id == key["id"]
    content = crypto.signed_content("msg_1", 1_700_000_000, b"{}")
    raw_public = crypto.public_key_bytes(key["public_key"])
    Ed25519PublicKey.from_public_bytes(raw_public).verify(private.sign(content), content)  # raises if not
    assert base64.b64encode(raw_public).decode() in key["public_key"]


def test_after_a_hub_key_rotation_both_keys_are_listed_active_first(client, db):
    old, _ = hub_signing_key()
    new = hub_key_rotate()
    keys = client.get("/api/v1/hub/keys").json()["keys"]
    assert [(k["id"], k["status"]) for k in keys] == [(new.key_id, "active"), (old.key_id, "published")]
