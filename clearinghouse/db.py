"""Bulk writes for the hot paths, where Django's per-object machinery costs more than the database."""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, migrations, models


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


# How :func:`rows_update` binds a column's values on PostgreSQL, by the SQL type the caller names.
_NUMBER_TYPES = frozenset({"bigint", "int", "integer", "smallint", "numeric", "date"})


def rows_update(
    model: type[models.Model],
    pks: Sequence[int],
    values: Mapping[str, tuple[str, Sequence[Any]]],
    *,
    same: Mapping[str, Any] | None = None,
    match: Mapping[str, tuple[str, Sequence[Any]]] | None = None,
) -> set[int]:
    """Give each row its own new values in one statement: row ``pks[i]`` gets ``values[column][1][i]``
    in every ``column`` (and every row the value of each ``same`` column), provided each ``match``
    column still holds ``match[column][1][i]``: a row that no longer does is left alone. Returns the
    primary keys of the rows written.

    Columns are database column names, each with its SQL type on PostgreSQL (``"text"``,
    ``"timestamptz"``, ``"jsonb"``, ``"bigint"``, ``"int"``, ...) and Python values as the model holds
    them (datetimes, dicts for ``jsonb``, ``None`` for NULL). PostgreSQL runs one
    ``UPDATE ... FROM unnest(...)`` (Django's ``bulk_update`` builds a CASE per row and column instead,
    which costs more than the hot paths' own work at a thousand rows); elsewhere one UPDATE per row.
    """
    if not pks:
        return set()
    same, match = same or {}, match or {}
    if connection.vendor != "postgresql":
        attnames = {f.column: f.attname for f in model._meta.concrete_fields}
        manager = model._default_manager
        constant = {attnames[c]: v for c, v in same.items()}
        written = set()
        for i, pk in enumerate(pks):
            current = {attnames[c]: v[i] for c, (_, v) in match.items()}
            new = {attnames[c]: v[i] for c, (_, v) in values.items()}
            if manager.filter(pk=pk, **current).update(**new, **constant):
                written.add(pk)
        return written
    quote = connection.ops.quote_name
    columns = [*values.items(), *match.items()]
    arrays = ", ".join(f"%s::{sql_type}[]" for _, (sql_type, _) in columns)
    names = ", ".join(f"v{i}" for i in range(len(columns)))
    assignments = ", ".join(
        [*(f"{quote(c)} = v.v{i}" for i, c in enumerate(values)), *(f"{quote(c)} = %s" for c in same)]
    )
    conditions = "".join(f" AND t.{quote(c)} = v.v{len(values) + i}" for i, c in enumerate(match))
    key = quote(str(model._meta.pk.column))  # type: ignore[union-attr]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(model._meta.db_table)} AS t SET {assignments}"  # noqa: S608  (names are the model's)
            f" FROM unnest(%s::bigint[], {arrays}) AS v(pk, {names})"
            f" WHERE t.{key} = v.pk{conditions} RETURNING t.{key}",
            [*same.values(), array_literal(pks), *(_array_param(sql_type, v) for _, (sql_type, v) in columns)],
        )
        return {row[0] for row in cursor.fetchall()}


def _array_param(sql_type: str, values: Sequence[Any]) -> str:
    if sql_type in _NUMBER_TYPES:
        return array_literal(values)
    if sql_type == "timestamptz":
        return text_array_literal([None if v is None else v.isoformat() for v in values])
    if sql_type == "jsonb":
        return text_array_literal([None if v is None else json.dumps(v) for v in values])
    if sql_type == "text":
        return text_array_literal(values)
    raise ValueError(f"rows_update: no array binding for SQL type {sql_type!r}")


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


def insert_sql(instance: models.Model) -> tuple[str, list[Any]]:
    """``INSERT INTO <table> (<columns>) VALUES (%s, ...)`` for an unsaved ``instance``, and its parameters:
    the values ``save()`` would write (defaults applied, prepared for the connection), the automatic
    primary key left to the database. For a hot path that writes several rows in one statement (as
    the parts of a ``WITH``); a model's columns stay the model's to name."""
    db = connections[DEFAULT_DB_ALIAS]  # once: each access through ``connection`` looks it up again
    sql, fields = _insert_statement(type(instance))
    return sql, [f.get_db_prep_save(f.pre_save(instance, True), db) for f in fields]


@cache
def _insert_statement(model: type[models.Model]) -> tuple[str, list[models.Field[Any, Any]]]:
    meta = model._meta
    fields = [f for f in meta.concrete_fields if f is not meta.auto_field]
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    columns = ", ".join(quote(str(f.column)) for f in fields)
    return f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({', '.join(['%s'] * len(fields))})", fields  # noqa: S608


def advisory_lock_id(name: str) -> int:
    """A PostgreSQL advisory lock id (a signed 64-bit integer) for a lock named by text: the first eight
    bytes of its BLAKE2b digest. Every advisory lock the hub takes is named this way."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def execute_prepared(sql: str, params: Sequence[Any]) -> Any:
    """Run ``sql`` on the default connection, in its current transaction, with server-side parameters and
    a prepared plan that PostgreSQL keeps for the connection: for statements a hot path runs thousands of
    times a second, whose planning would otherwise cost more than their execution.

    Django binds parameters client-side (its psycopg cursors are ``ClientCursor``s), so PostgreSQL parses
    and plans every statement afresh. The plan is kept only where the connection allows preparing
    (``DB_PREPARED_STATEMENTS``, on by default; Django's own default is off); otherwise the statement
    runs unprepared, with server-side parameters. Returns the psycopg cursor (``fetchone``, ``fetchall``, ``rowcount``).
    As from Django's own cursors, errors arrive as ``django.db`` exceptions (the psycopg one as their
    ``__cause__``), and the statement is logged where Django logs queries (``DEBUG``, and the tests'
    query counts). PostgreSQL only: callers keep their portable path for SQLite.
    """
    import psycopg

    db = connections[DEFAULT_DB_ALIAS]  # once: each access through ``connection`` looks it up again
    # What Django's ``cursor()`` and ``execute()`` check first (``BaseDatabaseWrapper._cursor``,
    # ``CursorWrapper._execute``): a kept connection that fails its health check (``CONN_HEALTH_CHECKS``)
    # is replaced, and a statement inside an ``atomic`` block that must roll back is refused.
    db.close_if_health_check_failed()
    db.validate_no_broken_transaction()
    db.ensure_connection()
    cursor = psycopg.Cursor(db.connection)
    logged = db.queries_logged
    started = time.monotonic() if logged else 0.0
    with db.wrap_database_errors:
        cursor.execute(sql, params, prepare=True)
    if logged:
        db.queries_log.append({"sql": sql, "time": f"{time.monotonic() - started:.3f}"})
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


def sql_file(app: str, name: str) -> str:
    """The text of ``<app>/sql/<name>``: one version of a database function the app owns, for a migration
    to create (``PostgresOnlySQL(sql_file("ledger", "ledger_post.v1.sql"), ...)``).

    Each function lives in one file per version, and a version a migration has loaded is never edited:
    a change is a new version loaded by a new migration, whose backward step loads the version before.
    So migrating from zero replays every version in order, and going back restores the one before
    (docs/decisions.md, "SQL functions live in versioned files")."""
    package = importlib.import_module(app)
    assert package.__file__ is not None, f"{app} is a package on disk"
    return (Path(package.__file__).parent / "sql" / name).read_text(encoding="utf-8")
