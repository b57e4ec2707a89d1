"""Outbox messages keep the person's subject id sealed; it is unsealed into the event only when sent."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('institutions', '0006_inbox_sealed_subject_only_until_handled'),
    ]

    operations = [
        migrations.AddField(
            model_name='outboxmessage',
            name='subject_sealed',
            field=models.TextField(blank=True, default='', help_text="The person's subject id at the institution, sealed; sent as data.subject."),
        ),
    ]
