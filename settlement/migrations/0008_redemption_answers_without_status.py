"""A key's stored answer keeps no HTTP status; ``settlement_redemption_hold`` version 3 stops writing one.

The answer given under an Idempotency-Key is the redemption the request held (``redemption`` set; its
body is rebuilt from the redemption's rows when replayed) or the refusal's problem document
(``response``, whose ``status`` member is the HTTP status, RFC 9457). ``status_code`` said nothing
more, and which HTTP status an answer is sent with is the API's to say (``settlement.apis``), not the
services' nor the database's. Going back fills it in again from those: 201 for a held redemption.
"""

from django.db import migrations, models

from clearinghouse.db import PostgresOnlySQL, sql_file

# Versions 2 and 3 take the same arguments.
DROP = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz, text, text, text, text);
"""


def status_codes_back(apps, schema_editor):
    RedemptionRequest = apps.get_model("settlement", "RedemptionRequest")
    for answer in RedemptionRequest.objects.filter(status_code__isnull=True).iterator():
        answer.status_code = 201 if answer.redemption_id is not None else answer.response["status"]
        answer.save(update_fields=["status_code"])


class Migration(migrations.Migration):
    dependencies = [
        ("settlement", "0007_redemption_hold_writes_answer_and_webhook"),
    ]

    operations = [
        PostgresOnlySQL(
            [DROP, sql_file("settlement", "settlement_redemption_hold.v3.sql")],
            [DROP, sql_file("settlement", "settlement_redemption_hold.v2.sql")],
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
