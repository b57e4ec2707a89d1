"""Institutions, their credentials, the hub's signing keys and the durable inbox of events."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Institution(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    code = models.SlugField(max_length=40, unique=True, help_text="[a-z0-9-]{2,40}, as in the URL.")
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    is_provider = models.BooleanField(default=False, help_text="Offers rewards and fulfils redemptions.")
    endpoint_url = models.URLField(blank=True, help_text="Where the hub POSTs signed webhooks.")
    rate_limit_per_second = models.PositiveIntegerField(
        null=True, blank=True, help_text="Intake requests per second; empty uses the hub default."
    )
    points_validity_months = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Months this issuer's points stay valid; empty uses the hub default."
    )
    # Outbound delivery (institutions.outbox): a 410 from the endpoint disables it until an operator
    # re-enables it; 429/502/504 and Retry-After pause it until the given moment.
    endpoint_disabled_at = models.DateTimeField(
        null=True, blank=True, help_text="Set when the endpoint answered 410 Gone; webhooks are held meanwhile."
    )
    endpoint_paused_until = models.DateTimeField(
        null=True, blank=True, help_text="The endpoint asked the hub to slow down (429, 502, 504, Retry-After)."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(condition=Q(code__regex=r"^[a-z0-9-]{2,40}$"), name="institution_code_format"),
        ]

    def __str__(self) -> str:
        return self.code

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


class Credential(models.Model):
    """One way an institution proves who it is. Several may be active at once (rotation)."""

    class Kind(models.TextChoices):
        HMAC = "hmac", "HMAC secret (whsec_)"
        ED25519 = "ed25519", "Ed25519 public key (whpk_)"
        API_TOKEN = "api_token", "API token"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        RETIRED = "retired", "Retired"

    institution = models.ForeignKey(Institution, on_delete=models.CASCADE, related_name="credentials")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    # HMAC: the secret bytes, Fernet-encrypted (the hub must recompute signatures, so not hashed).
    secret_sealed = models.TextField(blank=True)
    # Ed25519: the raw 32-byte public key, base64.
    public_key = models.CharField(max_length=64, blank=True)
    # API token: SHA-256 of the token; the token itself is shown once.
    token_hash = models.CharField(max_length=64, blank=True)
    # What an operator sees to tell credentials apart, never enough to use one.
    hint = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["institution", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["token_hash"], condition=~Q(token_hash=""), name="credential_token_hash_unique"
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind="hmac", secret_sealed__gt="")
                    | Q(kind="ed25519", public_key__gt="")
                    | Q(kind="api_token", token_hash__gt="")
                ),
                name="credential_material_matches_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.institution.code} {self.kind} {self.hint}"


class HubKey(models.Model):
    """The hub's own Ed25519 signing key: created on first use, private half encrypted at rest."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active (signs)"
        PUBLISHED = "published", "Published (verifies only)"
        RETIRED = "retired", "Retired"

    key_id = models.CharField(max_length=32, unique=True)
    public_key = models.CharField(max_length=64)
    private_key_sealed = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["status"], condition=Q(status="active"), name="one_active_hub_key"),
        ]

    def __str__(self) -> str:
        return self.key_id


class InboxEvent(models.Model):
    """An accepted CloudEvent, stored durably before the hub answers 202.

    Unique per (institution, event id). ``content_hash`` (SHA-256 over the canonical event) tells a
    harmless resend from a conflicting reuse of the id. The institution's subject id is never kept
    in clear: ``subject_ref`` is its keyed hash; a link event also keeps ``subject_sealed``, an
    encrypted copy, until it is handled, because linking must be able to name the subject back to its
    institution (the membership keeps its own copy from then on).
    Raw bodies are not retained: they carry subject ids (DESIGN.md, privacy), so only hashes stay.
    """

    class Status(models.TextChoices):
        RECEIVED = "received", "Received"
        PROCESSED = "processed", "Processed"
        QUARANTINED = "quarantined", "Quarantined"
        DEAD = "dead", "Dead"

    # Every index here is paid on each insert and each status change of a busy table: the FK and
    # subject lookups are served by the unique (institution, event_id) index and by the activities.
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="inbox_events", db_index=False)
    event_id = models.CharField(max_length=128)
    type = models.CharField(max_length=64)
    source = models.CharField(max_length=512)
    subject_ref = models.CharField(max_length=64, blank=True)
    subject_sealed = models.TextField(blank=True)
    time = models.DateTimeField(null=True, blank=True)
    data = models.JSONField(default=dict)
    content_hash = models.CharField(max_length=64)
    webhook_id = models.CharField(max_length=256)
    received_at = models.DateTimeField(default=timezone.now)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    attempts = models.PositiveIntegerField(default=0)
    # A claimed row is leased until this moment; a failed one waits until it for its next try.
    available_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    outcome = models.JSONField(null=True, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["institution", "event_id"], name="inbox_unique_event_per_institution"),
        ]
        indexes = [
            models.Index(fields=["id"], condition=Q(status="received"), name="inbox_claimable"),
            # What operators look for; processed rows, the vast majority, stay out of it.
            models.Index(
                fields=["status", "type"], condition=Q(status__in=["quarantined", "dead"]), name="inbox_needs_attention"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.institution_id}:{self.event_id}"


class OutboxMessage(models.Model):
    """A webhook the hub owes an institution, written in the transaction of the change that causes it.

    ``body`` is the CloudEvent as sent, built once at enqueue time, except for a person's subject id at
    the institution: that stays sealed in ``subject_sealed`` and is unsealed into ``data.subject`` (null
    in ``body``) only when the message is sent (``institutions.outbox.outbox_body``), so no subject id
    rests in the outbox in the clear. ``message_id`` is both the CloudEvent id and the ``webhook-id``
    of every attempt, so the receiver can drop duplicates.
    ``pending`` rows were never tried, ``failed`` ones wait for their next try; both are claimed once
    ``next_attempt_at`` has passed (a claimed row is leased by pushing that moment forward).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed (will retry)"
        DEAD = "dead", "Dead"

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="outbox_messages")
    message_id = models.CharField(max_length=64, unique=True)
    type = models.CharField(max_length=64)
    body = models.TextField()
    subject_sealed = models.TextField(
        blank=True, default="", help_text="The person's subject id at the institution, sealed; sent as data.subject."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status__in=["pending", "failed"]), name="outbox_due"),
            models.Index(fields=["status", "type"], condition=Q(status="dead"), name="outbox_dead"),
        ]

    def __str__(self) -> str:
        return self.message_id


class DeliveryAttempt(models.Model):
    """One try at delivering an outbox message: every attempt is kept for the admin."""

    message = models.ForeignKey(OutboxMessage, on_delete=models.CASCADE, related_name="delivery_attempts")
    attempted_at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["message", "id"]

    def __str__(self) -> str:
        return f"{self.message_id} {self.status_code or self.error[:40]}"
