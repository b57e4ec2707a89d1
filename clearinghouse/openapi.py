"""The published schema says what the hub answers: every error as the problem document it is.

A drf-spectacular postprocessing hook, so no operation can forget it:

* every 4xx and 5xx response is ``application/problem+json``: the ``Problem`` component, or the
  schema the view gave (the intake's 422 carries its per-event results) under that media type;
* a 429 says ``Retry-After``;
* an operation that reads a body also documents what any body can get: ``400`` (``malformed-json``,
  ``invalid-request``: clearinghouse.strict_json), ``411`` (a chunked body the server cannot read:
  clearinghouse.bodies), ``413`` and ``415`` (a media type or charset it does not take);
* an operation that takes ``cursor`` documents ``400 invalid-cursor`` (clearinghouse.pagination).

``tests/test_api_fuzz.py`` (schemathesis) holds every answer to this schema.
"""

from __future__ import annotations

from typing import Any

from clearinghouse.errors import PROBLEM_CONTENT_TYPE

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem document. Branch on `code`; show `detail` to a person.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "description": "`/problems/<code>`."},
        "title": {"type": "string"},
        "status": {"type": "integer", "description": "The HTTP status, again."},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "Stable error code, e.g. `rate-limited`, `invalid-cursor`."},
        "errors": {
            "type": "array",
            "description": "Where there are several: each names its field.",
            "items": {"type": "object", "additionalProperties": True},
        },
    },
    # Some problems carry more members (the intake's 422: `received`, `results`).
    "additionalProperties": True,
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
        "required": True,
    }
}

BODY_PROBLEMS = {
    "400": "`malformed-json` (not UTF-8 JSON, a key twice, NaN, ...) or `invalid-request` (fields; see `errors`).",
    "411": "`length-required`: a chunked body the server in front of the hub cannot decode; send Content-Length.",
    "413": "`payload-too-large`.",
    "415": "`unsupported-media-type`: another media type, or a charset other than UTF-8.",
}
CURSOR_PROBLEM = "`invalid-cursor`: a `cursor` this list did not give out."


def problem_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """POSTPROCESSING_HOOKS entry (see the module's docstring)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if "requestBody" in operation:
                for status, description in BODY_PROBLEMS.items():
                    _add(responses, status, description)
            if any(p.get("in") == "query" and p.get("name") == "cursor" for p in operation.get("parameters", [])):
                _add(responses, "400", CURSOR_PROBLEM)
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                given = [media.get("schema") for media in (response.get("content") or {}).values()]
                schema = given[0] if given and given[0] else PROBLEM_REF
                response["content"] = {PROBLEM_CONTENT_TYPE: {"schema": schema}}
                if status == "429":
                    response["headers"] = {**response.get("headers", {}), **RETRY_AFTER}
    return result


def _add(responses: dict[str, Any], status: str, description: str) -> None:
    """Document ``status``, or add ``description`` to what it already says."""
    if status not in responses:
        responses[status] = {"description": description}
    elif description not in responses[status].get("description", ""):
        responses[status]["description"] = f"{responses[status].get('description', '')} {description}".strip()
