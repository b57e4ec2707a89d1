from csp.decorators import csp_update
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from clearinghouse import health

handler400 = "clearinghouse.errors.api_bad_request"
handler404 = "clearinghouse.errors.api_not_found"
handler500 = "clearinghouse.errors.api_server_error"

api_v1: list[URLPattern | URLResolver] = [
    path("", include("institutions.urls")),
    path("", include("wallets.urls")),
    path("", include("methodology.urls")),
    path("", include("settlement.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # OPTIONS is 405 on the HTML page: DRF's metadata cannot be rendered as its template (it was a 500).
    # The split view loads its start-up script as a file (docs/?script=): the CSP allows no inline script.
    # Swagger UI's script writes inline styles as it draws: allowed on this one page, never a script.
    path(
        "docs/",
        csp_update({"style-src": ["'unsafe-inline'"]})(
            SpectacularSwaggerSplitView.as_view(url_name="schema", metadata_class=None)
        ),
        name="docs",
    ),
]

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("api/v1/", include(api_v1)),
    path("admin/", admin.site.urls),
    # The language switcher of the persons' pages (Django's set_language: a POST with its CSRF token).
    path("i18n/", include("django.conf.urls.i18n")),
    # The persons' pages, at the root (the top floor: nothing below imports it).
    path("", include("portal.urls")),
]
