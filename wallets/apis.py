"""Person-facing API: sign up, obtain a token, make link codes, list and remove links.

One small view per operation: parse, call a service or selector, render. Errors are the services'
:class:`~clearinghouse.errors.HubError` subclasses, rendered as problem+json by the project's handler.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.validators import UnicodeUsernameValidator
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from wallets.exceptions import NotAPerson
from wallets.models import Person
from wallets.selectors import links_for_person, person_for_user
from wallets.services import link_code_create, person_link_remove, person_signup, person_token_obtain

PROBLEM = OpenApiResponse(description="RFC 9457 problem document (application/problem+json).")


class SignupIn(serializers.Serializer):
    username = serializers.CharField(max_length=150, validators=[UnicodeUsernameValidator()])
    password = serializers.CharField(max_length=256, trim_whitespace=False, write_only=True)


class CredentialsIn(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=256, trim_whitespace=False, write_only=True)


class TokenOut(serializers.Serializer):
    token = serializers.CharField(help_text="Send as `Authorization: Token <token>`.")


class LinkCodeOut(serializers.Serializer):
    code = serializers.CharField(help_text="8 characters; give it to the institution. Single use.")
    expires_at = serializers.DateTimeField()


class LinkOut(serializers.Serializer):
    institution = serializers.CharField(source="institution.code")
    name = serializers.CharField(source="institution.name")
    linked_at = serializers.DateTimeField()


def _parsed(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class SignupApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="auth_signup",
        summary="Become a person: a username and a password, nothing else",
        request=SignupIn,
        responses={201: TokenOut, 400: PROBLEM, 409: PROBLEM},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        signed_up = person_signup(**_parsed(SignupIn, request.data))
        return Response(TokenOut({"token": signed_up.token}).data, status=201)


class TokenApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="auth_token",
        summary="Obtain the person's API token",
        request=CredentialsIn,
        responses={200: TokenOut, 400: PROBLEM, 401: PROBLEM},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        token = person_token_obtain(**_parsed(CredentialsIn, request.data))
        return Response(TokenOut({"token": token}).data)


class PersonApi(APIView):
    """Base of the ``/me`` views: an authenticated user who is a person."""

    permission_classes = [IsAuthenticated]

    def person(self, request: Request) -> Person:
        person = person_for_user(request.user)
        if person is None:
            raise NotAPerson("Only a person's token reaches /me.")
        return person


class LinkCodeCreateApi(PersonApi):
    @extend_schema(
        operation_id="link_codes_create",
        summary="Make a link code to give to an institution",
        request=None,
        responses={201: LinkCodeOut, 401: PROBLEM, 403: PROBLEM, 429: PROBLEM},
    )
    def post(self, request: Request) -> Response:
        issued = link_code_create(person=self.person(request))
        return Response(LinkCodeOut(issued).data, status=201)


class LinkListApi(PersonApi):
    @extend_schema(
        operation_id="links_list",
        summary="The institutions the person's accounts are linked at",
        responses={200: LinkOut(many=True), 401: PROBLEM, 403: PROBLEM},
    )
    def get(self, request: Request) -> Response:
        return Response(LinkOut(links_for_person(self.person(request)), many=True).data)


class LinkDeleteApi(PersonApi):
    @extend_schema(
        operation_id="links_delete",
        summary="Unlink the person's account at an institution (pooled points stay the person's)",
        responses={204: None, 401: PROBLEM, 403: PROBLEM, 404: PROBLEM},
    )
    def delete(self, request: Request, institution: str) -> Response:
        person_link_remove(person=self.person(request), institution_code=institution)
        return Response(status=204)
