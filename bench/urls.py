"""URLconf of benchmark runs: every production URL plus two reference views of bench/intake.py.

``/bench/bare`` is the baseline: a Django view that answers 200 and does nothing else.
``/bench/floor`` adds to it the one thing a single-event intake request cannot avoid: a durable,
committed INSERT of one inbox row, through the intake's own insert function (no signature, no
parsing, no validation, no rate limit, no wake-up of the workers). It is the ceiling for any
intake that commits every request on its own.
"""

import uuid
from datetime import UTC, datetime

from django.http import HttpRequest, HttpResponse
from django.urls import path

from clearinghouse.urls import handler404, handler500
from clearinghouse.urls import urlpatterns as production_urlpatterns

__all__ = ["handler404", "handler500", "urlpatterns"]

BENCH_INSTITUTION = "bench-bank"
_institution_id: list[int] = []
_DATA = {"action": "transit.metro", "quantity": "12.5", "unit": "km"}


def bare(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


def floor(request: HttpRequest) -> HttpResponse:
    from institutions import intake
    from institutions.models import Institution

    if not _institution_id:
        _institution_id.append(Institution.objects.only("pk").get(code=BENCH_INSTITUTION).pk)
    event_id = f"floor-{uuid.uuid4().hex}"
    row = (event_id, "carbon.activity.recorded", "/bench/floor", "0" * 64, "", datetime.now(UTC), _DATA, "0" * 64)
    inserted = intake._insert_rows([(_institution_id[0], event_id, row)])  # no group commit: one per request
    return HttpResponse(
        b"ok" if inserted else b"not inserted", status=200 if inserted else 500, content_type="text/plain"
    )


urlpatterns = [
    path("bench/bare", bare, name="bench-bare"),
    path("bench/floor", floor, name="bench-floor"),
    *production_urlpatterns,
]
