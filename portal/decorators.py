"""Access to the persons' pages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, Concatenate, ParamSpec

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from wallets.models import Person
from wallets.selectors import person_for_user

P = ParamSpec("P")
PersonView = Callable[Concatenate[HttpRequest, Person, P], HttpResponse]


def person_required(view: PersonView[P]) -> Callable[Concatenate[HttpRequest, P], HttpResponse]:
    """A page of a signed-in person, who is passed to the view after the request.

    Anyone else is sent to sign in (and back here after); a signed-in user who is not a person (an
    operator signed in through the admin) gets a page saying so, not an error. The answer is never
    cached: after signing out, the browser's back button shows nothing of the person's.
    """

    @wraps(view)
    @never_cache
    def wrapped(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        person = person_for_user(request.user)
        if person is None:
            return not_a_person(request)
        return view(request, person, *args, **kwargs)

    return wrapped


def not_a_person(request: HttpRequest, **context: Any) -> HttpResponse:
    return render(request, "portal/not_a_person.html", context, status=403)
