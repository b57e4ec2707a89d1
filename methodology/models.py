"""The unified standard: how every institution's low-carbon act is measured in grams CO2e.

* :class:`Scenario` — a hub-defined act with a canonical unit (``transit.metro`` in km).
* :class:`FactorVersion` — grams CO2e per canonical unit, valid from a date, with its source. The
  version in force at the event's ``time`` applies; versions are never edited, a change is a new one.
* :class:`UnitConversion` — global conversions between units (m to km, Wh to kWh).
* :class:`ActionMapping` — an institution's native action code (and unit) to a scenario.
* :class:`Cap` — most quantity credited per owner, scenario and period, across all institutions.
* :class:`EvidenceTier` — how much an act counts given its evidence.
* :class:`NormalizedActivity` — one recorded event, measured: what was credited and why.
* :class:`CapUsage` and :class:`ActFingerprint` — the per-owner state that caps and cross-issuer
  de-duplication consult, protected by a per-owner lock while a batch is normalized.

An *owner* is the linked person (``p:<person id>``) or, before linking, the institution's subject
(``s:<institution id>:<subject ref>``).
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

GRAMS_DIGITS = {"max_digits": 36, "decimal_places": 18}
QUANTITY_DIGITS = {"max_digits": 30, "decimal_places": 12}


class Scenario(models.Model):
    code = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    unit = models.CharField(max_length=32, help_text="Canonical unit every quantity is converted to.")
    description = models.TextField(blank=True)
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.code


class FactorVersion(models.Model):
    scenario = models.ForeignKey(Scenario, on_delete=models.PROTECT, related_name="factor_versions")
    grams_per_unit = models.DecimalField(max_digits=20, decimal_places=6)
    valid_from = models.DateField()
    source = models.TextField(help_text="Document, publisher, year.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["scenario", "-valid_from"]
        constraints = [
            models.UniqueConstraint(fields=["scenario", "valid_from"], name="factor_one_version_per_day"),
            models.CheckConstraint(condition=Q(grams_per_unit__gt=0), name="factor_positive"),
        ]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return f"{self.scenario.code}@{self.valid_from.isoformat()}"


class UnitConversion(models.Model):
    from_unit = models.CharField(max_length=32)
    to_unit = models.CharField(max_length=32)
    multiplier = models.DecimalField(max_digits=24, decimal_places=12)

    class Meta:
        ordering = ["to_unit", "from_unit"]
        constraints = [
            models.UniqueConstraint(fields=["from_unit", "to_unit"], name="unit_conversion_unique"),
            models.CheckConstraint(condition=Q(multiplier__gt=0), name="unit_conversion_positive"),
        ]

    def __str__(self) -> str:
        return f"1 {self.from_unit} = {self.multiplier.normalize()} {self.to_unit}"


class ActionMapping(models.Model):
    """An institution's own action code, in its own unit, mapped to a scenario.

    ``multiplier`` converts one ``unit`` into the scenario's canonical unit; empty ``unit`` means the
    event's unit is converted through :class:`UnitConversion` instead.
    """

    institution = models.ForeignKey("institutions.Institution", on_delete=models.CASCADE, related_name="mappings")
    action_code = models.CharField(max_length=64)
    scenario = models.ForeignKey(Scenario, on_delete=models.PROTECT, related_name="mappings")
    unit = models.CharField(max_length=32, blank=True)
    multiplier = models.DecimalField(max_digits=24, decimal_places=12, default=1)
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["institution", "action_code"]
        constraints = [
            models.UniqueConstraint(
                fields=["institution", "action_code"], condition=Q(active=True), name="mapping_one_active_per_action"
            ),
            models.CheckConstraint(condition=Q(multiplier__gt=0), name="mapping_multiplier_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.institution_id}:{self.action_code} -> {self.scenario_id}"


class Cap(models.Model):
    class Period(models.TextChoices):
        DAY = "day", "Day"
        MONTH = "month", "Month"
        YEAR = "year", "Year"

    scenario = models.ForeignKey(Scenario, on_delete=models.CASCADE, related_name="caps")
    period = models.CharField(max_length=8, choices=Period.choices)
    max_quantity = models.DecimalField(**QUANTITY_DIGITS)  # type: ignore[arg-type]
    source = models.TextField(blank=True)

    class Meta:
        ordering = ["scenario", "period"]
        constraints = [
            models.UniqueConstraint(fields=["scenario", "period"], name="cap_one_per_period"),
            models.CheckConstraint(condition=Q(max_quantity__gte=0), name="cap_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.scenario_id} {self.max_quantity.normalize()} per {self.period}"


class EvidenceTier(models.Model):
    code = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=100)
    weight = models.DecimalField(
        max_digits=6, decimal_places=4, default=1, help_text="Share of the measured grams that is credited."
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(weight__gte=0) & Q(weight__lte=1), name="evidence_weight_0_1")
        ]

    def __str__(self) -> str:
        return self.code


class NormalizedActivity(models.Model):
    class Status(models.TextChoices):
        CREDITED = "credited", "Credited"
        CAPPED = "capped", "Capped (nothing credited)"
        DUPLICATE = "duplicate", "Duplicate act (nothing credited)"
        REVERSED = "reversed", "Reversed by its institution"

    class Reason(models.TextChoices):
        CAP_REACHED = "cap_reached", "Cap reached"
        DUPLICATE_ACT = "duplicate_act", "Same act already credited"
        REVERSED = "reversed", "Taken back by the institution"

    # No foreign key of this table is checked by the database per inserted row: at 1,000 activities
    # a batch those deferred checks (a locking probe of the parent row for each row and key) were
    # about a quarter of normalization's time. What they guard is kept from the parents' side instead
    # (PostgreSQL triggers, methodology migration 0005): an inbox row or an institution that an
    # activity names cannot be deleted, nor can a factor version (history is never rewritten), and a
    # scenario with versions keeps its versions' enforced key. The rows inserted name parents the
    # handler has just read, in the same transaction.
    inbox_event = models.OneToOneField(
        "institutions.InboxEvent", on_delete=models.PROTECT, related_name="activity", db_constraint=False
    )
    # Foreign keys without their own index: every index costs each of the thousands of inserts a
    # second, and the composite indexes below already lead with institution and person.
    institution = models.ForeignKey(
        "institutions.Institution", on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    person = models.ForeignKey(
        "wallets.Person", null=True, blank=True, on_delete=models.SET_NULL, related_name="activities", db_index=False
    )
    subject_ref = models.CharField(max_length=64)
    owner_key = models.CharField(max_length=96)
    scenario = models.ForeignKey(
        Scenario, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    factor_version = models.ForeignKey(
        FactorVersion, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    quantity = models.DecimalField(**QUANTITY_DIGITS)  # type: ignore[arg-type]
    credited_quantity = models.DecimalField(**QUANTITY_DIGITS)  # type: ignore[arg-type]
    grams = models.DecimalField(**GRAMS_DIGITS)  # type: ignore[arg-type]
    credited_mg = models.BigIntegerField()
    issuer_points = models.BigIntegerField(null=True, blank=True)
    evidence = models.CharField(max_length=32, default="automatic")
    fingerprint = models.CharField(max_length=128, blank=True)
    occurred_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=Status.choices)
    reason = models.CharField(max_length=32, choices=Reason.choices, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "normalized activities"
        ordering = ["-occurred_at", "-id"]
        constraints = [models.CheckConstraint(condition=Q(credited_mg__gte=0), name="activity_credit_non_negative")]
        indexes = [
            models.Index(fields=["person", "-occurred_at", "-id"], name="activity_person_recent"),
            models.Index(fields=["institution", "subject_ref"], name="activity_holding"),
        ]

    def __str__(self) -> str:
        return f"{self.scenario_id} {self.quantity.normalize()} -> {self.credited_mg} mg"


class CapUsage(models.Model):
    owner_key = models.CharField(max_length=96)
    scenario = models.ForeignKey(Scenario, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=8, choices=Cap.Period.choices)
    period_start = models.DateField()
    used_quantity = models.DecimalField(**QUANTITY_DIGITS)  # type: ignore[arg-type]

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner_key", "scenario", "period", "period_start"], name="cap_usage_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.owner_key} {self.scenario_id} {self.period} {self.period_start}: {self.used_quantity}"


class ActFingerprint(models.Model):
    """The first credited report of a real-world act for an owner; later reports are duplicates."""

    owner_key = models.CharField(max_length=96)
    fingerprint = models.CharField(max_length=128)
    # The inbox row whose activity was credited (an id, not a key: written by COPY with the activities).
    inbox_event_id = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner_key", "fingerprint"], name="fingerprint_once_per_owner")]

    def __str__(self) -> str:
        return f"{self.owner_key} {self.fingerprint}"


class StandardRevision(models.Model):
    """One row whose token changes with every change to the registry, so workers know their cached
    copy is stale. A random token, not a counter: a rolled-back bump must not be mistaken for a later one."""

    token = models.CharField(max_length=32)
    changed_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.token} at {self.changed_at:%Y-%m-%d %H:%M:%S}"
