"""Token authentication for persons: the user and their person in the one query that checks the token.

DRF's ``TokenAuthentication`` loads the token with its user; every ``/me`` view then looked the person
up by user in a second query. Here the person comes with them, so
:func:`wallets.selectors.person_for_user` reads it from the user without a query. Same tokens, same
header (``Authorization: Token <key>``), same answers.

On PostgreSQL the query is written out and runs with a prepared plan (``execute_prepared``): every
person request starts here, and building the ORM's ``select_related`` query cost more CPU than
everything else about authenticating (about 0.6 ms a request, against 0.1 ms now). Elsewhere it is
that ORM query.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Model
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token

from clearinghouse.db import execute_prepared
from wallets.models import Person


@dataclass(frozen=True)
class _TokenQuery:
    sql: str
    token_fields: list[str]
    user_fields: list[str]
    person_fields: list[str]


@cache
def _token_query() -> _TokenQuery:
    """The SQL: the token's, user's and person's columns (each model's ``concrete_fields``, in order)."""
    user_model = get_user_model()
    parts: list[tuple[type[Model], str]] = [(Token, "t"), (user_model, "u"), (Person, "p")]
    columns = ", ".join(f'{alias}."{f.column}"' for model, alias in parts for f in model._meta.concrete_fields)
    user_pk = user_model._meta.pk.column if user_model._meta.pk else "id"
    person_user = Person._meta.get_field("user").column
    sql = (
        f"SELECT {columns} FROM {Token._meta.db_table} t"  # noqa: S608 (names from the models)
        f' JOIN {user_model._meta.db_table} u ON u."{user_pk}" = t.user_id'
        f' LEFT JOIN {Person._meta.db_table} p ON p."{person_user}" = u."{user_pk}"'
        " WHERE t.key = %s"
    )
    names = [[f.attname for f in model._meta.concrete_fields] for model, _ in parts]
    return _TokenQuery(sql, *names)


def _token_with_person(key: str) -> Any:
    """The token with its user, the user with their person (or None) cached on it; None if no such token."""
    if connection.vendor != "postgresql":
        try:
            return Token.objects.select_related("user__person").get(key=key)
        except Token.DoesNotExist:
            return None
    query = _token_query()
    row = execute_prepared(query.sql, [key]).fetchone()
    if row is None:
        return None
    tokens, users = len(query.token_fields), len(query.user_fields)
    person_values = row[tokens + users :]
    token = Token.from_db(connection.alias, query.token_fields, row[:tokens])
    user = get_user_model().from_db(connection.alias, query.user_fields, row[tokens : tokens + users])
    person = None if person_values[0] is None else Person.from_db(connection.alias, query.person_fields, person_values)
    # What select_related("user__person") would have cached: no query for token.user nor user.person
    # (a None there makes user.person raise Person.DoesNotExist, as for a user who is no person).
    token._state.fields_cache["user"] = user
    user._state.fields_cache["person"] = person
    if person is not None:
        person._state.fields_cache["user"] = user
    return token


class PersonTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        token = _token_with_person(key)
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
