"""Settlement in the admin: rewards are edited here; redemptions and their allocations are read-only books,
changed only through services (the void action)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import ForeignKey, QuerySet
from django.http import HttpRequest

from clearinghouse.errors import HubError
from institutions.models import Institution
from ledger.admin import ReadOnlyAdmin, milligrams
from ledger.models import Transfer
from settlement.models import Redemption, RedemptionAllocation, Reward
from settlement.services import redemption_void, reward_create


@admin.register(Reward)
class RewardAdmin(admin.ModelAdmin):
    """Adding goes through ``reward_create`` (as the command does); the form already checked what the
    model's constraints say (code format and uniqueness, positive points, an ordered window)."""

    list_display = ("code", "title", "provider", "points", "stock", "per_person_limit", "active_from", "active_until")
    list_filter = ("provider",)
    search_fields = ("=code", "title")
    list_select_related = ("provider",)
    ordering = ("code",)

    def get_readonly_fields(self, request: HttpRequest, obj: Reward | None = None) -> tuple[str, ...]:
        # A reward's identity is what redemptions and providers' events refer to.
        return ("provider", "code", "created_at") if obj is not None else ("created_at",)

    def formfield_for_foreignkey(self, db_field: ForeignKey, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "provider":
            kwargs["queryset"] = Institution.objects.filter(is_provider=True)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: Reward, form: forms.ModelForm, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created = reward_create(
            provider=obj.provider,
            code=obj.code,
            title=obj.title,
            points=obj.points,
            stock=obj.stock,
            per_person_limit=obj.per_person_limit,
            active_from=obj.active_from,
            active_until=obj.active_until,
        )
        obj.pk, obj.created_at = created.pk, created.created_at
        obj._state.adding = False


class AllocationInline(admin.TabularInline):
    model = RedemptionAllocation
    fields = readonly_fields = ("lot", "issuer", "expires_on", "amount")
    ordering = ("id",)
    extra = 0
    can_delete = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[RedemptionAllocation]:
        return super().get_queryset(request).select_related("lot", "issuer")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="amount")
    def amount(self, allocation: RedemptionAllocation) -> str:
        return milligrams(allocation.milligrams)


@admin.register(Redemption)
class RedemptionAdmin(ReadOnlyAdmin):
    list_display = (
        "public_id",
        "person",
        "reward",
        "provider",
        "quantity",
        "points",
        "status",
        "created_at",
        "hold_expires_at",
        "resolved_at",
    )
    list_filter = ("status", "provider")
    search_fields = ("=public_id",)
    search_help_text = "Exact redemption id (rdm_...)."
    list_select_related = ("person", "reward", "provider")
    show_full_result_count = False
    ordering = ("-id",)
    fields = readonly_fields = (
        "public_id",
        "person",
        "reward",
        "provider",
        "quantity",
        "points",
        "status",
        "created_at",
        "hold_expires_at",
        "resolved_at",
        "resolved_by",
        "voucher",
        "reason",
        "transfers",
    )
    inlines = (AllocationInline,)
    actions = ("void",)

    def has_void_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("settlement.change_redemption")

    @admin.display(description="ledger transfers")
    def transfers(self, redemption: Redemption) -> str:
        keys = Transfer.objects.filter(idempotency_key__startswith=f"redemption:{redemption.pk}:").values_list(
            "idempotency_key", flat=True
        )
        return ", ".join(sorted(keys)) or "-"

    @admin.action(
        description="Void selected pending holds (points back to the lots they came from)", permissions=["void"]
    )
    def void(self, request: HttpRequest, queryset: QuerySet[Redemption]) -> None:
        voided = 0
        for redemption in queryset.filter(status=Redemption.Status.PENDING).order_by("pk"):
            try:
                redemption_void(redemption=redemption, reason="voided by an operator", by=request.user.get_username())
            except HubError as exc:  # answered or voided meanwhile
                self.message_user(request, f"{redemption.public_id}: {exc.message}", messages.WARNING)
                continue
            voided += 1
        skipped = queryset.count() - voided
        note = f"; skipped {skipped} not pending" if skipped else ""
        self.message_user(
            request, f"Voided {voided} redemption(s){note}.", messages.SUCCESS if voided else messages.WARNING
        )
