"""What the activity table's dropped foreign-key checks guarded, now guarded from the parents' side.

Attacked with SQL, bypassing the ORM's ``PROTECT``: PostgreSQL itself refuses (methodology migration 0005).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction

from institutions.models import InboxEvent
from methodology.models import FactorVersion, NormalizedActivity
from tests.conftest import activity, post_events

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


def sql(statement: str, params: list | None = None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])


@pytest.fixture
def measured(client, bank, django_capture_on_commit_callbacks) -> NormalizedActivity:
    event = activity(action="transit.metro", quantity="12.5", unit="km")
    with django_capture_on_commit_callbacks(execute=True):
        assert post_events(client, bank, event).status_code == 202
    return NormalizedActivity.objects.select_related("factor_version").get(inbox_event__event_id=event["id"])


def test_a_factor_version_cannot_be_deleted(measured):
    with pytest.raises(IntegrityError, match="is history: it cannot be deleted"), transaction.atomic():
        sql("DELETE FROM methodology_factorversion WHERE id = %s", [measured.factor_version_id])
    assert FactorVersion.objects.filter(pk=measured.factor_version_id).exists()


@pytest.mark.parametrize(
    ("column", "value"),
    [("grams_per_unit", Decimal("1")), ("valid_from", "2001-01-01")],
)
def test_a_factor_version_cannot_be_rewritten(measured, column, value):
    with pytest.raises(IntegrityError, match="add a new version"), transaction.atomic():
        sql(f"UPDATE methodology_factorversion SET {column} = %s WHERE id = %s", [value, measured.factor_version_id])  # noqa: S608


def test_a_factor_versions_source_citation_can_be_corrected(measured):
    sql("UPDATE methodology_factorversion SET source = %s WHERE id = %s", ["corrected", measured.factor_version_id])
    assert FactorVersion.objects.get(pk=measured.factor_version_id).source == "corrected"


def test_a_scenario_with_history_cannot_be_deleted(measured):
    """Its versions' foreign key is still checked (deferred to the commit; made immediate here)."""
    with pytest.raises(IntegrityError, match="methodology_factorversion"), transaction.atomic():
        sql("SET CONSTRAINTS ALL IMMEDIATE")
        sql("DELETE FROM methodology_scenario WHERE id = %s", [measured.scenario_id])


def test_an_inbox_row_named_by_an_activity_cannot_be_deleted(measured):
    with pytest.raises(IntegrityError, match="named by a normalized activity"), transaction.atomic():
        sql("DELETE FROM institutions_inboxevent WHERE id = %s", [measured.inbox_event_id])
    assert InboxEvent.objects.filter(pk=measured.inbox_event_id).exists()


def test_an_inbox_row_without_an_activity_can_be_deleted(measured, client, bank):
    """The guard is the foreign key's restriction, not a ban on deleting inbox rows."""
    unlinked = activity(action="no.such.action", quantity="1", unit="km")
    assert post_events(client, bank, unlinked).status_code == 202
    row = InboxEvent.objects.get(event_id=unlinked["id"])
    assert not NormalizedActivity.objects.filter(inbox_event=row).exists()
    sql("DELETE FROM institutions_inboxevent WHERE id = %s", [row.pk])
    assert not InboxEvent.objects.filter(pk=row.pk).exists()


def test_an_institution_named_by_an_activity_cannot_be_deleted(measured):
    with pytest.raises(IntegrityError, match="named by a normalized activity"), transaction.atomic():
        sql("DELETE FROM institutions_institution WHERE id = %s", [measured.institution_id])
