"""``Authorization: Bearer <api_token>`` for institutions' own read endpoints."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from institutions.models import Institution
from institutions.selectors import institution_for_token


class InstitutionPrincipal:
    """Stands in for ``request.user`` when an institution calls; DRF only needs ``is_authenticated``."""

    is_authenticated = True

    def __init__(self, institution: Institution):
        self.institution = institution


class InstitutionTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization: Bearer <api_token>.")
        institution = institution_for_token(header[1].decode(errors="replace"))
        if institution is None:
            raise exceptions.AuthenticationFailed("Unknown or retired API token.")
        return InstitutionPrincipal(institution), institution

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


class InstitutionTokenScheme(OpenApiAuthenticationExtension):
    """Documents the bearer token in the OpenAPI schema (drf-spectacular finds it by ``target_class``)."""

    target_class = InstitutionTokenAuthentication
    name = "institutionToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The API token institution_register issued: `Authorization: Bearer <api_token>`.",
        }
