"""``settlement_redemption_hold`` version 3 writes other apps' books through their functions; a key's
stored answer keeps no HTTP status.

Version 3 (settlement/sql) makes the same decisions and writes as version 2, but reads the person's
lots, the provider, the issuers' codes and the person's link through those apps' SQL readers
(``ledger_person_lots``, ``institutions_provider``, ``institutions_codes``, ``wallets_subject_sealed``),
and writes the hold accounts, the ledger transfer and the webhook through their functions
(``ledger_accounts_ensure``, ``ledger_post``, ``institutions_outbox_enqueue``) instead of inserting into
their tables, rebuilding the ledger's account keys and formatting the CloudEvent itself. It takes the
webhook's type and source instead of its id and head. A lot swept since it was read now surfaces as
the ledger's own refusal (LG004) instead of CH001.

The answer given under an Idempotency-Key is the redemption the request held (``redemption`` set; its
body is rebuilt from the redemption's rows when replayed) or the refusal's problem document
(``response``, whose ``status`` member is the HTTP status, RFC 9457). ``status_code`` said nothing
more, and which HTTP status an answer is sent with is the API's to say (``settlement.apis``), not the
services' nor the database's. Going back fills it in again from those: 201 for a held redemption.
"""

from django.db import migrations, models

from clearinghouse.db import PostgresOnlySQL, sql_file

DROP_V2 = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz, text, text, text, text);
"""
DROP_V3 = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz, text, text, text);
"""


def status_codes_back(apps, schema_editor):
    RedemptionRequest = apps.get_model("settlement", "RedemptionRequest")
    for answer in RedemptionRequest.objects.filter(status_code__isnull=True).iterator():
        answer.status_code = 201 if answer.redemption_id is not None else answer.response["status"]
        answer.save(update_fields=["status_code"])


class Migration(migrations.Migration):
    dependencies = [
        ("institutions", "0008_outbox_enqueue_and_selectors_in_sql"),
        ("ledger", "0004_posting_functions"),
        ("settlement", "0007_redemption_hold_writes_answer_and_webhook"),
        ("wallets", "0003_subject_sealed_in_sql"),
    ]

    operations = [
        PostgresOnlySQL(
            [DROP_V2, sql_file("settlement", "settlement_redemption_hold.v3.sql")],
            [DROP_V3, sql_file("settlement", "settlement_redemption_hold.v2.sql")],
        ),
        migrations.AlterField(
            model_name="redemptionrequest",
            name="status_code",
            field=models.PositiveSmallIntegerField(null=True),
        ),
        migrations.RunPython(migrations.RunPython.noop, status_codes_back),
        migrations.RemoveField(model_name="redemptionrequest", name="status_code"),
        migrations.AlterField(
            model_name="redemptionrequest",
            name="response",
            field=models.JSONField(
                null=True,
                blank=True,
                help_text="A refusal's problem document, replayed as is; null for a held redemption.",
            ),
        ),
    ]
