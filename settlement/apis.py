"""Settlement's API: for institutions, statements per cycle with their bearer token; for persons, the
reward catalogue and their redemptions.

One small view per operation: parse, call a service or selector, render. Refusals are the services'
:class:`~clearinghouse.errors.HubError` subclasses, rendered as problem+json; the answer to a redemption
request is the service's own (the redemption held, or the refusal's problem document), because a repeat
of its ``Idempotency-Key`` must get the very same answer back: sent as ``201`` or with the problem's status.
"""

from __future__ import annotations

import json
import re
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.generics import GenericAPIView, ListAPIView
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clearinghouse import strict_json
from clearinghouse.errors import PROBLEM_CONTENT_TYPE, HubError, NotFound, problem_response
from clearinghouse.pagination import HubCursorPagination
from institutions.authentication import InstitutionTokenAuthentication
from institutions.models import Institution
from settlement.models import (
    ConfirmationStatus,
    CycleState,
    InstructionDirection,
    InstructionState,
    NetPosition,
    Redemption,
)
from settlement.selectors import (
    redemption_json,
    redemptions_for_person,
    reward_json,
    rewards_catalogue,
    statement_positions,
    statements,
)
from settlement.services import redemption_request
from wallets.apis import PROBLEM, PersonApi
from wallets.authentication import PersonTokenAuthentication
from wallets.models import Person
from wallets.selectors import person_for_user


class ObligationLineOut(serializers.Serializer):
    id = serializers.IntegerField()
    # The metaclass pops declared fields off the class, so this does not shadow Field.source at runtime.
    source = serializers.CharField(  # type: ignore[assignment]
        help_text="What caused it: 'redemption:<id>', 'carry:cycle-<id>', 'correction:...'."
    )
    debtor = serializers.CharField(allow_null=True, help_text="Institution code; null is the hub.")
    creditor = serializers.CharField(allow_null=True, help_text="Institution code; null is the hub.")
    amount_minor = serializers.IntegerField()
    currency = serializers.CharField()


class ObligationsOut(serializers.Serializer):
    count = serializers.IntegerField()
    gross_in_minor = serializers.IntegerField(help_text="Owed to the institution in this cycle, carries included.")
    gross_out_minor = serializers.IntegerField(help_text="Owed by the institution in this cycle, carries included.")
    digest = serializers.CharField(
        help_text="sha256:<hex> over the lines: each as 'id|source|debtor|creditor|amount_minor|currency' "
        "(the hub as an empty party), sorted by their UTF-8 bytes, each ending in '\\n'. Equals the "
        "instruction's statement_digest."
    )
    lines = ObligationLineOut(many=True)


class InstructionOut(serializers.Serializer):
    instruction_id = serializers.CharField()
    direction = serializers.ChoiceField(InstructionDirection.values, help_text="pay: to the hub; receive: from it.")
    amount_minor = serializers.IntegerField()
    currency = serializers.CharField()
    value_date = serializers.DateField()
    statement_digest = serializers.CharField()
    state = serializers.ChoiceField(InstructionState.values, help_text="Follows the latest confirmation.")


class ConfirmationOut(serializers.Serializer):
    status = serializers.ChoiceField(ConfirmationStatus.values)
    reference = serializers.CharField()
    received_at = serializers.DateTimeField()


class StatementOut(serializers.Serializer):
    cycle_id = serializers.IntegerField()
    cycle_state = serializers.ChoiceField(CycleState.values)
    cut_off_at = serializers.DateTimeField()
    currency = serializers.CharField()
    institution = serializers.CharField()
    opening_minor = serializers.IntegerField(
        help_text="Carried in from earlier cycles (the carry lines below), signed: positive when the hub owes it."
    )
    obligations = ObligationsOut()
    net_minor = serializers.IntegerField(help_text="gross_in_minor - gross_out_minor; positive: the hub pays.")
    instruction = InstructionOut(allow_null=True, help_text="Null when the net was zero or carried forward.")
    confirmation = ConfirmationOut(allow_null=True, help_text="The institution's latest confirmation, if any.")
    closing_minor = serializers.IntegerField(
        help_text="Carried forward into the next cycle, signed as the net; net = instructed (signed) + closing."
    )


class StatementCursor(HubCursorPagination):
    page_size = 20
    ordering = ("-cycle_id",)  # one statement per cycle and institution: unique, so a stable cursor


class CycleQuery(serializers.Serializer):
    cycle = serializers.IntegerField(required=False, min_value=1)


class SettlementStatementListApi(ListAPIView):
    """``GET /api/v1/institutions/{code}/settlements``: the institution's statements, newest cycle first."""

    authentication_classes = [InstitutionTokenAuthentication]
    permission_classes = [IsAuthenticated]
    pagination_class = StatementCursor

    def get_queryset(self) -> QuerySet[NetPosition]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no institution behind the request
            return NetPosition.objects.none()
        institution = self.request.auth
        assert isinstance(institution, Institution)  # set by InstitutionTokenAuthentication
        if institution.code != self.kwargs["code"]:
            # A token sees only its own institution: another code answers like an unknown one.
            raise NotFound(f"No institution {self.kwargs['code']!r} for this token.")
        query = CycleQuery(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        positions = statement_positions(institution=institution)
        if "cycle" in query.validated_data:
            positions = positions.filter(cycle_id=query.validated_data["cycle"])
        return positions

    @extend_schema(
        operation_id="settlements_list",
        summary="The institution's settlement statements, one per cycle, newest first",
        description=(
            "Each statement: opening (carried in), the obligations the institution is party to in the cycle "
            "with their totals and digest, net, the instruction, the latest confirmation and closing (carried "
            "forward). Cursor-paginated, 20 a page: follow `next`. `?cycle=<cycle_id>` gives that cycle's "
            "statement alone (an empty page when the institution had no part in it). Authorization: "
            "`Bearer <api_token>`; another institution's code answers 404."
        ),
        parameters=[
            OpenApiParameter("cycle", int, OpenApiParameter.QUERY, required=False, description="Only this cycle."),
        ],
        responses={200: StatementOut(many=True), 400: PROBLEM, 401: PROBLEM, 404: PROBLEM},
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        assert page is not None  # always paginated
        return self.get_paginated_response(StatementOut(statements(page), many=True).data)


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=True,
    description=(
        "A unique string per redemption you mean to make (1 to 255 printable ASCII characters, a UUID is "
        "ideal). The same key with the same body returns the first answer again (header "
        "`Idempotent-Replayed: true`); with another body it is `422 idempotency-key-reused`; while the first "
        "request is still running it is `409 idempotency-key-in-flight`."
    ),
)


class RewardOut(serializers.Serializer):
    code = serializers.CharField()
    title = serializers.CharField()
    provider = serializers.CharField(help_text="The providing institution's code.")
    points = serializers.IntegerField(help_text="Points per unit.")
    available = serializers.BooleanField(help_text="Redeemable now: in its window, in stock, provider active.")
    stock = serializers.IntegerField(allow_null=True, help_text="Units left; null is unlimited.")
    per_person_limit = serializers.IntegerField(allow_null=True, help_text="Units per person; null is no limit.")
    active_from = serializers.DateTimeField(allow_null=True)
    active_until = serializers.DateTimeField(allow_null=True)


class RedemptionIn(serializers.Serializer):
    reward = serializers.CharField(max_length=40, help_text="The reward's code.")
    quantity = serializers.IntegerField(min_value=1, default=1)

    def validate_quantity(self, value: int) -> int:
        if value > settings.HUB_REDEMPTION_MAX_QUANTITY:
            raise serializers.ValidationError(f"At most {settings.HUB_REDEMPTION_MAX_QUANTITY} units per request.")
        return value


class AllocationOut(serializers.Serializer):
    institution = serializers.CharField(help_text="The issuing institution whose points were taken.")
    points = serializers.IntegerField(help_text="Whole points; the parts add up to the redemption's points.")
    grams = serializers.CharField(help_text='Exactly what was taken, in grams with three places: "144.000".')


class RedemptionOut(serializers.Serializer):
    id = serializers.CharField(help_text="Also `redemption_id` in the provider's events.")
    status = serializers.ChoiceField(choices=Redemption.Status.choices)
    reward = serializers.CharField()
    provider = serializers.CharField()
    quantity = serializers.IntegerField()
    points = serializers.IntegerField()
    allocations = AllocationOut(many=True)
    created_at = serializers.DateTimeField()
    hold_expires_at = serializers.DateTimeField(help_text="Voided by itself if the provider has not answered by then.")
    resolved_at = serializers.DateTimeField(allow_null=True)
    voucher = serializers.CharField(allow_null=True, help_text="From the provider, once fulfilled.")
    reason = serializers.CharField(allow_null=True, help_text="Why it was rejected or voided.")


class RedemptionCursor(HubCursorPagination):
    page_size = 50
    ordering = ("-created_at", "-id")


class RewardListApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="rewards_list",
        summary="The reward catalogue: what points can buy, from which provider",
        responses={200: RewardOut(many=True)},
        auth=[],
    )
    def get(self, request: Request) -> Response:
        return Response([reward_json(reward) for reward in rewards_catalogue()])


class RedemptionsApi(PersonApi, GenericAPIView):
    pagination_class = RedemptionCursor
    # What OPTIONS describes as the POST body (DRF's metadata asks a generic view for its serializer).
    serializer_class = RedemptionIn

    def get_queryset(self) -> QuerySet[Redemption]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no person behind the request
            return Redemption.objects.none()
        return redemptions_for_person(self.person(self.request))

    @extend_schema(
        operation_id="redemptions_list",
        summary="The person's redemptions, newest first, 50 a page (follow `next`)",
        responses={200: RedemptionOut(many=True), 401: PROBLEM, 403: PROBLEM},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset()) or []
        return self.get_paginated_response([redemption_json(r) for r in page])

    @extend_schema(
        operation_id="redemptions_create",
        summary="Redeem points for a reward: the points are held until the provider fulfils or rejects",
        parameters=[IDEMPOTENCY_KEY],
        request=RedemptionIn,
        responses={
            201: RedemptionOut,
            400: PROBLEM,
            401: PROBLEM,
            403: PROBLEM,
            404: OpenApiResponse(description="`reward-not-found` (problem+json)."),
            409: OpenApiResponse(
                description="`insufficient-points`, `out-of-stock`, `redemption-limit-reached`, `reward-unavailable`"
                " or `idempotency-key-in-flight` (problem+json)."
            ),
            422: OpenApiResponse(description="`idempotency-key-reused` (problem+json)."),
        },
    )
    def post(self, request: Request) -> HttpResponse:
        # Requests the direct path (dispatch) leaves to DRF: session users, other media types, any
        # body or credentials that need DRF's answer (validation errors, 401, 403, 406, 415).
        person = self.person(request)
        incoming = RedemptionIn(data=request.data)
        incoming.is_valid(raise_exception=True)
        return _redemption_answered(
            person,
            idempotency_key=request.headers.get("Idempotency-Key"),
            reward_code=incoming.validated_data["reward"],
            quantity=incoming.validated_data["quantity"],
        )

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method == "POST" and (direct := _redemption_post_direct(request)) is not None:
            direct["Allow"] = ", ".join(self.allowed_methods)  # as DRF answers every request
            return direct
        return super().dispatch(request, *args, **kwargs)


# --- POST /me/redemptions without DRF, for the plain request -----------------------------------------------

# The Accept headers DRF's negotiation answers with JSON (a client that sends none accepts anything).
_DIRECT_ACCEPT = frozenset({"*/*", "application/json"})
# A redemption's body is some 40 bytes; a larger one is left to DRF (and Django's size limits).
_DIRECT_MAX_BODY = 1024


def _redemption_post_direct(request: HttpRequest) -> HttpResponse | None:
    """Serve ``POST /me/redemptions`` as a plain Django view when the request is the plain kind: a
    person's ``Token``, a JSON body whose ``reward`` and ``quantity`` are already what DRF's
    validation would make of them, an ``Accept`` that JSON satisfies. None otherwise, and DRF serves
    it (:meth:`RedemptionsApi.post`): with the same answers, which ``tests/settlement/test_redemption_api_paths.py``
    checks request by request.

    Why: the hold is the hottest request a person makes, and DRF's request wrapping, negotiation,
    serializer and rendering cost about a fifth of its CPU in the web process (docs/performance.md);
    the intake's POST is served the same way."""
    meta = request.META
    accept = meta.get("HTTP_ACCEPT")  # absent accepts anything; present but empty is DRF's 406
    if (accept is not None and accept not in _DIRECT_ACCEPT) or meta.get("CONTENT_TYPE") != "application/json":
        return None
    length = meta.get("CONTENT_LENGTH", "")
    if not length.isdigit() or int(length) > _DIRECT_MAX_BODY:
        return None
    scheme, _, key = meta.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme != PersonTokenAuthentication.keyword or not key or " " in key:
        return None
    try:
        user, _token = PersonTokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return None
    person = person_for_user(user)
    if person is None:
        return None
    try:
        # The parser DRF's path uses (StrictJSONParser): a body it refuses is DRF's to answer.
        body = strict_json.loads(request.body)
    except HubError:
        return None
    plain = _plain_redemption(body)
    if plain is None:
        return None
    reward_code, quantity = plain
    try:
        return _redemption_answered(
            person, idempotency_key=meta.get("HTTP_IDEMPOTENCY_KEY"), reward_code=reward_code, quantity=quantity
        )
    except HubError as error:
        return problem_response(error)


# Reward codes are [a-z0-9-]{2,40}; anything else (spaces to trim, NUL, surrogates, ...) is DRF's to judge.
_PLAIN_REWARD = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _plain_redemption(body: Any) -> tuple[str, int] | None:
    """(reward, quantity) of a body :class:`RedemptionIn` would take as it is; None for anything it
    would change or refuse (whitespace to trim, numbers as strings, out of range, ...)."""
    if not isinstance(body, dict):
        return None
    reward, quantity = body.get("reward"), body.get("quantity", 1)
    if not isinstance(reward, str) or not _PLAIN_REWARD.fullmatch(reward):
        return None
    if type(quantity) is not int or not 1 <= quantity <= settings.HUB_REDEMPTION_MAX_QUANTITY:
        return None
    return reward, quantity


def _redemption_answered(
    person: Person, *, idempotency_key: str | None, reward_code: str, quantity: int
) -> HttpResponse:
    """The service's answer as sent, by both paths: a held redemption is ``201 Created``, a refusal its
    problem document with the status in it (RFC 9457: the status member is the HTTP status). Errors
    that are not the key's answer (a reused or invalid key, a request in flight) raise :class:`HubError`
    to the caller."""
    answer = redemption_request(
        person=person, idempotency_key=idempotency_key, reward_code=reward_code, quantity=quantity
    )
    response = HttpResponse(
        json.dumps(answer.body, separators=(",", ":"), ensure_ascii=False),
        status=201 if answer.held else answer.body["status"],
        content_type="application/json" if answer.held else PROBLEM_CONTENT_TYPE,
    )
    if answer.replayed:
        response["Idempotent-Replayed"] = "true"
    return response
