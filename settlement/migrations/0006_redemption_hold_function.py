"""A redemption hold in one round trip: ``settlement_redemption_hold``, a PostgreSQL function.

(Version 1, in settlement/sql; version 3 of migration 0008 is the one in use.)

``POST /me/redemptions`` is the hub's hottest write a person makes. Done from Python it took 18
statements, each a round trip with its client-side work, PostgreSQL's parsing and planning: 8 ms of
CPU a hold on the benchmark machine, where 500 holds a second leave 4 ms. This function makes the
same decisions and the same writes as the portable path in ``settlement.services`` (which SQLite runs
and ``HUB_REDEMPTION_HOLD_IN_DATABASE=0`` selects) in one call,
with plans PL/pgSQL keeps per connection. ``tests/settlement/test_hold_engines.py`` runs both
paths over the same cases and requires the same rows, balances and answers.

What stays in Python: the idempotency key's cleaning and hash, the lock ids, the redemption's public
id, the JSON of the answer, the webhook (it unseals the person's subject id with the hub's key) and
storing the answer; ``settlement.services`` writes those after the call, in the same transaction.

The function answers one JSON object; ``outcome`` says which:

* ``in-flight``: another transaction holds the Idempotency-Key's lock (nothing was done);
* ``stored``: the key has an answer (``request_hash``, ``status``, ``response``);
* ``refused``: a check failed before anything was written (``code`` and the figures its problem
  names: ``stock``; ``limit`` and ``taken``; ``points`` and ``available_mg``);
* ``held``: written; ``id`` of the redemption, ``reward``, ``provider_id``, ``provider_code``,
  ``points``, ``subject_sealed`` (the person's link at the provider, or null) and ``milligrams`` per
  issuer code.

Two refusals a concurrent change can cause after the writes began raise instead, so the caller's
transaction rolls back and stores nothing: SQLSTATE ``CH001`` (a lot was swept since it was read:
insufficient points) and ``CH002`` (the last unit of stock was taken).
"""

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL, sql_file

BACKWARD = """
DROP FUNCTION settlement_redemption_hold(bigint, bigint, bigint, text, text, integer, timestamptz, date, text,
                                         timestamptz);
"""


class Migration(migrations.Migration):
    dependencies = [
        ("settlement", "0005_obligation_cut_cheaper"),
    ]

    operations = [PostgresOnlySQL(sql_file("settlement", "settlement_redemption_hold.v1.sql"), BACKWARD)]
