"""What the hub keeps of an institution's secrets: enough to verify, never the secret itself in clear."""

import base64
import hashlib

import pytest
from cryptography.fernet import Fernet
from django.db import connection

from institutions import crypto, selectors
from institutions.models import Credential
from institutions.selectors import institution_for_token, institution_verifier
from institutions.services import credential_add, credential_retire

pytestmark = pytest.mark.django_db


def credentials_table_text() -> str:
    """Every column of every credential row, as the database holds it."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {Credential._meta.db_table}")  # noqa: S608 (a fixed table name)
        return "\n".join(repr(row) for row in cursor.fetchall())


def test_the_hmac_secret_is_stored_encrypted(bank):
    secret = bank.hmac_secret
    assert secret.startswith("whsec_")
    stored = credentials_table_text()
    assert secret not in stored
    assert secret.removeprefix("whsec_") not in stored
    assert base64.b64decode(secret.removeprefix("whsec_")).hex() not in stored

    row = Credential.objects.get(institution=bank.institution, kind="hmac")
    assert crypto.unseal(row.secret_sealed) == secret  # sealed with the hub key, recoverable for verifying


def test_the_api_token_is_stored_hashed(bank):
    token = bank.api_token
    assert token not in credentials_table_text()
    row = Credential.objects.get(institution=bank.institution, kind="api_token")
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert institution_for_token(token) == bank.institution


def test_the_ed25519_credential_is_the_public_key_only(bank):
    row = Credential.objects.get(institution=bank.institution, kind="ed25519")
    assert len(base64.b64decode(row.public_key)) == 32
    assert (row.secret_sealed, row.token_hash) == ("", "")


def test_hints_tell_credentials_apart_without_revealing_them(bank):
    for row in Credential.objects.filter(institution=bank.institution):
        assert row.hint.endswith("…") and len(row.hint) <= 14


def test_a_new_api_token_works_beside_the_old_until_the_old_is_retired(bank):
    issued = credential_add(institution=bank.institution, api_token=True)
    assert issued.api_token and issued.api_token != bank.api_token
    assert institution_for_token(bank.api_token) == bank.institution
    assert institution_for_token(issued.api_token) == bank.institution

    credential_retire(credential=Credential.objects.get(token_hash=crypto.hash_token(bank.api_token)))
    assert institution_for_token(bank.api_token) is None
    assert institution_for_token(issued.api_token) == bank.institution


def test_retired_credentials_drop_out_of_the_verifier(bank):
    issued = credential_add(institution=bank.institution, hmac=True)
    before = institution_verifier(bank.code)
    assert before is not None and len(before.hmac_secrets) == 2
    old = Credential.objects.filter(institution=bank.institution, kind="hmac").exclude(pk__in=issued.credential_ids)
    credential_retire(credential=old.get())
    after = institution_verifier(bank.code)
    assert after is not None and issued.hmac_secret is not None
    assert after.hmac_secrets == (crypto.hmac_secret_bytes(issued.hmac_secret),)


def test_sealed_secrets_survive_a_hub_key_rotation(bank, settings):
    row = Credential.objects.get(institution=bank.institution, kind="hmac")
    settings.HUB_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), *settings.HUB_ENCRYPTION_KEYS]
    assert crypto.unseal(row.secret_sealed) == bank.hmac_secret
    resealed = crypto.reseal(row.secret_sealed)
    settings.HUB_ENCRYPTION_KEYS = settings.HUB_ENCRYPTION_KEYS[:1]
    assert crypto.unseal(resealed) == bank.hmac_secret


def test_the_credential_cache_stays_bounded_whatever_codes_are_asked_for(bank, monkeypatch):
    monkeypatch.setattr(selectors, "CACHE_MAX_ENTRIES", 5)
    for i in range(20):
        assert institution_verifier(f"no-such-bank-{i}") is None
    assert len(selectors._cache) <= 5
    verifier = institution_verifier(bank.code)
    assert verifier is not None and verifier.institution_id == bank.institution.pk
