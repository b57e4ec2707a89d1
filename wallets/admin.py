"""Operator views of persons and links.

Nothing here shows an institution's subject id, not even sealed, nor a link code or its hash:
memberships, codes and attempts are read-only, and ending a link goes through the service.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from clearinghouse.admin import ReadOnlyAdmin
from wallets.models import LinkAttempt, LinkCode, Membership, Person
from wallets.selectors import wallet_summary
from wallets.services import membership_end


@admin.register(Person)
class PersonAdmin(ReadOnlyAdmin):
    list_display = ["pseudonym", "created_at", "active_links", "erased_at"]
    list_filter = [("erased_at", admin.EmptyFieldListFilter)]
    fields = ["pseudonym", "created_at", "erased_at", "wallet"]
    readonly_fields = ["wallet"]
    search_fields = ["pseudonym"]
    date_hierarchy = "created_at"

    @admin.display(description="Wallet")
    def wallet(self, person: Person) -> str:
        """The summary the person sees, from the ledger's balances (two queries)."""
        summary = wallet_summary(person)
        parts = [format_html("{} points ({} g)", summary.points, summary.grams)]
        parts += [
            format_html("{}: {} points, next lapse {}", b.institution, b.points, b.next_expiry)
            for b in summary.by_institution
        ]
        parts += [format_html("expiring soon: {} points on {}", e.points, e.expires_on) for e in summary.expiring_soon]
        if summary.debt_milligrams:
            parts.append(format_html("owes {} points", summary.debt_points))
        return format_html_join(mark_safe("<br>"), "{}", ((part,) for part in parts))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Person]:
        return (
            super()
            .get_queryset(request)
            .annotate(active_link_count=Count("memberships", filter=Q(memberships__unlinked_at__isnull=True)))
        )

    @admin.display(description="Active links", ordering="active_link_count")
    def active_links(self, person: Any) -> int:
        return int(person.active_link_count)


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ["institution", "person", "linked_at", "unlinked_at", "unlinked_by"]
    list_filter = ["institution", ("unlinked_at", admin.EmptyFieldListFilter), "unlinked_by"]
    list_select_related = ["institution", "person"]
    # subject_ref and subject_sealed are left out on purpose (DESIGN.md, privacy).
    fields = ["institution", "person", "linked_at", "unlinked_at", "unlinked_by"]
    search_fields = ["person__pseudonym", "institution__code"]
    date_hierarchy = "linked_at"
    actions = ["end_links"]

    @admin.action(
        description="Unlink the selected memberships (pooled points stay the person's)", permissions=["change"]
    )
    def end_links(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        ended = sum(
            membership_end(membership=m, ended_by=Membership.EndedBy.OPERATOR)
            for m in queryset.filter(unlinked_at__isnull=True)
        )
        self.message_user(request, f"Unlinked {ended} membership(s).", messages.SUCCESS)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The change permission only gates the unlink action; a membership's page stays view-only.
        return obj is None and admin.ModelAdmin.has_change_permission(self, request)


@admin.register(LinkCode)
class LinkCodeAdmin(ReadOnlyAdmin):
    list_display = ["person", "created_at", "expires_at", "used_at", "used_by"]
    list_filter = [("used_at", admin.EmptyFieldListFilter), "used_by"]
    list_select_related = ["person", "used_by"]
    # code_hash is left out: the code is the person's secret until used.
    fields = ["person", "created_at", "expires_at", "used_at", "used_by"]
    search_fields = ["person__pseudonym"]
    date_hierarchy = "created_at"


@admin.register(LinkAttempt)
class LinkAttemptAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "institution", "result", "person", "event_id"]
    list_filter = ["result", "institution", "created_at"]
    list_select_related = ["institution", "person"]
    fields = ["created_at", "institution", "result", "person", "event_id"]
    search_fields = ["event_id", "person__pseudonym"]
    date_hierarchy = "created_at"
