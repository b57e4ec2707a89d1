"""The language of a request."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.middleware.locale import LocaleMiddleware as DjangoLocaleMiddleware
from django.utils import translation

# Answered in LANGUAGE_CODE whatever the browser asks: the API's problem documents are part of the wire
# contract (CONTRACT.md), and the admin's own texts are English (Django's Chinese would make it half
# translated).
FIXED_LANGUAGE_PREFIXES = ("/api/", "/admin/")


class LocaleMiddleware(DjangoLocaleMiddleware):
    """Django's ``LocaleMiddleware`` for the persons' pages: the language from the switcher's cookie,
    else from ``Accept-Language`` (Django maps every ``zh-*`` to ``zh-hans``, the only Chinese offered),
    else ``LANGUAGE_CODE``. Paths under :data:`FIXED_LANGUAGE_PREFIXES` keep ``LANGUAGE_CODE``."""

    def process_request(self, request: HttpRequest) -> None:
        if request.path_info.startswith(FIXED_LANGUAGE_PREFIXES):
            translation.activate(settings.LANGUAGE_CODE)
            request.LANGUAGE_CODE = settings.LANGUAGE_CODE
            return
        super().process_request(request)

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if request.path_info.startswith(FIXED_LANGUAGE_PREFIXES):
            return response
        return super().process_response(request, response)  # type: ignore[no-any-return]
