"""One error vocabulary for the whole hub, rendered as RFC 9457 problem documents.

Services raise :class:`HubError` subclasses with a stable ``code``; views never build error bodies by
hand. :func:`problem_exception_handler` turns those, DRF's own exceptions and Django's 404 and
permission errors into ``application/problem+json`` with that code, so a client can branch on
``code`` and a person can read ``detail``.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

PROBLEM_CONTENT_TYPE = "application/problem+json"


class HubError(Exception):
    """Base of every error the hub reports to a client."""

    status: int = 400
    code: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any):
        self.message = message or self.title
        self.headers = headers or {}
        self.extra = extra
        super().__init__(self.message)

    def problem(self) -> dict[str, Any]:
        return problem_body(self.status, self.code, self.title, self.message, **self.extra)


class InvalidSignature(HubError):
    status, code, title = 401, "invalid-signature", "Invalid signature"


class StaleTimestamp(HubError):
    status, code, title = 401, "stale-timestamp", "Stale timestamp"


class MalformedJson(HubError):
    status, code, title = 400, "malformed-json", "Malformed JSON"


class InvalidEnvelope(HubError):
    status, code, title = 400, "invalid-envelope", "Invalid envelope"


class InvalidCursor(HubError):
    status, code, title = 400, "invalid-cursor", "Invalid cursor"


class InvalidEvents(HubError):
    status, code, title = 422, "invalid-events", "Every event was rejected"


class LengthRequired(HubError):
    status, code, title = 411, "length-required", "Length required"


class PayloadTooLarge(HubError):
    status, code, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(HubError):
    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class RateLimited(HubError):
    status, code, title = 429, "rate-limited", "Rate limited"


class Unavailable(HubError):
    """The hub cannot do it now (its database is out of reach): come back after ``Retry-After``.

    Every such answer tells the sender when to retry: without it a sender that retries 503s (as the
    contract tells it to) either hammers a recovering hub or waits longer than it needs.
    """

    status, code, title = 503, "unavailable", "Service unavailable"
    retry_after_seconds = 5

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message, headers={"Retry-After": str(self.retry_after_seconds), **(headers or {})}, **extra)


class NotFound(HubError):
    status, code, title = 404, "not-found", "Not found"


class InternalError(HubError):
    status, code, title = 500, "internal-error", "Internal error"


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"/problems/{code}", "title": title, "status": status, "detail": detail, "code": code, **extra}


def problem_response(error: HubError) -> HttpResponse:
    """A plain Django response for code paths that run outside DRF (the intake hot path, 404s)."""
    response = HttpResponse(json.dumps(error.problem()), status=error.status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in error.headers.items():
        response[name] = value
    return response


_DRF_CODES: dict[type[drf_exceptions.APIException], tuple[str, str]] = {
    drf_exceptions.NotAuthenticated: ("not-authenticated", "Not authenticated"),
    drf_exceptions.AuthenticationFailed: ("authentication-failed", "Authentication failed"),
    drf_exceptions.PermissionDenied: ("permission-denied", "Permission denied"),
    drf_exceptions.NotFound: ("not-found", "Not found"),
    drf_exceptions.MethodNotAllowed: ("method-not-allowed", "Method not allowed"),
    drf_exceptions.NotAcceptable: ("not-acceptable", "Not acceptable"),
    drf_exceptions.UnsupportedMediaType: ("unsupported-media-type", "Unsupported media type"),
    drf_exceptions.Throttled: ("rate-limited", "Rate limited"),
    drf_exceptions.ParseError: ("malformed-json", "Malformed JSON"),
    drf_exceptions.ValidationError: ("invalid-request", "Invalid request"),
}


def _validation_errors(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten DRF's nested error detail into ``[{"field", "code", "message"}]``."""
    if isinstance(detail, dict):
        out: list[dict[str, str]] = []
        for key, value in detail.items():
            field = key if not prefix else f"{prefix}.{key}"
            out.extend(_validation_errors(value, field))
        return out
    if isinstance(detail, list):
        out = []
        for index, value in enumerate(detail):
            if isinstance(value, dict | list):
                out.extend(_validation_errors(value, f"{prefix}.{index}" if prefix else str(index)))
            else:
                out.extend(_validation_errors(value, prefix))
        return out
    return [{"field": prefix or "non_field_errors", "code": getattr(detail, "code", "invalid"), "message": str(detail)}]


def problem_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler: every API error leaves as problem+json."""
    if isinstance(exc, Http404):
        exc = NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):  # Django's 400 page otherwise: it is the body's size
        exc = PayloadTooLarge(f"At most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes per request body.")

    if isinstance(exc, HubError):
        response = Response(exc.problem(), status=exc.status, content_type=PROBLEM_CONTENT_TYPE)
        for name, value in exc.headers.items():
            response[name] = value
        return response

    if isinstance(exc, drf_exceptions.APIException):
        code, title = _DRF_CODES.get(type(exc), ("error", "Error"))
        extra: dict[str, Any] = {}
        if isinstance(exc, drf_exceptions.ValidationError):
            extra["errors"] = _validation_errors(exc.detail)
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in extra["errors"])
        else:
            detail = str(exc.detail)
        response = Response(
            problem_body(exc.status_code, code, title, detail, **extra),
            status=exc.status_code,
            content_type=PROBLEM_CONTENT_TYPE,
        )
        wait = getattr(exc, "wait", None)
        if isinstance(exc, drf_exceptions.Throttled) and wait is not None:
            response["Retry-After"] = str(int(wait) + 1)
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
        return response
    return None


def api_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: problem+json under ``/api/``, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return problem_response(NotFound(f"No resource at {request.path}."))
    from django.views.defaults import page_not_found

    return page_not_found(request, exception or Http404())


def api_bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler400`` (what Django refuses before a view: a body past its size limit, a Host it does
    not serve, ...): problem+json under ``/api/``, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        if isinstance(exception, RequestDataTooBig):
            return problem_response(
                PayloadTooLarge(f"At most {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes per request body.")
            )
        return problem_response(HubError("The hub cannot take this request as sent."))
    from django.views.defaults import bad_request

    return bad_request(request, exception or SuspiciousOperation())


def api_server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return problem_response(InternalError("The hub failed to handle this request; it has been logged."))
    from django.views.defaults import server_error

    return server_error(request)
