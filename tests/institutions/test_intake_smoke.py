import pytest

from institutions.models import InboxEvent
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db


def test_single_event_is_stored_and_accepted(client, bank):
    response = post_events(client, bank, activity("e1"))
    assert response.status_code == 202, response.content
    assert response.json() == {"received": 1, "results": [{"id": "e1", "status": "accepted"}]}
    row = InboxEvent.objects.get()
    assert row.event_id == "e1" and row.status == "received" and row.data["quantity"] == "12.5"


def test_batch_reports_each_event_in_order(client, bank):
    post_events(client, bank, activity("e1"))
    response = post_events(client, bank, [activity("e2"), activity("e1"), activity("e1", quantity="3")])
    assert response.status_code == 202
    assert [r["status"] for r in response.json()["results"]] == ["accepted", "duplicate", "conflict"]
