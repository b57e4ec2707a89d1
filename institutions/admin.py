"""Django admin for operators: institutions and their credentials, the hub's keys, the inbox.

Every write goes through :mod:`institutions.services` (or :func:`institutions.inbox.inbox_replay`);
nothing here saves a model by hand. Secrets the hub issues (HMAC secrets, API tokens) are rendered
once, in the response to the request that made them, and never put in messages, the session or the
admin log: the hub itself keeps only the sealed secret and the token's hash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html

from clearinghouse.admin import ReadOnlyAdmin, ReadOnlyInline
from clearinghouse.errors import HubError
from institutions import crypto, services
from institutions.envelope import EVENT_TYPES
from institutions.handlers import handled_types
from institutions.inbox import inbox_replay
from institutions.models import Credential, DeliveryAttempt, HubKey, InboxEvent, Institution, OutboxMessage
from institutions.outbox import institution_endpoint_enable, outbox_replay, outbox_retry_now

ISSUED_TEMPLATE = "admin/institutions/institution/credentials_issued.html"


def _render_issued(
    request: HttpRequest, admin_obj: admin.ModelAdmin, issued: Sequence[services.IssuedCredentials], *, title: str
) -> HttpResponse:
    """The one page that ever shows issued secrets; marked uncacheable so no proxy or back button keeps it."""
    rows = [
        {
            "code": item.code,
            "hmac_secret": item.hmac_secret,
            "api_token": item.api_token,
            "ed25519_public_key": item.ed25519_public_key,
        }
        for item in issued
    ]
    context = {
        **admin_obj.admin_site.each_context(request),
        "title": title,
        "opts": admin_obj.model._meta,
        "issued": rows,
        "hub_public_keys": [key.public_key for key in services.hub_public_keys()],
    }
    response = TemplateResponse(request, ISSUED_TEMPLATE, context)
    add_never_cache_headers(response)
    return response


# --- Institutions -----------------------------------------------------------------------------------


class InstitutionRegisterForm(forms.Form):
    """What ``institution_register`` takes. Validation of the code, key and endpoint is the service's."""

    code = forms.CharField(max_length=40, help_text="[a-z0-9-]{2,40}; it appears in the intake URL and never changes.")
    name = forms.CharField(max_length=200)
    hmac = forms.BooleanField(required=False, initial=True, label="Issue an HMAC secret (whsec_, v1 signatures)")
    ed25519_public_key = forms.CharField(
        required=False,
        max_length=64,
        label="Ed25519 public key",
        help_text="The institution's whpk_... key for v1a signatures. Give it, the HMAC secret, or both.",
    )
    endpoint_url = forms.CharField(
        required=False, max_length=200, label="Endpoint", help_text="Where the hub POSTs signed webhooks (optional)."
    )
    is_provider = forms.BooleanField(required=False, label="Provider", help_text="Offers rewards and fulfils them.")

    def clean_code(self) -> str:
        return self.cleaned_data["code"].strip()

    def clean_ed25519_public_key(self) -> str | None:
        return self.cleaned_data["ed25519_public_key"].strip() or None

    def clean_endpoint_url(self) -> str:
        return self.cleaned_data["endpoint_url"].strip()


class InstitutionChangeForm(forms.ModelForm):
    endpoint_url = forms.URLField(
        required=False,
        max_length=200,
        assume_scheme="https",
        label="Endpoint",
        help_text="Where the hub POSTs signed webhooks.",
    )

    class Meta:
        model = Institution
        fields = ["name", "endpoint_url", "is_provider", "rate_limit_per_second"]


class CredentialInline(ReadOnlyInline):
    model = Credential
    fields = readonly_fields = ("kind", "status", "hint", "public_key_display", "created_at", "retired_at")
    show_change_link = True
    ordering = ["status", "-created_at"]

    @admin.display(description="public key")
    def public_key_display(self, credential: Credential) -> str:
        return _public_key_display(credential)


@admin.register(Institution)
class InstitutionAdmin(admin.ModelAdmin):
    list_display = [
        "code",
        "name",
        "status",
        "is_provider",
        "endpoint_url",
        "created_at",
        "active_credentials",
    ]
    list_display_links = ["code", "name"]
    list_filter = ["status", "is_provider"]
    search_fields = ["code", "name", "endpoint_url"]
    ordering = ["code"]
    form = InstitutionChangeForm
    readonly_fields = ["code", "status", "endpoint_disabled_at", "endpoint_paused_until", "created_at"]
    fields = [
        "code",
        "name",
        "status",
        "is_provider",
        "endpoint_url",
        "endpoint_disabled_at",
        "endpoint_paused_until",
        "rate_limit_per_second",
        "created_at",
    ]
    inlines = [CredentialInline]
    actions = ["suspend", "reactivate", "issue_hmac_secret", "issue_api_token", "enable_endpoint"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Institution]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                active_credential_count=Count("credentials", filter=Q(credentials__status=Credential.Status.ACTIVE))
            )
        )

    @admin.display(description="active credentials", ordering="active_credential_count")
    def active_credentials(self, institution: Institution) -> int:
        return getattr(institution, "active_credential_count", 0)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Events and (later) ledger rows refer to institutions; an operator suspends instead.
        return False

    # Registration: a form of its own, the service does the work, the secrets are shown once.

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = InstitutionRegisterForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                issued = services.institution_register(
                    code=data["code"],
                    name=data["name"],
                    hmac=data["hmac"],
                    ed25519_public_key=data["ed25519_public_key"],
                    endpoint_url=data["endpoint_url"],
                    is_provider=data["is_provider"],
                )
            except HubError as exc:
                form.add_error(None, exc.message)
            else:
                institution = Institution.objects.get(code=issued.code)
                self.log_addition(request, institution, [{"added": {}}])
                return _render_issued(request, self, [issued], title=f"Registered {institution.code}")
        fieldsets: list[tuple[str | None, dict[str, Any]]] = [
            (None, {"fields": ["code", "name", "is_provider", "endpoint_url"]}),
            (
                "Signing credentials",
                {
                    "fields": ["hmac", "ed25519_public_key"],
                    "description": "The HMAC secret and an API token are generated and shown once after saving.",
                },
            ),
        ]
        # A plain Form renders like a ModelForm here; the stubs only know the latter.
        admin_form = helpers.AdminForm(form, fieldsets, {}, [], model_admin=self)  # type: ignore[arg-type]
        context = {
            **self.admin_site.each_context(request),
            "title": "Register institution",
            "subtitle": None,
            "adminform": admin_form,
            "object_id": None,
            "original": None,
            "is_popup": False,
            "to_field": None,
            "media": self.media + admin_form.media,
            "inline_admin_formsets": [],
            "errors": helpers.AdminErrorList(form, []),  # type: ignore[arg-type]  # as above
            "preserved_filters": self.get_preserved_filters(request),
            "show_save_and_add_another": False,
            "show_save_and_continue": False,
            **(extra_context or {}),
        }
        return self.render_change_form(request, context, add=True, form_url=form_url)

    def save_model(self, request: HttpRequest, obj: Institution, form: forms.Form, change: bool) -> None:
        # Only the change form reaches here (add_view is our own); the form has set obj's fields.
        services.institution_update(
            institution=obj,
            name=obj.name,
            endpoint_url=obj.endpoint_url,
            is_provider=obj.is_provider,
            rate_limit_per_second=obj.rate_limit_per_second,
        )

    # Actions.

    def _set_status(self, request: HttpRequest, queryset: QuerySet[Institution], status: str, verb: str) -> None:
        changed = 0
        for institution in queryset:
            if institution.status != status:
                services.institution_set_status(institution=institution, status=status)
                changed += 1
        skipped = len(queryset) - changed
        note = f"; {skipped} already {status}" if skipped else ""
        self.message_user(request, f"{verb} {changed} institution(s){note}.", messages.SUCCESS)

    @admin.action(description="Suspend selected institutions", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Institution]) -> None:
        self._set_status(request, queryset, Institution.Status.SUSPENDED, "Suspended")

    @admin.action(description="Reactivate selected institutions", permissions=["change"])
    def reactivate(self, request: HttpRequest, queryset: QuerySet[Institution]) -> None:
        self._set_status(request, queryset, Institution.Status.ACTIVE, "Reactivated")

    def _issue(
        self, request: HttpRequest, queryset: QuerySet[Institution], *, hmac: bool = False, api_token: bool = False
    ) -> HttpResponse | None:
        issued = []
        for institution in queryset:
            try:
                issued.append(services.credential_add(institution=institution, hmac=hmac, api_token=api_token))
            except HubError as exc:
                self.message_user(request, f"{institution.code}: {exc.message}", messages.ERROR)
        if not issued:
            return None
        what = "HMAC secrets" if hmac else "API tokens"
        return _render_issued(request, self, issued, title=f"New {what} issued")

    @admin.action(description="Rotate: issue a new HMAC secret (the old one stays active)", permissions=["change"])
    def issue_hmac_secret(self, request: HttpRequest, queryset: QuerySet[Institution]) -> HttpResponse | None:
        return self._issue(request, queryset, hmac=True)

    @admin.action(description="Issue a new API token (the old one stays active)", permissions=["change"])
    def issue_api_token(self, request: HttpRequest, queryset: QuerySet[Institution]) -> HttpResponse | None:
        return self._issue(request, queryset, api_token=True)

    @admin.action(description="Re-enable webhook endpoint (after 410 Gone or a pause)", permissions=["change"])
    def enable_endpoint(self, request: HttpRequest, queryset: QuerySet[Institution]) -> None:
        enabled = 0
        for institution in queryset:
            if institution.endpoint_disabled_at or institution.endpoint_paused_until:
                institution_endpoint_enable(institution=institution)
                enabled += 1
        self.message_user(request, f"Re-enabled {enabled} endpoint(s).", messages.SUCCESS)


# --- Credentials ------------------------------------------------------------------------------------


def _public_key_display(credential: Credential) -> str:
    if credential.kind != Credential.Kind.ED25519 or not credential.public_key:
        return "-"
    return crypto.PUBLIC_KEY_PREFIX + credential.public_key


@admin.register(Credential)
class CredentialAdmin(ReadOnlyAdmin):
    list_display = ["institution", "kind", "status", "hint", "created_at", "retired_at"]
    list_filter = ["kind", "status"]
    search_fields = ["institution__code", "hint"]
    list_select_related = ["institution"]
    # The sealed HMAC secret and the token hash are never shown; the hint tells credentials apart.
    fields = readonly_fields = (
        "institution",
        "kind",
        "status",
        "hint",
        "public_key_display",
        "created_at",
        "retired_at",
    )
    # Never added here: credentials are issued from the institution's actions, through the services.
    actions = ["retire"]

    def has_retire_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("institutions.change_credential")

    @admin.display(description="public key")
    def public_key_display(self, credential: Credential) -> str:
        return _public_key_display(credential)

    @admin.action(description="Retire selected credentials", permissions=["retire"])
    def retire(self, request: HttpRequest, queryset: QuerySet[Credential]) -> None:
        retired = 0
        for credential in queryset.select_related("institution").order_by("created_at"):
            if credential.status == Credential.Status.RETIRED:
                continue
            try:
                services.credential_retire(credential=credential)
            except HubError as exc:
                self.message_user(
                    request,
                    f"{credential.institution.code} {credential.kind} {credential.hint}: {exc.message}",
                    messages.ERROR,
                )
            else:
                retired += 1
        if retired:
            self.message_user(request, f"Retired {retired} credential(s).", messages.SUCCESS)


# --- Hub keys ---------------------------------------------------------------------------------------


@admin.register(HubKey)
class HubKeyAdmin(ReadOnlyAdmin):
    list_display = ["key_id", "public_key", "status", "created_at"]
    list_filter = ["status"]
    fields = readonly_fields = ("key_id", "public_key", "status", "created_at")  # never the sealed private half


# --- Inbox ------------------------------------------------------------------------------------------


class EventTypeFilter(admin.SimpleListFilter):
    """The contract's event types: a fixed list, so no DISTINCT over a large table."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(t, t) for t in sorted(EVENT_TYPES)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[InboxEvent]) -> QuerySet[InboxEvent]:
        return queryset.filter(type=self.value()) if self.value() else queryset


class AwaitingHandlerFilter(admin.SimpleListFilter):
    """Received events of a type no app handles yet: stored, never claimed, waiting for code."""

    title = "awaiting handler"
    parameter_name = "awaiting_handler"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[InboxEvent]) -> QuerySet[InboxEvent]:
        awaiting = Q(status=InboxEvent.Status.RECEIVED) & ~Q(type__in=handled_types())
        if self.value() == "yes":
            return queryset.filter(awaiting)
        if self.value() == "no":
            return queryset.exclude(awaiting)
        return queryset


@admin.register(InboxEvent)
class InboxEventAdmin(ReadOnlyAdmin):
    list_display = [
        "event_id",
        "institution",
        "type",
        "status",
        "awaiting_handler",
        "attempts",
        "received_at",
        "processed_at",
        "short_error",
    ]
    list_filter = ["status", EventTypeFilter, AwaitingHandlerFilter, "institution"]
    # Exact matches: an operator pastes an id from a sender's log; substring scans of the inbox are slow.
    search_fields = ["=event_id", "=webhook_id"]
    search_help_text = "Exact event id or webhook-id."
    list_select_related = ["institution"]
    show_full_result_count = False
    ordering = ["-id"]
    # The sealed subject copy is never shown.
    fields = readonly_fields = (
        "institution",
        "event_id",
        "type",
        "source",
        "subject_ref",
        "time",
        "data_display",
        "content_hash",
        "webhook_id",
        "received_at",
        "status",
        "awaiting_handler",
        "attempts",
        "available_at",
        "last_error",
        "outcome_display",
        "processed_at",
    )
    actions = ["replay"]

    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("institutions.change_inboxevent")

    @admin.display(description="awaiting handler", boolean=True)
    def awaiting_handler(self, event: InboxEvent) -> bool:
        return event.status == InboxEvent.Status.RECEIVED and event.type not in handled_types()

    @admin.display(description="last error")
    def short_error(self, event: InboxEvent) -> str:
        error = event.last_error
        return error if len(error) <= 80 else error[:79] + "…"

    @admin.display(description="data")
    def data_display(self, event: InboxEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(event.data, indent=2, ensure_ascii=False))

    @admin.display(description="outcome")
    def outcome_display(self, event: InboxEvent) -> str:
        if event.outcome is None:
            return "-"
        return format_html("<pre>{}</pre>", json.dumps(event.outcome, indent=2, ensure_ascii=False))

    @admin.action(description="Replay selected quarantined or dead events", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[InboxEvent]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        replayed = inbox_replay(ids=ids)
        skipped = len(ids) - replayed
        note = f"; skipped {skipped} that were not quarantined or dead" if skipped else ""
        level = messages.SUCCESS if replayed else messages.WARNING
        self.message_user(request, f"Replayed {replayed} event(s){note}.", level)


# --- Outbox -----------------------------------------------------------------------------------------


class DeliveryAttemptInline(ReadOnlyInline):
    model = DeliveryAttempt
    fields = readonly_fields = ("attempted_at", "status_code", "error", "duration_ms")
    ordering = ["id"]


class OutboxTypeFilter(admin.SimpleListFilter):
    """The webhook types of the contract (section 3): a fixed list, no DISTINCT over the table."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        types = ["carbon.redemption.requested", "carbon.settlement.instruction"]
        return [(t, t) for t in types]

    def queryset(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> QuerySet[OutboxMessage]:
        return queryset.filter(type=self.value()) if self.value() else queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    list_display = [
        "message_id",
        "institution",
        "type",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status_code",
        "short_error",
        "created_at",
        "delivered_at",
    ]
    list_filter = ["status", OutboxTypeFilter, "institution"]
    search_fields = ["=message_id"]
    search_help_text = "Exact webhook-id (msg_...)."
    list_select_related = ["institution"]
    show_full_result_count = False
    ordering = ["-id"]
    fields = readonly_fields = (
        "institution",
        "message_id",
        "type",
        "body_display",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status_code",
        "last_error",
        "created_at",
        "delivered_at",
    )
    inlines = [DeliveryAttemptInline]
    actions = ["retry_now", "replay"]

    def has_resend_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("institutions.change_outboxmessage")

    @admin.display(description="last error")
    def short_error(self, message: OutboxMessage) -> str:
        error = message.last_error
        return error if len(error) <= 80 else error[:79] + "…"

    @admin.display(description="body")
    def body_display(self, message: OutboxMessage) -> str:
        try:
            text = json.dumps(json.loads(message.body), indent=2, ensure_ascii=False)
        except ValueError:
            text = message.body
        if message.subject_sealed:
            # The person's subject id is not shown: it stays sealed until the message is sent.
            text += "\n\n(data.subject is sealed here; it is unsealed into the event when sent)"
        return format_html("<pre>{}</pre>", text)

    @admin.action(description="Retry now (pending or failed messages become due)", permissions=["resend"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        count = outbox_retry_now(ids=ids)
        skipped = len(ids) - count
        note = f"; skipped {skipped} delivered or dead" if skipped else ""
        level = messages.SUCCESS if count else messages.WARNING
        self.message_user(request, f"{count} message(s) due now{note}.", level)

    @admin.action(description="Replay dead messages (fresh retry schedule, same webhook-id)", permissions=["resend"])
    def replay(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        count = outbox_replay(ids=ids)
        skipped = len(ids) - count
        note = f"; skipped {skipped} that were not dead" if skipped else ""
        level = messages.SUCCESS if count else messages.WARNING
        self.message_user(request, f"Replayed {count} message(s){note}.", level)
