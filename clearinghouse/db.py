"""Bulk writes for the hot paths, where Django's per-object machinery costs more than the database."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date
from decimal import Decimal
from typing import Any

from django.db import connection, migrations, models


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


def array_literal(values: Iterable[int | date | Decimal | None]) -> str:
    """A PostgreSQL array literal of integers, dates or decimals, to bind as one ``%s::bigint[]``
    (``::date[]``, ``::numeric[]``) parameter; ``None`` becomes an SQL NULL element.

    Django's psycopg cursor binds parameters client-side, and quoting a Python list costs about a
    microsecond per element: more than the statement itself at a thousand keys. ``str()`` of these
    types never contains a character the array syntax treats specially, so no quoting is needed."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def text_array_literal(values: Iterable[str | None]) -> str:
    """A PostgreSQL array literal of strings (bind as ``%s::text[]``, or cast to another type): every
    element double-quoted, with backslashes and double quotes escaped, so ``NULL``, commas, braces and
    spaces stay text; ``None`` becomes an SQL NULL element."""
    return (
        "{"
        + ",".join(["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values])
        + "}"
    )


def execute_prepared(sql: str, params: Sequence[Any]) -> Any:
    """Run ``sql`` on the default connection, in its current transaction, with server-side parameters and
    a prepared plan that PostgreSQL keeps for the connection: for statements a hot path runs thousands of
    times a second, whose planning would otherwise cost more than their execution.

    Django binds parameters client-side (its psycopg cursors are ``ClientCursor``s), so PostgreSQL parses
    and plans every statement afresh. Returns the psycopg cursor (``fetchone``, ``fetchall``, ``rowcount``).
    PostgreSQL only: callers keep their portable path for SQLite.
    """
    import psycopg

    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    cursor.execute(sql, params, prepare=True)
    return cursor


class PostgresOnlySQL(migrations.RunSQL):
    """A migration's RunSQL that runs on PostgreSQL and does nothing elsewhere (SQLite, the embedded
    default): the database-enforced invariants (triggers, deferred checks) exist only where PostgreSQL
    can hold them; the services check the same rules everywhere."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
