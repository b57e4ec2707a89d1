"""Postings' foreign keys are no longer checked per row at commit.

Transfers and accounts are never deleted and never change id (triggers of 0002), and only the posting
service writes postings, naming rows it has just inserted or locked. The per-row deferred checks were
about a third of a crediting batch's commit (docs/performance.md, "Crediting into the books").
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('ledger', '0002_database_invariants'),
    ]

    operations = [
        migrations.AlterField(
            model_name='posting',
            name='account',
            field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.PROTECT, related_name='postings', to='ledger.account'),
        ),
        migrations.AlterField(
            model_name='posting',
            name='transfer',
            field=models.ForeignKey(db_constraint=False, on_delete=django.db.models.deletion.PROTECT, related_name='postings', to='ledger.transfer'),
        ),
    ]
