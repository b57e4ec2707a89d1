"""Token authentication for persons: the user and their person in the one query that checks the token.

DRF's ``TokenAuthentication`` loads the token with its user; every ``/me`` view then looked the person
up by user in a second query. Here the person comes with them (``select_related``), so
:func:`wallets.selectors.person_for_user` reads it from the user without a query. Same tokens, same
header (``Authorization: Token <key>``), same answers.
"""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token


class PersonTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        try:
            token = Token.objects.select_related("user__person").get(key=key)
        except Token.DoesNotExist as exc:
            raise exceptions.AuthenticationFailed(_("Invalid token.")) from exc
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
