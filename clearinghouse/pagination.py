"""Cursor pagination for every list the hub pages: DRF's, with a cursor the hub did not issue answered
``400 invalid-cursor`` (documented in the schema for every operation that takes ``cursor``).

DRF answers an undecodable cursor ``404 not-found``, which reads as "this collection does not exist";
and a cursor that decodes but carries a position the ordering field cannot hold (``p=abc`` for a date,
a number past the column's range, a date past year 9999 in UTC) went on into the query and failed
there: a 500. Cursors are opaque: a client only ever sends back the ``next`` or ``previous`` it was given.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Model
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request

from clearinghouse.errors import InvalidCursor

INVALID = "The cursor is not one this list gave out; follow `next` or `previous` as received, or start without one."


class HubCursorPagination(CursorPagination):
    _model: type[Model] | None = None

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list[Any] | None:
        self._model = queryset.model  # decode_cursor (called from here) checks the position against it
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Request) -> Cursor | None:
        try:
            cursor = super().decode_cursor(request)
        except NotFound as exc:
            raise InvalidCursor(INVALID) from exc
        if cursor is not None and cursor.position is not None and not self._position_valid(str(cursor.position)):
            raise InvalidCursor(INVALID)
        return cursor

    def _position_valid(self, position: str) -> bool:
        """Whether the query can compare the ordering field with ``position``."""
        if "\x00" in position:
            return False
        if self._model is None:
            return True
        field: Any = self._model._meta.get_field(self.ordering[0].lstrip("-"))
        field = getattr(field, "target_field", field)  # a foreign key compares as the key it holds
        try:
            value = field.to_python(position)
            field.run_validators(value)  # integer fields: the column's range
            if isinstance(value, datetime) and value.tzinfo is not None:
                value.astimezone(UTC)  # a time past year 9999 in UTC overflows here, as in the database adapter
        except (ValidationError, ValueError, TypeError, OverflowError):
            return False
        return True
