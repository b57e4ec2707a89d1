"""Seed the starting settlement price, and make obligations append-only on PostgreSQL.

The starting price, 10 fen per 1,000 points (0.10 CNY per kg CO2e), is a placeholder: the scheme sets
the real one by adding a new SettlementPrice row with a later ``valid_from``; rows are never edited.
"""

from datetime import UTC, datetime

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL

STARTING_PRICE_FEN_PER_THOUSAND_POINTS = 10
STARTING_VALID_FROM = datetime(2024, 1, 1, tzinfo=UTC)

FORWARD_SQL = """
CREATE FUNCTION settlement_obligation_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'settlement obligations are never deleted (id %)', OLD.id;
    END IF;
    IF NEW.key IS DISTINCT FROM OLD.key OR NEW.debtor_id IS DISTINCT FROM OLD.debtor_id
       OR NEW.creditor_id IS DISTINCT FROM OLD.creditor_id OR NEW.amount_minor IS DISTINCT FROM OLD.amount_minor
       OR NEW.currency IS DISTINCT FROM OLD.currency OR NEW.points_mg IS DISTINCT FROM OLD.points_mg
       OR NEW.source IS DISTINCT FROM OLD.source OR NEW.price_id IS DISTINCT FROM OLD.price_id
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR (OLD.cycle_id IS NOT NULL AND NEW.cycle_id IS DISTINCT FROM OLD.cycle_id) THEN
        RAISE EXCEPTION 'settlement obligation % is immutable; record a correction instead', OLD.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER settlement_obligation_append_only BEFORE UPDATE OR DELETE ON settlement_obligation
    FOR EACH ROW EXECUTE FUNCTION settlement_obligation_append_only();
"""

BACKWARD_SQL = """
DROP TRIGGER settlement_obligation_append_only ON settlement_obligation;
DROP FUNCTION settlement_obligation_append_only();
"""


def seed_price(apps, schema_editor):
    SettlementPrice = apps.get_model("settlement", "SettlementPrice")
    SettlementPrice.objects.get_or_create(
        currency="CNY",
        valid_from=STARTING_VALID_FROM,
        defaults={
            "fen_per_thousand_points": STARTING_PRICE_FEN_PER_THOUSAND_POINTS,
            "note": "Placeholder starting price; the scheme sets the real one as a new version.",
        },
    )


class Migration(migrations.Migration):
    dependencies = [("settlement", "0001_initial")]

    operations = [
        migrations.RunPython(seed_price, migrations.RunPython.noop),
        PostgresOnlySQL(FORWARD_SQL, BACKWARD_SQL),
    ]
