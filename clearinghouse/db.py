"""Bulk writes for the hot paths, where Django's per-object machinery costs more than the database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection, models


def copy_rows(model: type[models.Model], columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) in one go: ``COPY`` on PostgreSQL, a bulk insert
    elsewhere. Raises the database's integrity error like any insert; returns nothing (no ids)."""
    if not rows:
        return
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(model._meta.db_table)
        names = ", ".join(connection.ops.quote_name(c) for c in columns)
        with connection.cursor() as cursor, cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    fields = {f.column: f.attname for f in model._meta.concrete_fields}
    model._default_manager.bulk_create(  # type: ignore[attr-defined]
        [model(**{fields[c]: v for c, v in zip(columns, row, strict=True)}) for row in rows]
    )
