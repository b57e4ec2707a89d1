"""Settlement for operators: obligations, cycles with their net positions, statements, instructions.

Everything here is read-only except through services: "Run settlement now" is ``cycle_run`` (what
``manage.py settlement_run`` and the daily task do), "Resend" is ``cycle_resend``. Statements export as
CSV (``settlement.selectors.statements_csv``). Disputed instructions are flagged: the "needs operator"
filter, a red mark in the lists, and the cycle's own ``disputed`` state.

Rewards are edited here (added through ``reward_create``); redemptions and their allocations are
read-only books, changed only through services (the void action).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, ForeignKey, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from clearinghouse.admin import ReadOnlyAdmin, ReadOnlyInline
from clearinghouse.errors import HubError
from institutions.models import Institution
from ledger.admin import milligrams
from ledger.models import Transfer
from settlement.models import (
    Confirmation,
    Cycle,
    CycleState,
    Instruction,
    InstructionState,
    NetPosition,
    Obligation,
    Redemption,
    RedemptionAllocation,
    Reward,
)
from settlement.selectors import statements, statements_csv
from settlement.services import cycle_resend, cycle_run, redemption_void, reward_create


def _party(institution: Any) -> str:
    return "hub" if institution is None else str(institution)


def _csv_response(positions: QuerySet[NetPosition], filename: str) -> HttpResponse:
    ordered = list(positions.select_related("cycle", "institution").order_by("cycle_id", "institution__code"))
    response = HttpResponse(statements_csv(statements(ordered)), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- Obligations ------------------------------------------------------------------------------------


class WaitingFilter(admin.SimpleListFilter):
    title = "cycle"
    parameter_name = "waiting"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Waiting for the next cut"), ("no", "In a cycle")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Obligation]) -> QuerySet[Obligation]:
        if self.value() in ("yes", "no"):
            return queryset.filter(cycle__isnull=self.value() == "yes")
        return queryset


@admin.register(Obligation)
class ObligationAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "source",
        "debtor_display",
        "creditor_display",
        "amount_minor",
        "currency",
        "cycle",
        "created_at",
    ]
    list_filter = [WaitingFilter, "currency"]
    search_fields = ["=key", "=source"]
    search_help_text = "Exact key or source (e.g. redemption:17, carry:cycle-3)."
    list_select_related = ["debtor", "creditor", "cycle"]
    ordering = ["-id"]
    show_full_result_count = False

    @admin.display(description="debtor", ordering="debtor__code")
    def debtor_display(self, obligation: Obligation) -> str:
        return _party(obligation.debtor)

    @admin.display(description="creditor", ordering="creditor__code")
    def creditor_display(self, obligation: Obligation) -> str:
        return _party(obligation.creditor)


# --- Cycles -----------------------------------------------------------------------------------------


class NetPositionInline(ReadOnlyInline):
    model = NetPosition
    fields = readonly_fields = (
        "institution",
        "gross_in",
        "gross_out",
        "net_minor",
        "carried_forward_minor",
        "instructed",
    )
    ordering = ["institution__code"]
    list_select_related = ("institution",)

    @admin.display(description="instructed (signed)")
    def instructed(self, position: NetPosition) -> int:
        return position.instructed_minor


class InstructionInline(ReadOnlyInline):
    model = Instruction
    fields = readonly_fields = ("link", "institution", "direction", "amount_minor", "value_date", "state_flag")
    ordering = ["institution__code"]
    list_select_related = ("institution",)

    @admin.display(description="instruction")
    def link(self, instruction: Instruction) -> str:
        url = reverse("admin:settlement_instruction_change", args=[instruction.pk])
        return format_html('<a href="{}">{}</a>', url, instruction.instruction_id)

    @admin.display(description="state")
    def state_flag(self, instruction: Instruction) -> str:
        return _state_flag(instruction)


def _state_flag(instruction: Instruction) -> str:
    if instruction.state == InstructionState.DISPUTED:
        return format_html('<strong style="color:#ba2121">&#9888; {}</strong>', instruction.state)
    return instruction.state


def _per_cycle(rows: QuerySet[Any]) -> Coalesce:
    """How many of ``rows`` belong to the cycle of the outer row."""
    counted = rows.filter(cycle=OuterRef("pk")).order_by().values("cycle").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted), 0)


@admin.register(Cycle)
class CycleAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "state_flag",
        "cut_off_at",
        "currency",
        "obligation_count",
        "instruction_count",
        "disputed_count",
        "updated_at",
    ]
    list_filter = ["state", "currency"]
    ordering = ["-cut_off_at"]
    fields = readonly_fields = ("state", "currency", "cut_off_at", "created_at", "updated_at")
    inlines = [NetPositionInline, InstructionInline]
    actions = ["export_statements", "resend"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Cycle]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                # One small count per row shown, not a join of obligations x instructions over every cycle.
                n_obligations=_per_cycle(Obligation.objects.all()),
                n_instructions=_per_cycle(Instruction.objects.all()),
                n_disputed=_per_cycle(Instruction.objects.filter(state=InstructionState.DISPUTED)),
            )
        )

    @admin.display(description="state", ordering="state")
    def state_flag(self, cycle: Cycle) -> str:
        if cycle.state in (CycleState.DISPUTED, CycleState.FAILED):
            return format_html('<strong style="color:#ba2121">&#9888; {}</strong>', cycle.state)
        return cycle.state

    @admin.display(description="obligations", ordering="n_obligations")
    def obligation_count(self, cycle: Cycle) -> int:
        return getattr(cycle, "n_obligations", 0)

    @admin.display(description="instructions", ordering="n_instructions")
    def instruction_count(self, cycle: Cycle) -> int:
        return getattr(cycle, "n_instructions", 0)

    @admin.display(description="disputed", ordering="n_disputed")
    def disputed_count(self, cycle: Cycle) -> int:
        return getattr(cycle, "n_disputed", 0)

    def has_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("settlement.change_cycle")

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("settlement.view_netposition")

    # "Run settlement now": a button on the list (no selection needed), POST only.

    def get_urls(self) -> list[URLPattern]:
        run = path("run/", self.admin_site.admin_view(self.run_view), name="settlement_cycle_run")
        return [run, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra = {"can_run_settlement": self.has_run_permission(request), **(extra_context or {})}
        return super().changelist_view(request, extra)

    def run_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or not self.has_run_permission(request):
            raise PermissionDenied
        try:
            run = cycle_run()
        except HubError as exc:
            self.message_user(request, f"Settlement not run: {exc.message}", messages.ERROR)
        else:
            if run is None:
                self.message_user(request, "Nothing to settle.", messages.INFO)
            else:
                self.log_addition(request, run.cycle, [{"added": {}}])
                self.message_user(
                    request,
                    f"Cycle {run.cycle.pk} {run.cycle.state}: {len(run.positions)} position(s), "
                    f"{len(run.instructions)} instruction(s).",
                    messages.SUCCESS,
                )
        return HttpResponseRedirect(reverse("admin:settlement_cycle_changelist"))

    @admin.action(description="Export statements of selected cycles (CSV)", permissions=["export"])
    def export_statements(self, request: HttpRequest, queryset: QuerySet[Cycle]) -> HttpResponse:
        ids = sorted(queryset.values_list("pk", flat=True))
        name = f"statements-cycle-{ids[0]}.csv" if len(ids) == 1 else "statements.csv"
        return _csv_response(NetPosition.objects.filter(cycle_id__in=ids), name)

    @admin.action(description="Resend undelivered instructions of failed cycles", permissions=["run"])
    def resend(self, request: HttpRequest, queryset: QuerySet[Cycle]) -> None:
        for cycle in queryset.order_by("pk"):
            try:
                count = cycle_resend(cycle=cycle)
            except HubError as exc:
                self.message_user(request, f"Cycle {cycle.pk}: {exc.message}", messages.WARNING)
            else:
                self.message_user(request, f"Cycle {cycle.pk}: {count} webhook(s) sent again.", messages.SUCCESS)


# --- Statements (net positions) ---------------------------------------------------------------------


@admin.register(NetPosition)
class StatementAdmin(ReadOnlyAdmin):
    """One row per institution per cycle: its statement. Export as CSV from the action."""

    list_display = ["cycle", "institution", "gross_in", "gross_out", "net_minor", "carried_forward_minor"]
    list_filter = ["cycle__state", "institution"]
    list_select_related = ["cycle", "institution"]
    ordering = ["-cycle_id", "institution__code"]
    actions = ["export_statements"]

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("settlement.view_netposition")

    @admin.action(description="Export selected statements (CSV)", permissions=["export"])
    def export_statements(self, request: HttpRequest, queryset: QuerySet[NetPosition]) -> HttpResponse:
        return _csv_response(queryset, "statements.csv")


# --- Instructions -----------------------------------------------------------------------------------


class NeedsOperatorFilter(admin.SimpleListFilter):
    title = "needs operator"
    parameter_name = "needs_operator"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Disputed"), ("no", "Not disputed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Instruction]) -> QuerySet[Instruction]:
        if self.value() == "yes":
            return queryset.filter(state=InstructionState.DISPUTED)
        if self.value() == "no":
            return queryset.exclude(state=InstructionState.DISPUTED)
        return queryset


class ConfirmationInline(ReadOnlyInline):
    model = Confirmation
    fields = readonly_fields = ("status", "reference", "received_at", "inbox_event")
    ordering = ["id"]
    list_select_related = ("inbox_event",)


@admin.register(Instruction)
class InstructionAdmin(ReadOnlyAdmin):
    list_display = [
        "instruction_id",
        "cycle",
        "institution",
        "direction",
        "amount_minor",
        "currency",
        "value_date",
        "state_flag",
        "disputed",
        "latest_reference",
        "delivery",
    ]
    list_filter = [NeedsOperatorFilter, "state", "direction", "cycle__state"]
    search_fields = ["=instruction_id", "=institution__code"]
    search_help_text = "Exact instruction id (ins_...) or institution code."
    list_select_related = ["cycle", "institution", "message"]
    ordering = ["-cycle_id", "institution__code"]
    fields = readonly_fields = (
        "instruction_id",
        "cycle",
        "institution",
        "direction",
        "amount_minor",
        "currency",
        "value_date",
        "statement_digest",
        "state_flag",
        "delivery",
        "created_at",
        "updated_at",
    )
    inlines = [ConfirmationInline]
    actions = ["export_statements"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Instruction]:
        return super().get_queryset(request).prefetch_related("confirmations")

    @admin.display(description="state", ordering="state")
    def state_flag(self, instruction: Instruction) -> str:
        return _state_flag(instruction)

    @admin.display(description="disputed", boolean=True)
    def disputed(self, instruction: Instruction) -> bool:
        return instruction.state == InstructionState.DISPUTED

    @admin.display(description="latest reference")
    def latest_reference(self, instruction: Instruction) -> str:
        confirmations = list(instruction.confirmations.all())
        return confirmations[-1].reference if confirmations else "-"

    @admin.display(description="webhook")
    def delivery(self, instruction: Instruction) -> str:
        url = reverse("admin:institutions_outboxmessage_change", args=[instruction.message_id])
        return format_html('<a href="{}">{}</a>', url, instruction.message.status)

    def has_export_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("settlement.view_netposition")

    @admin.action(description="Export the statements behind selected instructions (CSV)", permissions=["export"])
    def export_statements(self, request: HttpRequest, queryset: QuerySet[Instruction]) -> HttpResponse:
        pairs = Q(pk__in=[])
        for cycle_id, institution_id in queryset.values_list("cycle_id", "institution_id"):
            pairs |= Q(cycle_id=cycle_id, institution_id=institution_id)
        return _csv_response(NetPosition.objects.filter(pairs), "statements.csv")


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


class AllocationInline(ReadOnlyInline):
    model = RedemptionAllocation
    fields = readonly_fields = ("lot", "issuer", "expires_on", "amount")
    ordering = ("id",)
    list_select_related = ("lot", "issuer")

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
        *list_display,
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
