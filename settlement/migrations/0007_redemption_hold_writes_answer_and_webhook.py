"""The redemption hold's function writes the key's answer and the provider's webhook itself.

(Version 2, in settlement/sql; version 3 of migration 0008 is the one in use.)

``settlement_redemption_hold`` (migration 0006) held the points; Python then stored the answer and the
webhook in a second statement and committed in a third. Now the function writes both, so a hold
with its answer and webhook is one statement: on a connection in autocommit, one round trip including
its commit, where it was five (BEGIN, the call, the insert, COMMIT). What changed from 0006:

* the key's answer is stored by the function (new ``p_request_hash``); a ``201``'s ``response`` is
  null, the answer being the redemption as held, which ``settlement.services`` rebuilds from its rows
  when the key is sent again (``stored`` now also answers the answer's ``redemption_id``);
* the ``carbon.redemption.requested`` webhook is written by the function (new ``p_message_id``,
  ``p_event_type``, and ``p_event_head``, the CloudEvent's JSON up to its data, built by
  ``institutions.outbox.outbox_event_head``); the person's subject id at the provider is stored sealed
  in the message's ``subject_sealed`` and unsealed only when it is sent;
* ``held`` no longer answers ``provider_id`` and ``subject_sealed``.

Refusals found by the checks are still stored by Python (their wording is Python's), and the race
refusals still raise ``CH001`` and ``CH002``. See migration 0006 for the rest.

Going back restores 0006's function; it stops at the column while answers without a body exist.
"""

from django.db import migrations, models

from clearinghouse.db import PostgresOnlySQL, sql_file

DROP_V1 = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz);
"""
DROP_V2 = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz, text, text, text, text);
"""


class Migration(migrations.Migration):
    dependencies = [
        ("institutions", "0007_outbox_subject_sealed"),
        ("settlement", "0006_redemption_hold_function"),
    ]

    operations = [
        migrations.AlterField(
            model_name="redemptionrequest",
            name="response",
            field=models.JSONField(
                null=True,
                blank=True,
                help_text="The body answered, replayed as is; null for a 201, rebuilt from the redemption as held.",
            ),
        ),
        PostgresOnlySQL(
            [DROP_V1, sql_file("settlement", "settlement_redemption_hold.v2.sql")],
            [DROP_V2, sql_file("settlement", "settlement_redemption_hold.v1.sql")],
        ),
    ]
