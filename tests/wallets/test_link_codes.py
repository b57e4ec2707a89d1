"""Link codes: short, unambiguous, random, single use, short-lived, limited, stored only as a hash."""

import re
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from tests.wallets.conftest import auth, make_person, new_code
from wallets.exceptions import TooManyLinkCodes
from wallets.models import LinkCode
from wallets.services import CODE_ALPHABET, link_code_create, link_code_hash, link_code_normalize

pytestmark = pytest.mark.django_db


def test_alphabet_has_no_ambiguous_characters():
    assert len(CODE_ALPHABET) == len(set(CODE_ALPHABET)) == 32
    assert not set("ILOU") & set(CODE_ALPHABET)


def test_a_code_is_8_unambiguous_characters_valid_10_minutes(client):
    person, token = make_person("alice")
    before = timezone.now()
    response = client.post("/api/v1/me/link-codes", headers=auth(token))
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"code", "expires_at"}
    assert re.fullmatch(r"[0-9ABCDEFGHJKMNPQRSTVWXYZ]{8}", body["code"])
    expires_at = parse_datetime(body["expires_at"])
    assert expires_at is not None
    assert before + timedelta(seconds=600) <= expires_at <= timezone.now() + timedelta(seconds=600)
    stored = LinkCode.objects.get(person=person)
    assert stored.used_at is None
    assert stored.code_hash == link_code_hash(body["code"])
    assert body["code"] not in stored.code_hash


def test_ttl_follows_the_setting(settings):
    settings.HUB_LINK_CODE_TTL_SECONDS = 60
    person, _ = make_person("alice")
    issued = link_code_create(person=person)
    remaining = (issued.expires_at - timezone.now()).total_seconds()
    assert 55 < remaining <= 60


def test_codes_are_random():
    person, _ = make_person("alice")
    codes = set()
    for _ in range(5):
        codes.add(link_code_create(person=person).code)
        LinkCode.objects.update(used_at=timezone.now())  # used codes do not count against the limit
    assert len(codes) == 5


def test_live_codes_are_limited_per_person(client, settings):
    settings.HUB_LINK_CODES_LIVE_MAX = 3
    _, token = make_person("alice")
    _, other_token = make_person("bob")
    for _ in range(3):
        new_code(client, token)
    response = client.post("/api/v1/me/link-codes", headers=auth(token))
    assert response.status_code == 429
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "too-many-link-codes"
    assert 1 <= int(response["Retry-After"]) <= 600
    assert LinkCode.objects.filter(person__user__username="alice").count() == 3

    new_code(client, other_token)  # the limit is per person

    # Expired and used codes no longer count.
    first, second = LinkCode.objects.filter(person__user__username="alice").order_by("pk")[:2]
    first.expires_at = timezone.now() - timedelta(seconds=1)
    first.save()
    new_code(client, token)
    second.used_at = timezone.now()
    second.save()
    new_code(client, token)
    assert client.post("/api/v1/me/link-codes", headers=auth(token)).status_code == 429


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("ABCD2345", "ABCD2345"),
        ("abcd2345", "ABCD2345"),
        ("abcd-2345", "ABCD2345"),
        (" AB CD 23 45 ", "ABCD2345"),
        ("OIL12345", "01112345"),  # Crockford: O reads 0, I and L read 1
        ("ABCD234", None),
        ("ABCD23456", None),
        ("ABCDU345", None),  # U is not in the alphabet
        ("ABCD_345", None),
        ("", None),
    ],
)
def test_typed_codes_are_normalized(typed, expected):
    assert link_code_normalize(typed) == expected


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_the_live_code_limit_holds_under_concurrent_requests(settings):
    settings.HUB_LINK_CODES_LIVE_MAX = 2
    person, _ = make_person("alice")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def request_code() -> None:
        try:
            barrier.wait()
            link_code_create(person=person)
            outcomes.append("issued")
        except TooManyLinkCodes:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=request_code) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["issued"] * 2 + ["refused"] * 4
    assert LinkCode.objects.filter(person=person).count() == 2
