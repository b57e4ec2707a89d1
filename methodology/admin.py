"""Operators edit the standard here. A factor is never overwritten: a change is a new version with
its own valid-from date and source, and every edit tells the workers to reload the registry."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.forms import BaseInlineFormSet
from django.http import HttpRequest

from clearinghouse.admin import ReadOnlyAdmin
from methodology.models import (
    ActionMapping,
    Cap,
    EvidenceTier,
    FactorVersion,
    NormalizedActivity,
    Scenario,
    UnitConversion,
)
from methodology.services import standard_changed


class StandardAdmin(admin.ModelAdmin):
    """Every registry edit bumps the revision in the same transaction as the edit."""

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        standard_changed()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        standard_changed()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        super().delete_queryset(request, queryset)
        standard_changed()

    def save_formset(self, request: HttpRequest, form: Any, formset: BaseInlineFormSet, change: bool) -> None:
        super().save_formset(request, form, formset, change)
        standard_changed()


class FactorHistoryInline(admin.TabularInline):
    """Past and current versions, read-only; the empty row adds a new version."""

    model = FactorVersion
    extra = 1
    can_delete = False
    fields = ("valid_from", "grams_per_unit", "source", "created_at")
    readonly_fields = ("created_at",)
    ordering = ("-valid_from",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CapInline(admin.TabularInline):
    model = Cap
    extra = 0


@admin.register(Scenario)
class ScenarioAdmin(StandardAdmin):
    list_display = ("code", "name", "unit", "active")
    list_filter = ("active", "unit")
    search_fields = ("code", "name")
    inlines = [FactorHistoryInline, CapInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Scenario | None = None) -> tuple[str, ...]:
        # The code and unit are what history was measured in; renaming them would rewrite it.
        return ("code", "unit") if obj is not None else ()


@admin.register(FactorVersion)
class FactorVersionAdmin(StandardAdmin):
    list_display = ("scenario", "valid_from", "grams_per_unit", "short_source", "created_at")
    list_filter = ("scenario",)
    list_select_related = ("scenario",)
    search_fields = ("scenario__code", "source")
    ordering = ("scenario__code", "-valid_from")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="source")
    def short_source(self, obj: FactorVersion) -> str:
        return obj.source if len(obj.source) <= 80 else obj.source[:79] + "…"


@admin.register(ActionMapping)
class ActionMappingAdmin(StandardAdmin):
    list_display = ("institution", "action_code", "scenario", "unit", "multiplier", "active")
    list_filter = ("active", "institution", "scenario")
    list_select_related = ("institution", "scenario")
    search_fields = ("action_code", "institution__code", "scenario__code")
    autocomplete_fields = ("scenario",)


@admin.register(UnitConversion)
class UnitConversionAdmin(StandardAdmin):
    list_display = ("from_unit", "to_unit", "multiplier")
    search_fields = ("from_unit", "to_unit")


@admin.register(Cap)
class CapAdmin(StandardAdmin):
    list_display = ("scenario", "period", "max_quantity", "source")
    list_filter = ("period",)
    list_select_related = ("scenario",)


@admin.register(EvidenceTier)
class EvidenceTierAdmin(StandardAdmin):
    list_display = ("code", "name", "weight")


@admin.register(NormalizedActivity)
class NormalizedActivityAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "occurred_at",
        "institution",
        "scenario",
        "quantity",
        "grams",
        "credited_mg",
        "status",
        "reason",
        "owner",
    )
    list_filter = ("status", "reason", "scenario", "institution", "evidence")
    list_select_related = ("institution", "scenario", "person")
    date_hierarchy = "occurred_at"
    show_full_result_count = False
    # Subject refs are keyed hashes, but an owner is shown by pseudonym only.
    exclude = ("subject_ref", "owner_key")

    @admin.display(description="owner")
    def owner(self, obj: NormalizedActivity) -> str:
        return obj.person.pseudonym if obj.person is not None else "unlinked subject"
