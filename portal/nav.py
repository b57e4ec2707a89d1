"""The persons' main navigation.

Each entry is a URL name and its label. An entry shows only once its URL name is routed (portal.urls):
a page still to be built is simply absent, never a link to nothing. Adding a page in its place is adding
its route under the name given here.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

# For signed-in persons, in this order.
NAV: tuple[tuple[str, Promise], ...] = (
    ("portal:home", _("My carbon account")),
    ("portal:activity", _("Activity")),
    ("portal:link", _("Link an institution")),
    ("portal:rewards", _("Rewards")),
    ("portal:redemptions", _("Redemptions")),
    ("portal:privacy", _("Privacy")),
    ("portal:standard", _("Standard")),
)
# For anyone else.
PUBLIC_NAV: tuple[tuple[str, Promise], ...] = (("portal:standard", _("Standard")),)


@dataclass(frozen=True, slots=True)
class NavItem:
    url: str
    label: Promise
    current: bool


def current_view(request: HttpRequest) -> str:
    match = request.resolver_match
    return match.view_name if match is not None else ""


def nav_items(request: HttpRequest, *, is_person: bool) -> list[NavItem]:
    """The entries this request's visitor sees, each with whether it is the page being shown."""
    entries = NAV if is_person else PUBLIC_NAV
    here = current_view(request)
    items = []
    for name, label in entries:
        try:
            url = reverse(name)
        except NoReverseMatch:
            continue  # not built yet
        items.append(NavItem(url=url, label=label, current=name == here))
    return items
