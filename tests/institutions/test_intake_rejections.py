"""Bad input at the signed intake: each case gets the CONTRACT's answer and none writes a row.

Every body here is correctly signed and, apart from the one thing under test, a valid event, so a
missing check would show up as a 202 and a stored row.
"""

import json

import pytest
from django.conf import settings

from institutions.models import InboxEvent
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["type"] == f"/problems/{code}"
    return problem


def assert_nothing_stored() -> None:
    assert InboxEvent.objects.count() == 0


# --- Request level ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"   ", b"\xff\xfe\x00garbage", b'{"id": "e1",}'])
def test_a_body_that_is_not_json_is_malformed_json(client, bank, body):
    response = post_events(client, bank, None, body=body, content_type="application/json")
    assert_problem(response, 400, "malformed-json")
    assert_nothing_stored()


def test_deeply_nested_json_is_malformed_json_not_a_server_error(client, bank):
    response = post_events(client, bank, None, body=b"[" * 200_000, content_type="application/json")
    assert_problem(response, 400, "malformed-json")
    assert_nothing_stored()


@pytest.mark.parametrize(
    ("document", "content_type"),
    [
        ("an event?", "application/json"),
        (42, "application/json"),
        (None, "application/json"),
        ([], "application/cloudevents-batch+json"),
        ([activity("e1"), "not an event"], "application/cloudevents-batch+json"),
        ([activity("e1")], "application/cloudevents+json"),  # an array where one event was announced
        (activity("e1"), "application/cloudevents-batch+json"),  # one event where an array was announced
    ],
)
def test_json_that_is_not_an_event_or_a_batch_is_an_invalid_envelope(client, bank, document, content_type):
    response = post_events(client, bank, None, body=json.dumps(document).encode(), content_type=content_type)
    assert_problem(response, 400, "invalid-envelope")
    assert_nothing_stored()


def test_a_batch_of_1001_events_is_refused(client, bank):
    events = [activity(f"e{i}") for i in range(settings.HUB_INTAKE_MAX_EVENTS + 1)]
    response = post_events(client, bank, events)
    assert_problem(response, 400, "invalid-envelope")
    assert_nothing_stored()


def test_a_batch_of_1000_events_is_accepted(client, bank):
    events = [activity(f"e{i}") for i in range(settings.HUB_INTAKE_MAX_EVENTS)]
    response = post_events(client, bank, events)
    assert response.status_code == 202
    assert response.json()["received"] == 1000
    assert InboxEvent.objects.count() == 1000


def padded(event: dict, size: int) -> bytes:
    """A valid single-event body grown to exactly ``size`` bytes with insignificant whitespace."""
    body = json.dumps(event).encode()
    return body + b" " * (size - len(body))


def test_a_body_over_one_mebibyte_is_payload_too_large(client, bank):
    body = padded(activity("e1"), settings.HUB_INTAKE_MAX_BYTES + 1)
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    assert_problem(response, 413, "payload-too-large")
    assert_nothing_stored()


def test_a_body_of_exactly_one_mebibyte_is_accepted(client, bank):
    body = padded(activity("e1"), settings.HUB_INTAKE_MAX_BYTES)
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    assert response.status_code == 202, response.content


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded", ""])
def test_a_wrong_content_type_is_unsupported_media_type(client, bank, content_type):
    response = post_events(client, bank, activity("e1"), content_type=content_type)
    assert_problem(response, 415, "unsupported-media-type")
    assert_nothing_stored()


@pytest.mark.parametrize(
    "content_type",
    ["application/cloudevents+json; charset=utf-8", "APPLICATION/JSON", "application/json;charset=UTF-8"],
)
def test_content_type_parameters_and_case_are_accepted(client, bank, content_type):
    response = post_events(client, bank, activity("e1"), content_type=content_type)
    assert response.status_code == 202, response.content


# --- Per event --------------------------------------------------------------------------------------


def without(event: dict, name: str) -> dict:
    return {k: v for k, v in event.items() if k != name}


def rejected_alone(client, sender, event: dict) -> list[dict]:
    """Send one bad event: the request is refused as a whole with 422 and the per-event results."""
    response = post_events(client, sender, event)
    problem = assert_problem(response, 422, "invalid-events")
    assert problem["received"] == 1
    [result] = problem["results"]
    assert result["status"] == "rejected"
    assert_nothing_stored()
    return result["errors"]


@pytest.mark.parametrize("attribute", ["specversion", "id", "source", "type", "subject", "time"])
def test_a_missing_required_attribute_is_named(client, bank, attribute):
    errors = rejected_alone(client, bank, without(activity("e1"), attribute))
    assert {"field": attribute, "code": "missing"} in errors


def test_an_unknown_attribute_is_rejected(client, bank):
    errors = rejected_alone(client, bank, {**activity("e1"), "phone": "+86 138 0000 0000"})
    assert errors == [{"field": "phone", "code": "unexpected_field"}]


def test_an_unknown_data_field_is_rejected_by_name(client, bank):
    errors = rejected_alone(client, bank, activity("e1", gps="31.23,121.47"))
    assert errors == [{"field": "data.gps", "code": "unexpected_field"}]


@pytest.mark.parametrize("quantity", ["0", "-1", 0, -5, "0.000"])
def test_a_non_positive_quantity_is_rejected(client, bank, quantity):
    errors = rejected_alone(client, bank, activity("e1", quantity=quantity))
    assert errors == [{"field": "data.quantity", "code": "not_positive"}]


@pytest.mark.parametrize("quantity", ["twelve", "NaN", "Infinity", True, [1]])
def test_a_quantity_that_is_not_a_decimal_is_rejected(client, bank, quantity):
    errors = rejected_alone(client, bank, activity("e1", quantity=quantity))
    assert errors == [{"field": "data.quantity", "code": "invalid_decimal"}]


def test_an_id_of_129_characters_is_too_long(client, bank):
    long_id = "x" * 129
    response = post_events(client, bank, activity(long_id))
    problem = assert_problem(response, 422, "invalid-events")
    assert problem["results"] == [
        {"id": long_id, "status": "rejected", "errors": [{"field": "id", "code": "too_long"}]}
    ]
    assert_nothing_stored()


def test_an_id_of_128_characters_is_accepted(client, bank):
    response = post_events(client, bank, activity("x" * 128))
    assert response.status_code == 202
    assert InboxEvent.objects.get().event_id == "x" * 128


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"specversion": "0.3"}, {"field": "specversion", "code": "invalid_choice"}),
        ({"type": "carbon.activity.invented"}, {"field": "type", "code": "unknown_type"}),
        # Found by schemathesis (tests/test_api_fuzz.py): an object or a list as the type was a 500.
        ({"type": {}}, {"field": "type", "code": "unknown_type"}),
        ({"type": ["carbon.activity.recorded"]}, {"field": "type", "code": "unknown_type"}),
        ({"time": "2026-11-24T08:00:00"}, {"field": "time", "code": "invalid_rfc3339"}),
        ({"time": "yesterday"}, {"field": "time", "code": "invalid_rfc3339"}),
        ({"datacontenttype": "text/plain"}, {"field": "datacontenttype", "code": "invalid_choice"}),
        ({"data": ["action", "metro"]}, {"field": "data", "code": "not_an_object"}),
        ({"source": "has spaces in it"}, {"field": "source", "code": "invalid_uri_reference"}),
        ({"id": ""}, {"field": "id", "code": "invalid_string"}),
    ],
)
def test_invalid_attribute_values_are_named(client, bank, change, expected):
    errors = rejected_alone(client, bank, {**activity("e1"), **change})
    assert expected in errors


def test_a_missing_data_field_is_named(client, bank):
    errors = rejected_alone(client, bank, activity("e1", unit=None))
    assert errors == [{"field": "data.unit", "code": "missing"}]


def test_a_batch_mixing_good_and_bad_events_stores_only_the_good_ones(client, bank):
    batch = [
        activity("good-1"),
        activity("bad-gps", gps="31.23,121.47"),
        activity("good-2"),
        activity("bad-quantity", quantity="0"),
    ]
    response = post_events(client, bank, batch)
    assert response.status_code == 202
    assert response.json() == {
        "received": 4,
        "results": [
            {"id": "good-1", "status": "accepted"},
            {"id": "bad-gps", "status": "rejected", "errors": [{"field": "data.gps", "code": "unexpected_field"}]},
            {"id": "good-2", "status": "accepted"},
            {
                "id": "bad-quantity",
                "status": "rejected",
                "errors": [{"field": "data.quantity", "code": "not_positive"}],
            },
        ],
    }
    assert sorted(InboxEvent.objects.values_list("event_id", flat=True)) == ["good-1", "good-2"]


def test_a_batch_where_every_event_is_rejected_is_422_with_results_in_order(client, bank):
    batch = [without(activity("a"), "subject"), activity("b", gps="x"), {"id": "c"}]
    response = post_events(client, bank, batch)
    problem = assert_problem(response, 422, "invalid-events")
    assert problem["received"] == 3
    assert [r["id"] for r in problem["results"]] == ["a", "b", "c"]
    assert {r["status"] for r in problem["results"]} == {"rejected"}
    assert_nothing_stored()


# --- Same id again ----------------------------------------------------------------------------------


def test_the_same_id_and_content_again_is_a_duplicate_with_no_effect(client, bank):
    assert post_events(client, bank, activity("e1")).status_code == 202
    before = InboxEvent.objects.values().get()

    response = post_events(client, bank, activity("e1"))
    assert response.status_code == 202
    assert response.json()["results"] == [{"id": "e1", "status": "duplicate"}]
    assert InboxEvent.objects.values().get() == before


def test_the_same_id_with_other_content_is_a_conflict_and_the_first_stays(client, bank):
    assert post_events(client, bank, activity("e1", quantity="12.5")).status_code == 202
    before = InboxEvent.objects.values().get()

    response = post_events(client, bank, activity("e1", quantity="99"))
    assert response.status_code == 202
    conflict = {"id": "e1", "status": "conflict", "errors": [{"field": "id", "code": "conflict"}]}
    assert response.json()["results"] == [conflict]
    assert InboxEvent.objects.values().get() == before


def test_repeats_inside_one_batch_are_duplicate_or_conflict(client, bank):
    batch = [activity("e1"), activity("e1"), activity("e1", quantity="3")]
    response = post_events(client, bank, batch)
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "duplicate", "conflict"]
    assert InboxEvent.objects.count() == 1


def test_event_ids_are_unique_per_institution_not_across_them(client, bank, other_bank):
    assert post_events(client, bank, activity("e1")).json()["results"][0]["status"] == "accepted"
    assert post_events(client, other_bank, activity("e1", quantity="7")).json()["results"][0]["status"] == "accepted"
    assert InboxEvent.objects.count() == 2
