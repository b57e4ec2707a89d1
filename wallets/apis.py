"""Person-facing API: sign up, obtain a token, make link codes, list and remove links; the wallet,
the activity history, the export of everything held about the person, and erasure.

One small view per operation: parse, call a service or selector, render. Errors are the services'
:class:`~clearinghouse.errors.HubError` subclasses, rendered as problem+json by the project's handler.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import logout
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clearinghouse.pagination import HubCursorPagination
from clearinghouse.throttle import client_address
from ledger.units import MG_PER_POINT
from methodology.models import NormalizedActivity
from methodology.selectors import activities_for_person, activity_grams
from wallets.exceptions import NotAPerson
from wallets.models import Person
from wallets.selectors import (
    links_for_person,
    person_export,
    person_for_user,
    wallet_json,
    wallet_summary,
)
from wallets.services import link_code_create, person_erase, person_link_remove, person_signup, person_token_obtain

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


class InstitutionPointsOut(serializers.Serializer):
    institution = serializers.CharField(help_text="The issuing institution's code.")
    points = serializers.IntegerField(help_text="Whole points (grams CO2e) held from this institution, rounded down.")
    next_expiry = serializers.DateField(help_text="When the soonest of these points lapse (end of that day).")


class ExpiringOut(serializers.Serializer):
    points = serializers.IntegerField()
    expires_on = serializers.DateField()


class WalletOut(serializers.Serializer):
    points = serializers.IntegerField(help_text="Whole points held (1 point = 1 g CO2e), rounded down.")
    grams = serializers.CharField(help_text='Exactly what is held, in grams with three places: "144.000".')
    by_institution = InstitutionPointsOut(many=True)
    expiring_soon = ExpiringOut(many=True, help_text="Points lapsing within HUB_EXPIRING_SOON_DAYS, soonest first.")
    debt_points = serializers.IntegerField(
        required=False, help_text="Only when the person owes points back after a reversal (rounded up)."
    )


@extend_schema_field(OpenApiTypes.STR)
class GramsField(serializers.Field):
    """Measured grams CO2e, three places (``"468.000"``)."""

    def to_representation(self, activity: NormalizedActivity) -> str:
        return activity_grams(activity)


class ActivityOut(serializers.Serializer):
    institution = serializers.CharField(source="institution.code")
    scenario = serializers.CharField(source="scenario.code")
    time = serializers.DateTimeField(source="occurred_at")
    grams = GramsField(source="*", help_text="Measured grams CO2e, three places.")
    points = serializers.SerializerMethodField(help_text="Whole points credited (credited_mg // 1000).")
    credited_mg = serializers.IntegerField(help_text="Milligrams CO2e credited after caps, duplicates and evidence.")
    status = serializers.CharField()
    reason = serializers.CharField(allow_null=True, help_text="Why less than measured was credited, or null.")

    def get_points(self, activity: NormalizedActivity) -> int:
        return activity.credited_mg // MG_PER_POINT

    def to_representation(self, activity: NormalizedActivity) -> dict[str, Any]:
        body = super().to_representation(activity)
        body["reason"] = body["reason"] or None
        return body


class ActivityCursor(HubCursorPagination):
    page_size = 50
    ordering = ("-occurred_at", "-id")


_EXPORT = inline_serializer(
    "PersonExport",
    {
        "format": serializers.CharField(),
        "exported_at": serializers.DateTimeField(),
        "pseudonym": serializers.CharField(),
        "username": serializers.CharField(allow_null=True),
        "joined": serializers.DateTimeField(),
        "erased_at": serializers.DateTimeField(allow_null=True),
        "links": inline_serializer(
            "ExportLink",
            {
                "institution": serializers.CharField(),
                "linked_at": serializers.DateTimeField(),
                "unlinked_at": serializers.DateTimeField(allow_null=True),
                "unlinked_by": serializers.CharField(allow_null=True),
            },
            many=True,
        ),
        "link_codes": inline_serializer(
            "ExportLinkCode",
            {
                "created_at": serializers.DateTimeField(),
                "expires_at": serializers.DateTimeField(),
                "used_at": serializers.DateTimeField(allow_null=True),
                "used_by": serializers.CharField(allow_null=True),
            },
            many=True,
        ),
        "link_attempts": inline_serializer(
            "ExportLinkAttempt",
            {
                "institution": serializers.CharField(),
                "result": serializers.CharField(),
                "at": serializers.DateTimeField(),
            },
            many=True,
        ),
        "wallet": WalletOut(),
        "accounts": inline_serializer(
            "ExportAccount",
            {
                "kind": serializers.CharField(),
                "issuer": serializers.CharField(),
                "expires_on": serializers.DateField(allow_null=True),
                "balance_mg": serializers.IntegerField(),
                "postings": inline_serializer(
                    "ExportPosting",
                    {
                        "transfer": serializers.CharField(help_text="The transfer's idempotency key."),
                        "kind": serializers.CharField(),
                        "amount_mg": serializers.IntegerField(),
                        "at": serializers.DateTimeField(),
                    },
                    many=True,
                ),
            },
            many=True,
        ),
        "activities": inline_serializer(
            "ExportActivity",
            {
                "institution": serializers.CharField(),
                "scenario": serializers.CharField(),
                "time": serializers.DateTimeField(),
                "quantity": serializers.CharField(),
                "unit": serializers.CharField(),
                "grams": serializers.CharField(),
                "points": serializers.IntegerField(),
                "credited_mg": serializers.IntegerField(),
                "factor_version": serializers.CharField(),
                "evidence": serializers.CharField(),
                "status": serializers.CharField(),
                "reason": serializers.CharField(allow_null=True),
                "recorded_at": serializers.DateTimeField(),
            },
            many=True,
        ),
    },
)


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
        responses={201: TokenOut, 400: PROBLEM, 409: PROBLEM, 429: PROBLEM},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        signed_up = person_signup(**_parsed(SignupIn, request.data), address=client_address(request.META))
        return Response(TokenOut({"token": signed_up.token}).data, status=201)


class TokenApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="auth_token",
        summary="Obtain the person's API token",
        request=CredentialsIn,
        responses={200: TokenOut, 400: PROBLEM, 401: PROBLEM, 429: PROBLEM},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        token = person_token_obtain(**_parsed(CredentialsIn, request.data), address=client_address(request.META))
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


class WalletApi(PersonApi):
    @extend_schema(
        operation_id="wallet",
        summary="The person's points: total, per institution, and what lapses soon",
        responses={200: WalletOut, 401: PROBLEM, 403: PROBLEM},
    )
    def get(self, request: Request) -> Response:
        return Response(wallet_json(wallet_summary(self.person(request))))


class ActivityListApi(PersonApi, ListAPIView):
    """The person's measured activities, newest first, 50 a page (follow ``next``)."""

    serializer_class = ActivityOut
    pagination_class = ActivityCursor

    def get_queryset(self) -> QuerySet[NormalizedActivity]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no person behind the request
            return NormalizedActivity.objects.none()
        return activities_for_person(person_id=self.person(self.request).pk)

    @extend_schema(
        operation_id="activities_list",
        summary="The person's activities as the standard measured them",
        responses={200: ActivityOut(many=True), 401: PROBLEM, 403: PROBLEM},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class ExportApi(PersonApi):
    @extend_schema(
        operation_id="me_export",
        summary="Everything the hub holds about the person, as a JSON download",
        responses={200: _EXPORT, 401: PROBLEM, 403: PROBLEM},
    )
    def get(self, request: Request) -> Response:
        person = self.person(request)
        return Response(
            person_export(person),
            headers={
                "Content-Disposition": f'attachment; filename="carbon-wallet-{person.pseudonym}.json"',
                "Cache-Control": "no-store",  # personal data: no shared or browser cache keeps a copy
            },
        )


class MeApi(PersonApi):
    @extend_schema(
        operation_id="me_erase",
        summary="Erase the person: points forfeited, links and sign-in removed, history kept pseudonymous",
        responses={204: None, 401: PROBLEM, 403: PROBLEM},
    )
    def delete(self, request: Request) -> Response:
        person_erase(person=self.person(request))
        if request.auth is None:  # signed in by session (the web pages): end it too
            logout(request._request)
        return Response(status=204)
