"""The array literals the hot paths bind instead of Python lists must round-trip exactly."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from django.db import connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearinghouse.db import array_literal, text_array_literal

pytestmark = pytest.mark.django_db

# Any text PostgreSQL can store: no NUL, no lone surrogates (not encodable as UTF-8; the intake refuses them).
storable = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.lists(st.one_of(st.none(), st.text(alphabet=storable)), max_size=20)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="array literals are PostgreSQL syntax")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=texts, ints=st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), max_size=20))
def test_literals_round_trip(texts: list[str | None], ints: list[int | None]) -> None:
    decimals = [Decimal("1E+3"), Decimal("-12.50"), Decimal("0.000000000001")]
    days = [date(2026, 1, 31), date(1999, 12, 1)]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT %s::text[], %s::bigint[], %s::numeric[], %s::date[]",
            [text_array_literal(texts), array_literal(ints), array_literal(decimals), array_literal(days)],
        )
        assert cursor.fetchone() == (texts, ints, decimals, days)
