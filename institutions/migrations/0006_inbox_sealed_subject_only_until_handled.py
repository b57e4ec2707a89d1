"""A link event keeps its sealed subject id only until it is handled.

From here the handler blanks it with the link code (the membership keeps its own sealed copy), and
unlink events are no longer sealed at all. This clears the copies that handled account events kept,
so erasure no longer has to find them by subject, and drops the index it used for that. Events not
handled yet (received, quarantined, dead: an operator may still replay them) keep theirs, but for
unlink events, which never needed it.
"""

from django.db import migrations


def clear_handled(apps, schema_editor):
    InboxEvent = apps.get_model("institutions", "InboxEvent")
    sealed = InboxEvent.objects.exclude(subject_sealed="")
    sealed.filter(status="processed").update(subject_sealed="")
    sealed.filter(type="carbon.account.unlinked").update(subject_sealed="")  # never read, in any state


class Migration(migrations.Migration):
    dependencies = [
        ("institutions", "0005_inbox_sealed_subject_index"),
    ]

    operations = [
        # First, while the partial index on the sealed rows still finds them without a scan of the inbox.
        migrations.RunPython(clear_handled, migrations.RunPython.noop),
        migrations.RemoveIndex(model_name="inboxevent", name="inbox_sealed_subject"),
    ]
