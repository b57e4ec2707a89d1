"""The ledger's SQL: the account key, accounts by identity, the posting engine, a person's lots.

``ledger_account_key`` writes an account's natural identity as ``AccountKey`` does, and
``ledger_accounts_ensure`` finds or creates accounts by identity with it; ``ledger_post`` is the one
posting engine on PostgreSQL, which ``ledger.services.transfers_post`` and other apps' SQL call;
``ledger_person_lots`` reads a person's lots and debts for SQL of other apps. Each function's text is
in ``ledger/sql``, one file per version (docs/decisions.md, "SQL functions live in versioned files").
"""

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL, sql_file


class Migration(migrations.Migration):
    dependencies = [("ledger", "0003_postings_keys_guarded_by_parents")]

    operations = [
        PostgresOnlySQL(
            [
                sql_file("ledger", "ledger_account_key.v1.sql"),
                sql_file("ledger", "ledger_accounts_ensure.v1.sql"),
                sql_file("ledger", "ledger_post.v1.sql"),
                sql_file("ledger", "ledger_person_lots.v1.sql"),
            ],
            [
                "DROP FUNCTION ledger_person_lots(bigint)",
                "DROP FUNCTION ledger_post(timestamptz, text[], text[], jsonb, integer[], bigint[], bigint[])",
                "DROP FUNCTION ledger_accounts_ensure(text[], bigint[], bigint[], text[], date[], bigint[], bigint[],"
                " bigint[], timestamptz)",
                "DROP FUNCTION ledger_account_key(text, bigint, bigint, text, date, bigint, bigint, bigint)",
            ],
        ),
    ]
