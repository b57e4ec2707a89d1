"""The forms of the persons' pages. They validate and word the errors; services do the work.

Field names are Django's own (``username``, ``password``; ``password1``, ``password2`` to sign up;
``old_password``, ``new_password1``, ``new_password2`` to change it), with the ``autocomplete`` values
password managers look for.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.forms import PasswordChangeForm as DjangoPasswordChangeForm
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.debug import sensitive_variables

from clearinghouse.errors import RateLimited
from wallets.exceptions import InvalidCredentials
from wallets.services import person_authenticate

USERNAME_ATTRS = {"autocomplete": "username", "autocapitalize": "none", "spellcheck": "false"}


def throttled_message(error: RateLimited) -> str:
    """What a person reads when the hub refuses another attempt for now: how long to wait, in minutes."""
    seconds = int(error.headers.get("Retry-After") or 60)
    minutes = max(1, -(-seconds // 60))
    return ngettext(
        "Too many attempts. For your account's safety, please wait %(minutes)s minute and try again.",
        "Too many attempts. For your account's safety, please wait %(minutes)s minutes and try again.",
        minutes,
    ) % {"minutes": minutes}


class SignInForm(forms.Form):
    username = forms.CharField(label=_("Username"), max_length=150, widget=forms.TextInput(attrs=USERNAME_ATTRS))
    password = forms.CharField(
        label=_("Password"),
        max_length=256,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
    )


class SignUpForm(forms.Form):
    username = forms.CharField(
        label=_("Username"),
        max_length=150,
        validators=[UnicodeUsernameValidator()],
        help_text=_(
            "Letters, digits and @ . + - _ only. The hub needs no real name: choose one that is not your "
            "phone number or ID number."
        ),
        widget=forms.TextInput(attrs=USERNAME_ATTRS),
        error_messages={"invalid": _("Use only letters, digits and @ . + - _ in a username.")},
    )
    password1 = forms.CharField(
        label=_("Password"),
        max_length=256,
        strip=False,
        help_text=_("At least 10 characters, not a common password and not only digits."),
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    password2 = forms.CharField(
        label=_("Repeat the password"),
        max_length=256,
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        password1, password2 = cleaned.get("password1"), cleaned.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", _("The two passwords are not the same."))
        elif password1:
            # The same validators the sign-up service applies, run here to tie their messages to the field.
            user = get_user_model()(username=cleaned.get("username") or "")
            try:
                password_validation.validate_password(password1, user=user)
            except ValidationError as error:
                self.add_error("password1", error)
        return cleaned


class PasswordChangeForm(DjangoPasswordChangeForm):
    """Django's form, checking the current password through the same throttled sign-in check as the
    sign-in page and the API (wallets.services.person_authenticate): guessing it here counts there."""

    def __init__(self, user: Any, *args: Any, address: str | None = None, **kwargs: Any) -> None:
        super().__init__(user, *args, **kwargs)
        self.address = address
        self.throttled: RateLimited | None = None
        self.fields["old_password"].label = _("Current password")
        self.fields["new_password1"].label = _("New password")
        self.fields["new_password1"].help_text = _("At least 10 characters, not a common password and not only digits.")
        self.fields["new_password2"].label = _("Repeat the new password")
        self.fields["new_password2"].help_text = ""
        self.error_messages = {**self.error_messages, "password_mismatch": _("The two passwords are not the same.")}

    @sensitive_variables("old_password")
    def clean_old_password(self) -> str:
        old_password: str = self.cleaned_data["old_password"]
        try:
            person_authenticate(username=self.user.get_username(), password=old_password, address=self.address)
        except RateLimited as error:
            self.throttled = error
            raise ValidationError(throttled_message(error), code="throttled") from error
        except InvalidCredentials as error:
            raise ValidationError(_("The current password is not right."), code="password_incorrect") from error
        return old_password
