"""While the database is out of reach, the intake answers 503 `unavailable` with `Retry-After`, never 500
and never 202 (CONTRACT.md section 2: "503 unavailable when the hub cannot store"). A 500 would tell a
sender its request is broken; a 503 without `Retry-After` leaves it guessing when to come back.

The fault campaign (tests/faults) crashes a real PostgreSQL under load; these are the same answers,
quick, on the suite's own database: the connection is pointed at a port nothing serves, as
tests/test_health.py does for /readyz.
"""

from __future__ import annotations

import pytest
from django.db import connection

from institutions.models import InboxEvent
from institutions.selectors import forget_all_institutions, institution_verifier
from tests.conftest import activity, post_events

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _unavailable(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 503, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "unavailable"
    assert int(response["Retry-After"]) > 0


@pytest.mark.parametrize("credentials_cached", [False, True], ids=["credentials-unread", "credentials-cached"])
def test_with_the_database_out_of_reach_the_intake_answers_503_with_retry_after(
    client, bank, monkeypatch, credentials_cached
):
    forget_all_institutions()
    if credentials_cached:  # read just before: the request fails at the INSERT
        assert institution_verifier(bank.code) is not None
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "PORT", "1")  # the same server, at a port nothing serves
    try:
        response = post_events(client, bank, [activity("e1"), activity("e2")])
    finally:
        connection.close()
        monkeypatch.undo()
    _unavailable(response)

    assert InboxEvent.objects.count() == 0
    assert post_events(client, bank, activity("e1")).status_code == 202  # and stored once it is back


def test_a_503_for_a_statement_that_failed_carries_retry_after_too(client, bank):
    # The inbox cannot be written (the statement times out behind a lock held elsewhere).
    import psycopg

    database = connection.settings_dict
    with psycopg.connect(
        host=database["HOST"],
        port=database["PORT"] or 5432,
        user=database["USER"],
        password=database["PASSWORD"] or None,
        dbname=database["NAME"],
        autocommit=False,
    ) as blocker:
        blocker.execute("SET lock_timeout = '5s'")
        blocker.execute(f"LOCK TABLE {InboxEvent._meta.db_table} IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '500ms'")
        try:
            response = post_events(client, bank, activity("e1"))
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET statement_timeout")
        blocker.rollback()
    _unavailable(response)
