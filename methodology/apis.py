"""The published standard (CONTRACT section 5)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from methodology.selectors import published_standard

_FACTOR = inline_serializer(
    "Factor",
    {
        "version": serializers.CharField(),
        "grams_per_unit": serializers.CharField(help_text="Exact decimal, grams CO2e per unit."),
        "valid_from": serializers.DateField(),
        "source": serializers.CharField(),
    },
    allow_null=True,
)


# The answer's "scenarios" is a list (the schema said one object: schemathesis found it).
_SCENARIOS = inline_serializer(
    "Scenario",
    {
        "code": serializers.CharField(),
        "name": serializers.CharField(),
        "unit": serializers.CharField(),
        "factor": _FACTOR,
        "caps": inline_serializer(
            "ScenarioCap", {"period": serializers.CharField(), "max_quantity": serializers.CharField()}, many=True
        ),
    },
    many=True,
)


class ScenarioListApi(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="standard_scenarios",
        summary="The published standard: every scenario with its factor in force today",
        responses={200: inline_serializer("ScenarioList", {"scenarios": _SCENARIOS})},
        auth=[],
    )
    def get(self, request: Request) -> Response:
        return Response({"scenarios": published_standard()})
