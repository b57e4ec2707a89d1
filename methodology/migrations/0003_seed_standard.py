"""Seed the registry from methodology/data/*.csv (sourced starting values), once."""

import csv
from datetime import date
from decimal import Decimal
from pathlib import Path

from django.db import migrations

DATA = Path(__file__).resolve().parent.parent / "data"

# Spellings institutions commonly send, converted to the canonical units of factors.csv.
UNIT_CONVERSIONS = [
    ("m", "km", "0.001"),
    ("meter", "km", "0.001"),
    ("meters", "km", "0.001"),
    ("kilometer", "km", "1"),
    ("kilometers", "km", "1"),
    ("Wh", "kWh", "0.001"),
    ("MWh", "kWh", "1000"),
    ("steps", "step", "1"),
    ("ksteps", "step", "1000"),
    ("1000steps", "step", "1000"),
    ("trips", "trip", "1"),
    ("check-in", "checkin", "1"),
    ("checkins", "checkin", "1"),
    ("orders", "order", "1"),
    ("stays", "stay", "1"),
    ("bills", "bill", "1"),
    ("invoices", "invoice", "1"),
    ("payments", "payment", "1"),
    ("boxes", "box", "1"),
    ("items", "item", "1"),
]

EVIDENCE_TIERS = [
    ("automatic", "Recorded automatically by the institution's system", "1"),
    ("upload", "Backed by an uploaded receipt or photo", "1"),
    # Self-declared acts count half: nothing corroborates them (docs/decisions.md).
    ("self_declared", "Declared by the person without evidence", "0.5"),
]


def seed(apps, schema_editor):
    Scenario = apps.get_model("methodology", "Scenario")
    FactorVersion = apps.get_model("methodology", "FactorVersion")
    Cap = apps.get_model("methodology", "Cap")
    UnitConversion = apps.get_model("methodology", "UnitConversion")
    EvidenceTier = apps.get_model("methodology", "EvidenceTier")

    with open(DATA / "factors.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            scenario, _ = Scenario.objects.get_or_create(
                code=row["scenario"], defaults={"name": row["name"], "unit": row["unit"]}
            )
            FactorVersion.objects.get_or_create(
                scenario=scenario,
                valid_from=date.fromisoformat(row["valid_from"]),
                defaults={"grams_per_unit": Decimal(row["grams_per_unit"]), "source": row["source"]},
            )
    with open(DATA / "caps.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            Cap.objects.get_or_create(
                scenario=Scenario.objects.get(code=row["scenario"]),
                period=row["period"],
                defaults={"max_quantity": Decimal(row["max_quantity"]), "source": row["source"]},
            )
    for from_unit, to_unit, multiplier in UNIT_CONVERSIONS:
        UnitConversion.objects.get_or_create(
            from_unit=from_unit, to_unit=to_unit, defaults={"multiplier": Decimal(multiplier)}
        )
    for code, name, weight in EVIDENCE_TIERS:
        EvidenceTier.objects.get_or_create(code=code, defaults={"name": name, "weight": Decimal(weight)})


class Migration(migrations.Migration):
    dependencies = [("methodology", "0002_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
