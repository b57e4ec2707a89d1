"""Institution-facing API: the signed intake, following an event, and the hub's public keys."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clearinghouse.errors import HubError, InvalidEvents, NotFound, problem_response
from institutions import envelope, intake
from institutions.authentication import InstitutionTokenAuthentication
from institutions.models import InboxEvent, Institution
from institutions.services import hub_public_keys

PROBLEM = OpenApiResponse(description="RFC 9457 problem document (application/problem+json).")

_SIGNATURE_HEADERS = [
    OpenApiParameter(
        "webhook-id",
        str,
        OpenApiParameter.HEADER,
        required=True,
        description="Message id (no '.'), stable across the sender's retries.",
    ),
    OpenApiParameter(
        "webhook-timestamp",
        int,
        OpenApiParameter.HEADER,
        required=True,
        description="Integer Unix seconds of this attempt; within ±300 s of the hub's clock.",
    ),
    OpenApiParameter(
        "webhook-signature",
        str,
        OpenApiParameter.HEADER,
        required=True,
        description="Space-separated `v1,<base64 HMAC-SHA256>` and/or `v1a,<base64 Ed25519>` "
        "over `<webhook-id>.<webhook-timestamp>.<raw body>`.",
    ),
]


class EventErrorOut(serializers.Serializer):
    field = serializers.CharField(help_text="`id`, `time`, `data.quantity`, ...")
    code = serializers.CharField(help_text="`missing`, `unexpected_field`, `invalid_string`, ...")


class EventResultOut(serializers.Serializer):
    """One event's result, in request order."""

    id = serializers.CharField(allow_null=True, help_text="The event's id; null when it had no string id.")
    status = serializers.ChoiceField(["accepted", "duplicate", "conflict", "rejected"])
    # The metaclass pops declared fields off the class, so this does not shadow Serializer.errors at runtime.
    errors = EventErrorOut(  # type: ignore[assignment]
        many=True, required=False, help_text="Why the event was rejected (or is a `conflict`), field by field."
    )


_INTAKE_RESPONSE = inline_serializer(
    "IntakeResponse",
    {"received": serializers.IntegerField(help_text="Events in the request."), "results": EventResultOut(many=True)},
)
# 422: the problem document, with the same results inside.
_INTAKE_REJECTED = inline_serializer(
    "IntakeRejected",
    {
        "type": serializers.CharField(),
        "title": serializers.CharField(),
        "status": serializers.IntegerField(),
        "detail": serializers.CharField(),
        "code": serializers.CharField(help_text="`invalid-events`."),
        "received": serializers.IntegerField(),
        "results": EventResultOut(many=True),
    },
)


def _cloud_event_schema() -> dict[str, Any]:
    """The CloudEvent the intake takes, from the envelope's own rules (institutions.envelope)."""
    data_fields = "; ".join(
        f"`{event_type}`: {', '.join(f'`{name}`' for name in fields) or 'none'}"
        for event_type, fields in sorted(envelope.DATA_SCHEMAS.items())
    )
    return {
        "type": "object",
        "required": ["specversion", "id", "source", "type"],
        "additionalProperties": False,
        "properties": {
            "specversion": {"type": "string", "enum": ["1.0"]},
            "id": {"type": "string", "minLength": 1, "maxLength": envelope.MAX_ID},
            "source": {"type": "string", "minLength": 1, "maxLength": envelope.MAX_SOURCE, "format": "uri-reference"},
            "type": {"type": "string", "enum": sorted(envelope.EVENT_TYPES)},
            "subject": {
                "type": "string",
                "minLength": 1,
                "maxLength": envelope.MAX_SUBJECT,
                "description": "The institution's own id for the person; required for activity and account events.",
            },
            "time": {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339 with an offset; required for `carbon.activity.recorded`.",
            },
            "datacontenttype": {"type": "string", "enum": ["application/json"]},
            "data": {
                "type": "object",
                "description": f"Allow-listed per type (any other field is rejected): {data_fields}.",
            },
        },
    }


class EventIntakeApi(APIView):
    """``POST /api/v1/institutions/{code}/events``: the hot path.

    POST is served by :meth:`dispatch` as a plain Django view: DRF's request wrapping, content
    negotiation and response rendering cost about a tenth of a one-event request's CPU
    (docs/performance.md) and none of them is wanted here (the signature is checked on the exact
    bytes received, the answer is always JSON, errors are the same problem documents). The class
    stays an ``APIView`` so drf-spectacular documents the operation from :meth:`post`; other methods
    still go through DRF (405 as problem+json).
    """

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method != "POST":
            return super().dispatch(request, *args, **kwargs)
        try:
            return events_push(request, kwargs["code"])
        except HubError as error:
            return problem_response(error)

    @extend_schema(
        operation_id="events_push",
        summary="Push signed CloudEvents (single or batch)",
        description=(
            "Each event is checked alone; one refused is `rejected` in the 202 results, with errors naming "
            "the field (422 when every event is refused). Beyond the contract, values the hub cannot store "
            "and read back are refused: `time` must carry a UTC offset of whole minutes under 16 hours and "
            "fall, in UTC, from 0001-01-02T00:00:00Z to 9999-12-30T23:59:59.999999Z (`out_of_range`; an "
            "offset with seconds is `invalid_rfc3339`); `data.quantity` a positive decimal up to 1E+12 with "
            "at most 12 decimal places; `data.issuer_points` an integer from 0 to 2^63 - 1. An activity whose "
            "measure the books cannot hold (1E+18 or more in its unit or grams, a credit over 1E+12 mg, points "
            "expiring after 9999) is quarantined with reason `out_of_range`."
        ),
        parameters=_SIGNATURE_HEADERS,
        request={
            intake.SINGLE: _cloud_event_schema(),
            intake.BATCH: {
                "type": "array",
                "items": _cloud_event_schema(),
                "minItems": 1,
                "maxItems": settings.HUB_INTAKE_MAX_EVENTS,
            },
            intake.EITHER: {"oneOf": [_cloud_event_schema(), {"type": "array", "items": _cloud_event_schema()}]},
        },
        responses={
            202: OpenApiResponse(_INTAKE_RESPONSE, description="Stored (committed) before this answer."),
            400: OpenApiResponse(description="`malformed-json` or `invalid-envelope`."),
            401: OpenApiResponse(description="`invalid-signature` or `stale-timestamp`."),
            411: OpenApiResponse(description="`length-required`."),
            413: OpenApiResponse(description="`payload-too-large`."),
            415: OpenApiResponse(description="`unsupported-media-type`."),
            422: OpenApiResponse(_INTAKE_REJECTED, description="`invalid-events`: every event was rejected."),
            429: OpenApiResponse(description="`rate-limited`."),
            503: OpenApiResponse(description="`unavailable`: nothing was stored; retry later."),
        },
        examples=[
            OpenApiExample(
                "activity",
                request_only=True,
                media_type=intake.SINGLE,
                value={
                    "specversion": "1.0",
                    "id": "evt-1",
                    "source": "/bank/app",
                    "type": "carbon.activity.recorded",
                    "subject": "cust-42",
                    "time": "2026-11-24T08:00:00Z",
                    "data": {"action": "metro", "quantity": "12.5", "unit": "km"},
                },
            )
        ],
        auth=[],
    )
    def post(self, request: Request, code: str) -> HttpResponse:
        # Documents the operation for the schema; dispatch() serves POST without going through here.
        return events_push(request._request, code)


def events_push(request: HttpRequest, code: str) -> HttpResponse:
    """Check, store and answer one intake request; raises :class:`HubError` for a problem answer."""
    intake.check_size(request.META.get("CONTENT_LENGTH"))
    media_type = intake.check_content_type(request.META.get("CONTENT_TYPE", ""))
    body = request.body
    intake.check_size(str(len(body)))  # chunked bodies declare no length up front
    meta = request.META  # read directly: request.headers would parse every header of the request
    headers = {
        "webhook-id": meta.get("HTTP_WEBHOOK_ID", ""),
        "webhook-timestamp": meta.get("HTTP_WEBHOOK_TIMESTAMP", ""),
        "webhook-signature": meta.get("HTTP_WEBHOOK_SIGNATURE", ""),
    }
    verifier = intake.authenticate(code, headers, body)
    intake.check_rate(verifier)
    events = intake.parse_events(body, media_type)
    result = intake.events_store(verifier=verifier, webhook_id=headers["webhook-id"], events=events)
    if result.all_rejected:
        raise InvalidEvents("Every event in the request was rejected; see results.", **result.body())
    return HttpResponse(
        # ASCII escapes: an echoed id or field name holding a lone surrogate still encodes.
        json.dumps(result.body(), separators=(",", ":")),
        status=202,
        content_type="application/json",
    )


class EventStatusApi(APIView):
    authentication_classes = [InstitutionTokenAuthentication]
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="events_status",
        summary="Follow one event",
        responses={
            200: inline_serializer(
                "EventStatus",
                {
                    "id": serializers.CharField(),
                    "type": serializers.CharField(),
                    "status": serializers.ChoiceField(InboxEvent.Status.values),
                    "outcome": serializers.DictField(allow_null=True),
                },
            ),
            401: PROBLEM,
            404: PROBLEM,
        },
    )
    def get(self, request: Request, code: str, event_id: str) -> Response:
        institution = request.auth
        assert isinstance(institution, Institution)  # set by InstitutionTokenAuthentication
        # A token sees only its own institution: another code answers like a missing event.
        # Only what the answer shows: a row whose other values cannot be read back still answers.
        event = (
            InboxEvent.objects.filter(institution=institution, event_id=event_id)
            .only("event_id", "type", "status", "outcome", "last_error")
            .first()
            if institution.code == code
            else None
        )
        if event is None:
            raise NotFound(f"No event {event_id!r} from this institution.")
        outcome: dict[str, Any] | None = event.outcome
        if event.status in (InboxEvent.Status.QUARANTINED, InboxEvent.Status.DEAD):
            outcome = {**(outcome or {}), "reason": event.last_error or None}
        return Response({"id": event.event_id, "type": event.type, "status": event.status, "outcome": outcome})


class HubKeysApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="hub_keys",
        summary="The hub's Ed25519 public keys (verify v1a signatures on hub webhooks)",
        responses={
            200: inline_serializer(
                "HubKeys",
                {
                    "keys": inline_serializer(
                        "HubKey",
                        {
                            "id": serializers.CharField(),
                            "public_key": serializers.CharField(),
                            "status": serializers.CharField(),
                        },
                        many=True,
                    )
                },
            )
        },
        auth=[],
    )
    def get(self, request: Request) -> Response:
        keys = [{"id": k.key_id, "public_key": k.public_key, "status": k.status} for k in hub_public_keys()]
        return Response({"keys": keys})
