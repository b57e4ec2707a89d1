"""Strict request bodies everywhere JSON is read: UTF-8 only, each object key once, no NaN.

The same body breaks the same rule at the signed intake (its own fast parser), at the persons' API
(DRF, through ``StrictJSONParser``) and at the redemption POST's direct path; each must be refused
alike, with nothing written: ``400 malformed-json`` for the body, ``415 unsupported-media-type`` for
a declared charset other than UTF-8.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model

from clearinghouse import strict_json
from clearinghouse.errors import MalformedJson, UnsupportedMediaType
from institutions.models import InboxEvent
from settlement.models import Redemption
from tests.conftest import activity, make_sender, post_events
from tests.settlement.conftest import make_reward, month_end
from tests.wallets.conftest import PASSWORD, auth, credit, make_person

pytestmark = pytest.mark.django_db

GOOD = json.dumps(activity("e1")).encode()
# (what it is, body): each a valid event in every other respect.
BAD_BODIES = [
    ("UTF-16 with BOM", GOOD.decode().encode("utf-16")),
    ("UTF-16 little-endian", GOOD.decode().encode("utf-16-le")),
    ("UTF-16 big-endian", GOOD.decode().encode("utf-16-be")),
    ("UTF-32", GOOD.decode().encode("utf-32")),
    ("UTF-8 with BOM", b"\xef\xbb\xbf" + GOOD),
    ("Latin-1", GOOD.replace(b"/bank/app", "/bänk".encode("latin-1"))),
    ("an encoded surrogate (CESU-8)", GOOD.replace(b"/bank/app", b"/bank/\xed\xa0\x80")),
    ("a duplicate top-level key", GOOD.replace(b'"specversion": "1.0"', b'"specversion": "1.0", "id": "e2"')),
    ("a duplicate key in data", GOOD.replace(b'"unit": "km"', b'"unit": "km", "quantity": "99"')),
    ("NaN", GOOD.replace(b'"data": {', b'"data": {"n": NaN, ')),
]


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    return body


# --- The parser itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[name for name, _ in BAD_BODIES])
def test_every_bad_body_is_malformed_json(name, body):
    with pytest.raises(MalformedJson):
        strict_json.loads(body)
    assert json.loads(GOOD) == strict_json.loads(GOOD)


def test_a_duplicate_key_is_named_at_any_depth():
    for body, key in [
        (b'{"a": 1, "a": 2}', '"a"'),
        (b'{"a": {"b": [{"c": 1, "d": 2, "c": 3}]}}', '"c"'),
        (b'[{"x": 1}, {"y": 1, "y": 1}]', '"y"'),
        ('{"é\\n": 1, "é\\n": 2}'.encode(), '"\\u00e9\\n"'),
    ]:
        with pytest.raises(MalformedJson) as refused:
            strict_json.loads(body)
        assert f"The key {key} appears twice" in refused.value.message


def test_equal_keys_in_different_objects_and_paired_surrogates_are_fine():
    document = {"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]}
    assert strict_json.loads(json.dumps(document).encode()) == document
    assert strict_json.loads(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}


def test_lone_surrogates_are_refused_unless_the_caller_checks_them_itself():
    for body in (b'{"a": "\\ud800"}', b'{"\\udc00": 1}', b'["x", ["\\udfff"]]'):
        with pytest.raises(MalformedJson):
            strict_json.loads(body)
        strict_json.loads(body, allow_lone_surrogates=True)
    # An escaped backslash before "ud800" is text, not an escape.
    assert strict_json.loads(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}


def test_decimals_are_read_as_decimal_when_asked():
    assert strict_json.loads(b'{"q": 12.5}', parse_float=Decimal) == {"q": Decimal("12.5")}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-16", 'application/json;charset="latin-1"'])
def test_a_charset_other_than_utf8_is_unsupported(content_type):
    with pytest.raises(UnsupportedMediaType):
        strict_json.check_charset(content_type)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=UTF-8", "a/b; charset=utf8"])
def test_utf8_and_no_charset_are_fine(content_type):
    strict_json.check_charset(content_type)


# --- The intake -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body"), BAD_BODIES, ids=[name for name, _ in BAD_BODIES])
def test_the_intake_refuses_a_signed_bad_body_as_malformed_json(client, bank, name, body):
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    problem(response, 400, "malformed-json")
    assert not InboxEvent.objects.exists()


def test_the_intake_names_the_duplicate_key(client, bank):
    body = GOOD.replace(b'"unit": "km"', b'"unit": "km", "quantity": "99"')
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    assert '"quantity" appears twice' in problem(response, 400, "malformed-json")["detail"]


def test_the_intake_refuses_a_declared_charset_other_than_utf8(client, bank):
    response = post_events(client, bank, None, body=GOOD, content_type="application/cloudevents+json; charset=utf-16")
    problem(response, 415, "unsupported-media-type")
    assert not InboxEvent.objects.exists()


def test_the_intake_still_names_a_lone_surrogate_per_event(client, bank):
    body = GOOD.replace(b'"subject": "cust-1"', b'"subject": "\\ud800"')
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    [result] = problem(response, 422, "invalid-events")["results"]
    assert {"field": "subject", "code": "invalid_string"} in result["errors"]


# --- The persons' API (DRF) -------------------------------------------------------------------------


def signup_body(username: str = "alice") -> bytes:
    return json.dumps({"username": username, "password": PASSWORD}).encode()


PERSON_BAD_BODIES = [
    ("UTF-16", signup_body().decode().encode("utf-16")),
    ("UTF-16-LE", signup_body().decode().encode("utf-16-le")),
    ("UTF-32", signup_body().decode().encode("utf-32")),
    ("BOM", b"\xef\xbb\xbf" + signup_body()),
    ("duplicate key", b'{"username": "alice", "username": "mallory", "password": "%s"}' % PASSWORD.encode()),
    ("lone surrogate", b'{"username": "alice\\ud800", "password": "%s"}' % PASSWORD.encode()),
    ("NaN", b'{"username": "alice", "password": "%s", "n": NaN}' % PASSWORD.encode()),
]


@pytest.mark.parametrize(("name", "body"), PERSON_BAD_BODIES, ids=[name for name, _ in PERSON_BAD_BODIES])
@pytest.mark.parametrize("path", ["/api/v1/auth/signup", "/api/v1/auth/token"])
def test_the_persons_api_refuses_bad_bodies_as_malformed_json(client, path, name, body):
    if path.endswith("token"):
        make_person("alice")
    users = get_user_model().objects.count()
    response = client.post(path, data=body, content_type="application/json")
    detail = problem(response, 400, "malformed-json")["detail"]
    if name == "duplicate key":
        assert '"username" appears twice' in detail
    assert get_user_model().objects.count() == users


def test_the_persons_api_refuses_a_declared_charset_other_than_utf8(client):
    response = client.post("/api/v1/auth/signup", data=signup_body(), content_type="application/json; charset=utf-16")
    problem(response, 415, "unsupported-media-type")
    assert not get_user_model().objects.exists()
    response = client.post("/api/v1/auth/signup", data=signup_body(), content_type="application/json; charset=utf-8")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    "body",
    [
        b'{"reward": "coffee", "reward": "tea"}',
        b'{"reward": "coffee", "quantity": 1, "quantity": 2}',
        '{"reward": "coffee"}'.encode("utf-16"),
        b'{"reward": "coffee", "note": "\\udc00"}',
    ],
)
def test_a_redemption_body_is_held_to_the_same_rules_on_either_path(client, bank, body):
    make_reward(make_sender("coffee-co", provider=True), "coffee", points=30)
    person, token = make_person("mei")
    credit(person.pk, bank.institution.pk, month_end(3), 300_000)
    headers = {**auth(token), "Idempotency-Key": "k1"}
    response = client.post("/api/v1/me/redemptions", data=body, content_type="application/json", headers=headers)
    problem(response, 400, "malformed-json")
    assert not Redemption.objects.exists()
