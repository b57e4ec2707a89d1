"""Where the Content-Security-Policy of settings.CONTENT_SECURITY_POLICY is widened, and why."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase

# The admin's own additions write a few style= attributes (the settlement cycle's run button, the warning
# colour of a failed state): styles only; its scripts stay the hub's files.
ADMIN_POLICY = {"style-src": ["'self'", "'unsafe-inline'"]}


class AdminPolicyMiddleware:
    """Inline styles on the admin's pages. Must sit after django-csp's middleware (it reads the answer's
    ``_csp_update`` on its way out)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if request.path_info.startswith("/admin/") and not hasattr(response, "_csp_update"):
            response._csp_update = ADMIN_POLICY  # type: ignore[attr-defined]  # django-csp's hook
        return response
