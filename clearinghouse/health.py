"""``/healthz`` (the process answers) and ``/readyz`` (it can reach what it needs to do work)."""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse

from clearinghouse.redis import redis_client


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    if settings.CELERY_TASK_ALWAYS_EAGER:
        checks["broker"] = "in-process"
    else:
        try:
            client = redis_client()
            if client is None:
                raise RuntimeError("no REDIS_URL")
            client.ping()
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(value in ("ok", "in-process") for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)
