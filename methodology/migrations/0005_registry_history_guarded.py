"""The activity table's foreign keys move from per-row checks to guards on the parents.

At 1,000 activities a batch, the deferred check of each foreign key of each inserted row (a probe
that locks the parent row) was about a quarter of normalization's time. The checks on inbox row,
institution, scenario and factor version are dropped; on PostgreSQL, triggers keep what they
guarded from the other side, where changes are rare:

* a factor version can never be deleted, nor its scenario, grams or valid-from changed: "history is
  never rewritten" becomes a rule of the database (a scenario with versions keeps their enforced key,
  so it cannot be deleted either);
* an inbox row or an institution that an activity names cannot be deleted (the same error,
  ``foreign_key_violation``, that the dropped keys raised).
"""

import django.db.models.deletion
from django.db import migrations, models

from clearinghouse.db import PostgresOnlySQL

FORWARD = """
CREATE FUNCTION methodology_factor_history_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'factor version % is history: it cannot be deleted', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.scenario_id <> OLD.scenario_id OR NEW.grams_per_unit <> OLD.grams_per_unit
       OR NEW.valid_from <> OLD.valid_from THEN
        RAISE EXCEPTION 'factor version % is history: add a new version instead of changing it', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER methodology_factor_history_fixed
    BEFORE UPDATE OR DELETE ON methodology_factorversion
    FOR EACH ROW EXECUTE FUNCTION methodology_factor_history_fixed();

-- TG_ARGV[0]: the activity column that names the row being deleted.
CREATE FUNCTION methodology_activity_parent_kept() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    named boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM methodology_normalizedactivity WHERE %I = $1)', TG_ARGV[0])
        INTO named USING OLD.id;
    IF named THEN
        RAISE EXCEPTION '% % is named by a normalized activity', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END;
$$;
CREATE TRIGGER methodology_activity_inbox_kept
    BEFORE DELETE ON institutions_inboxevent
    FOR EACH ROW EXECUTE FUNCTION methodology_activity_parent_kept('inbox_event_id');
CREATE TRIGGER methodology_activity_institution_kept
    BEFORE DELETE ON institutions_institution
    FOR EACH ROW EXECUTE FUNCTION methodology_activity_parent_kept('institution_id');
"""

BACKWARD = """
DROP TRIGGER methodology_activity_institution_kept ON institutions_institution;
DROP TRIGGER methodology_activity_inbox_kept ON institutions_inboxevent;
DROP FUNCTION methodology_activity_parent_kept();
DROP TRIGGER methodology_factor_history_fixed ON methodology_factorversion;
DROP FUNCTION methodology_factor_history_fixed();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("institutions", "0004_outbox"),
        ("methodology", "0004_alter_normalizedactivity_reason_and_more"),
    ]

    operations = [
        migrations.AlterField(
            model_name="normalizedactivity",
            name="factor_version",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="methodology.factorversion",
            ),
        ),
        migrations.AlterField(
            model_name="normalizedactivity",
            name="inbox_event",
            field=models.OneToOneField(
                db_constraint=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="activity",
                to="institutions.inboxevent",
            ),
        ),
        migrations.AlterField(
            model_name="normalizedactivity",
            name="institution",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="institutions.institution",
            ),
        ),
        migrations.AlterField(
            model_name="normalizedactivity",
            name="scenario",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="methodology.scenario",
            ),
        ),
        PostgresOnlySQL(FORWARD, BACKWARD),
    ]
