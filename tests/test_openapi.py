"""The published schema documents every error as the problem+json it is (clearinghouse.openapi); the
conformance of each answer to it is tests/test_api_fuzz.py's (schemathesis)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(client) -> dict:
    response = client.get("/api/v1/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def operations(schema: dict):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_error_is_documented_as_problem_json(schema):
    assert schema["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status", "detail", "code"]
    for name, operation in operations(schema):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert list(response["content"]) == ["application/problem+json"], (name, status)


def test_throttled_answers_document_retry_after(schema):
    throttled = {name for name, operation in operations(schema) if "429" in operation["responses"]}
    assert {"POST /api/v1/auth/token", "POST /api/v1/auth/signup", "POST /api/v1/me/link-codes"} <= throttled
    for name, operation in operations(schema):
        if name in throttled:
            assert "Retry-After" in operation["responses"]["429"]["headers"], name


def test_every_paginated_list_documents_invalid_cursor(schema):
    paginated = [
        (name, operation)
        for name, operation in operations(schema)
        if any(p["name"] == "cursor" for p in operation.get("parameters", []))
    ]
    assert len(paginated) == 3
    for name, operation in paginated:
        assert "invalid-cursor" in operation["responses"]["400"]["description"], name


def test_every_operation_with_a_body_documents_what_any_body_can_get(schema):
    for name, operation in operations(schema):
        if "requestBody" in operation:
            assert {"400", "411", "413", "415"} <= set(operation["responses"]), name


def test_the_standard_is_documented_as_the_list_it_is(schema, client):
    documented = schema["paths"]["/api/v1/standard/scenarios"]["get"]["responses"]["200"]
    ref = documented["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert schema["components"]["schemas"][ref]["properties"]["scenarios"]["type"] == "array"
    assert isinstance(client.get("/api/v1/standard/scenarios").json()["scenarios"], list)


def test_the_intake_documents_its_events_and_results(schema):
    operation = schema["paths"]["/api/v1/institutions/{code}/events"]["post"]
    single = operation["requestBody"]["content"]["application/cloudevents+json"]["schema"]
    assert single["required"] == ["specversion", "id", "source", "type"] and single["additionalProperties"] is False
    batch = operation["requestBody"]["content"]["application/cloudevents-batch+json"]["schema"]
    assert batch["type"] == "array" and batch["maxItems"] == 1000
    assert set(operation["responses"]) >= {"202", "400", "401", "411", "413", "415", "422", "429", "503"}
    rejected = operation["responses"]["422"]["content"]["application/problem+json"]["schema"]["$ref"]
    assert rejected.endswith("/IntakeRejected")


def test_a_persons_body_past_the_upload_limit_is_413(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"username": "alice", "password": "x" * 2000}).encode()
    response = client.post("/api/v1/auth/signup", data=body, content_type="application/json")
    assert response.status_code == 413, response.content
    assert response.json()["code"] == "payload-too-large"


def test_a_body_django_refuses_outside_drf_is_413_problem_json(client, bank, settings):
    # The intake reads request.body itself (no DRF): with Django's limit below the intake's, Django
    # refuses the body there, and its 400 page became a problem document.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    settings.HUB_INTAKE_MAX_BYTES = 5000
    body = json.dumps(activity("e1", fingerprint="x" * 1500)).encode()
    response = post_events(client, bank, None, body=body, content_type="application/cloudevents+json")
    assert response.status_code == 413, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "payload-too-large"
