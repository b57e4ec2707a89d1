"""The edge's SQL: ``institutions_outbox_enqueue`` (a webhook stored with the CloudEvent the edge builds)
and two readers, ``institutions_provider`` and ``institutions_codes``, for SQL of other apps, which
reads institutions through these and writes webhooks through the first (settlement_redemption_hold).
Each function's text is in ``institutions/sql``, one file per version (docs/decisions.md, "SQL
functions live in versioned files")."""

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL, sql_file


class Migration(migrations.Migration):
    dependencies = [("institutions", "0007_outbox_subject_sealed")]

    operations = [
        PostgresOnlySQL(
            [
                sql_file("institutions", "institutions_outbox_enqueue.v1.sql"),
                sql_file("institutions", "institutions_provider.v1.sql"),
                sql_file("institutions", "institutions_codes.v1.sql"),
            ],
            [
                "DROP FUNCTION institutions_codes(bigint[])",
                "DROP FUNCTION institutions_provider(bigint)",
                "DROP FUNCTION institutions_outbox_enqueue(bigint, text, json, text, text, timestamptz, text)",
            ],
        ),
    ]
