"""The persons' pages. Thin as the API's views are: a form or a selector in, a template out; services
(wallets, methodology, settlement, ledger) do the work.

Nothing of a person goes into a URL or a log line: credentials travel in POST bodies only (and are
marked sensitive for error reports), and pages name no person in their addresses.
"""

from __future__ import annotations

from decimal import Decimal

from django.contrib import messages
from django.contrib.auth import login, logout, update_session_auth_hash
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from clearinghouse.errors import RateLimited
from clearinghouse.throttle import client_address
from methodology.selectors import standard_history
from portal.decorators import person_required
from portal.forms import PasswordChangeForm, SignInForm, SignUpForm, throttled_message
from wallets.exceptions import InvalidCredentials, InvalidPassword, UsernameTaken
from wallets.models import Person
from wallets.selectors import person_for_user, wallet_summary
from wallets.services import person_authenticate, person_signup

# Grams in a kilogram: a point is a gram of CO2e (DESIGN.md, units).
GRAMS_PER_KG = 1000


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """``/``: a signed-in person's carbon account; anyone else sees what the hub is and how to start."""
    if not request.user.is_authenticated:
        return render(request, "portal/landing.html")
    return _account(request)


@person_required
def _account(request: HttpRequest, person: Person) -> HttpResponse:
    summary = wallet_summary(person)
    context = {
        "summary": summary,
        "points": summary.points,
        "kilograms": Decimal(summary.points) / GRAMS_PER_KG,
    }
    return render(request, "portal/home.html", context)


def _next_url(request: HttpRequest) -> str:
    """Where to go after signing in: the page that sent the person here, if it is one of ours."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return target
    return reverse("portal:home")


def _throttled(response: HttpResponse, error: RateLimited) -> HttpResponse:
    response.status_code = 429
    for name, value in error.headers.items():
        response[name] = value
    return response


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def signin(request: HttpRequest) -> HttpResponse:
    """Session sign-in through the same throttled check as the API's token (per account and address)."""
    if request.user.is_authenticated and person_for_user(request.user) is not None:
        return redirect(_next_url(request))
    form = SignInForm(request.POST if request.method == "POST" else None)
    throttled: RateLimited | None = None
    if form.is_valid():
        try:
            user = person_authenticate(
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password"],
                address=client_address(request.META),
            )
        except RateLimited as error:
            throttled = error
            form.add_error(None, throttled_message(error))
        except InvalidCredentials:
            form.add_error(None, _("The username or the password is not right."))
        else:
            # The service answers an instance of the user model, typed as its abstract base.
            login(request, user)  # type: ignore[arg-type]
            return redirect(_next_url(request))
    response = render(request, "portal/signin.html", {"form": form, "next": _next_url(request)})
    return _throttled(response, throttled) if throttled else response


@sensitive_post_parameters("password1", "password2")
@csrf_protect
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """A new person (with the API's token too, as ``POST /api/v1/auth/signup`` makes), signed in at once."""
    if request.user.is_authenticated and person_for_user(request.user) is not None:
        return redirect("portal:home")
    form = SignUpForm(request.POST if request.method == "POST" else None)
    throttled: RateLimited | None = None
    if form.is_valid():
        try:
            signed_up = person_signup(
                username=form.cleaned_data["username"],
                password=form.cleaned_data["password1"],
                address=client_address(request.META),
            )
        except RateLimited as error:
            throttled = error
            form.add_error(None, throttled_message(error))
        except UsernameTaken:
            form.add_error("username", _("This username is taken. Please choose another."))
        except InvalidPassword as error:
            # The form ran the same validators; a difference (a validator changed meanwhile) still reads well.
            form.add_error("password1", [item["message"] for item in error.extra.get("errors", [])] or error.message)
        else:
            user = signed_up.person.user
            assert user is not None  # just made
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, _("Welcome! Your carbon account is ready."))
            return redirect("portal:home")
    response = render(request, "portal/signup.html", {"form": form})
    return _throttled(response, throttled) if throttled else response


@require_POST
def signout(request: HttpRequest) -> HttpResponse:
    """Sign-out is a POST (a form with its CSRF token): a link or an image elsewhere cannot sign anyone out."""
    logout(request)
    messages.info(request, _("You have signed out."))
    return redirect("portal:home")


@sensitive_post_parameters("old_password", "new_password1", "new_password2")
@csrf_protect
@require_http_methods(["GET", "HEAD", "POST"])
@person_required
def password_change(request: HttpRequest, person: Person) -> HttpResponse:
    form = PasswordChangeForm(
        request.user,
        request.POST if request.method == "POST" else None,
        address=client_address(request.META),
    )
    if form.is_valid():
        form.save()
        # Other sessions of this account end; this one goes on.
        update_session_auth_hash(request, form.user)
        messages.success(request, _("Your password has been changed."))
        return redirect("portal:home")
    response = render(request, "portal/password_change.html", {"form": form})
    return _throttled(response, form.throttled) if form.throttled else response


@require_safe
def standard(request: HttpRequest) -> HttpResponse:
    """The published standard, for anyone: every scenario, its factor in force and every version of it."""
    return render(request, "portal/standard.html", {"scenarios": standard_history()})


@require_safe
def favicon(request: HttpRequest) -> HttpResponse:
    return redirect(static("portal/icon.svg"), permanent=True)
