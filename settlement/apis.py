"""Institution-facing settlement API: statements per cycle, with the institution's bearer token."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from clearinghouse.errors import NotFound
from institutions.authentication import InstitutionTokenAuthentication
from institutions.models import Institution
from settlement.models import ConfirmationStatus, CycleState, InstructionDirection, InstructionState, NetPosition
from settlement.selectors import statement_positions, statements

PROBLEM = OpenApiResponse(description="RFC 9457 problem document (application/problem+json).")


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


class StatementCursor(CursorPagination):
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
