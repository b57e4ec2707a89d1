"""Tags and filters of the persons' pages: the navigation, accessible form fields, numbers per locale."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import template
from django.forms import BoundField
from django.utils import translation
from django.utils.formats import number_format
from django.utils.functional import Promise
from django.utils.translation import pgettext_lazy

from portal.nav import current_view, nav_items
from wallets.selectors import person_for_user

register = template.Library()

# The standard's canonical units (methodology.Scenario.unit) as a person reads them: alone (the unit of a
# scenario) and after a figure ("46.8 g CO2e per km"; Chinese needs the measure word there). The unit codes
# stay the standard's; an unknown code shows as it is.
UNITS: dict[str, tuple[Promise, Promise]] = {
    "km": (pgettext_lazy("unit", "km"), pgettext_lazy("per unit", "per km")),
    "trip": (pgettext_lazy("unit", "trip"), pgettext_lazy("per unit", "per trip")),
    "step": (pgettext_lazy("unit", "step"), pgettext_lazy("per unit", "per step")),
    "checkin": (pgettext_lazy("unit", "check-in"), pgettext_lazy("per unit", "per check-in")),
    "order": (pgettext_lazy("unit", "order"), pgettext_lazy("per unit", "per order")),
    "stay": (pgettext_lazy("unit", "hotel stay"), pgettext_lazy("per unit", "per hotel stay")),
    "bill": (pgettext_lazy("unit", "bill"), pgettext_lazy("per unit", "per bill")),
    "invoice": (pgettext_lazy("unit", "invoice"), pgettext_lazy("per unit", "per invoice")),
    "payment": (pgettext_lazy("unit", "payment"), pgettext_lazy("per unit", "per payment")),
    "box": (pgettext_lazy("unit", "box"), pgettext_lazy("per unit", "per box")),
    "item": (pgettext_lazy("unit", "item"), pgettext_lazy("per unit", "per item")),
    "kWh": (pgettext_lazy("unit", "kWh"), pgettext_lazy("per unit", "per kWh")),
}


@register.inclusion_tag("portal/includes/nav.html", takes_context=True)
def portal_nav(context: template.Context) -> dict[str, Any]:
    request = context["request"]
    is_person = person_for_user(request.user) is not None
    return {
        "items": nav_items(request, is_person=is_person),
        "is_person": is_person,
        "signed_in": request.user.is_authenticated,
        "here": current_view(request),
        "csrf_token": context.get("csrf_token"),
    }


@register.filter
def bcp47(language_code: str) -> str:
    """A Django language code as BCP 47 spells it in ``lang`` attributes: ``zh-hans`` -> ``zh-Hans``."""
    return translation.to_locale(language_code).replace("_", "-")


@register.simple_tag
def html_lang() -> str:
    """The page's language, for ``<html lang>``."""
    return bcp47(translation.get_language() or "en")


@register.inclusion_tag("portal/includes/field.html")
def form_field(field: BoundField) -> dict[str, Any]:
    """A labelled field whose help text and errors are tied to the control (``aria-describedby``), and
    marked invalid (``aria-invalid``) while it has errors."""
    described_by = []
    help_id = f"{field.auto_id}_help"
    errors_id = f"{field.auto_id}_errors"
    if field.help_text:
        described_by.append(help_id)
    if field.errors:
        described_by.append(errors_id)
    attrs: dict[str, str | bool] = {}
    if described_by:
        attrs["aria-describedby"] = " ".join(described_by)
    if field.errors:
        attrs["aria-invalid"] = "true"
    return {"field": field, "widget": field.as_widget(attrs=attrs), "help_id": help_id, "errors_id": errors_id}


@register.filter
def whole(value: int | Decimal | None) -> str:
    """A whole number grouped as the page's language groups it: ``12,345``."""
    if value is None:
        return ""
    return number_format(value, decimal_pos=0, use_l10n=True, force_grouping=True)


@register.filter
def decimal(value: Decimal | None, places: int | None = None) -> str:
    """A decimal as the page's language writes it, grouped, with ``places`` decimals (default: as many as
    it has, without trailing zeros: ``46.8``, ``0.0164``, ``25,000``)."""
    if value is None:
        return ""
    value = Decimal(value)
    if places is None:
        normalized = value.normalize()
        places = max(0, -int(normalized.as_tuple().exponent))
    return number_format(value, decimal_pos=int(places), use_l10n=True, force_grouping=True)


@register.filter
def unit_name(code: str) -> str:
    """``km`` -> "km" / "公里"."""
    known = UNITS.get(code)
    return str(known[0]) if known else code


@register.filter
def per_unit(code: str) -> str:
    """``km`` -> "per km" / "每公里"."""
    known = UNITS.get(code)
    return str(known[1]) if known else f"/ {code}"
