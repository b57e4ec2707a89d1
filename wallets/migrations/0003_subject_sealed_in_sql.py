"""``wallets_subject_sealed``: a person's sealed subject id at an institution, for SQL of other apps,
which reads memberships through it (settlement_redemption_hold). Its text is in ``wallets/sql``, one
file per version (docs/decisions.md, "SQL functions live in versioned files")."""

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL, sql_file


class Migration(migrations.Migration):
    dependencies = [("wallets", "0002_person_erasure")]

    operations = [
        PostgresOnlySQL(
            sql_file("wallets", "wallets_subject_sealed.v1.sql"),
            "DROP FUNCTION wallets_subject_sealed(bigint, bigint)",
        ),
    ]
