"""Migrations on PostgreSQL: from zero, and the SQL functions' migrations down and up again on a
database that holds what the earlier versions wrote.

The redemption hold was a function written into settlement migrations 0006 and 0007; now each app's
functions live in versioned files its migrations load (docs/decisions.md). Here a scratch database is
migrated from zero, holds and refusals are written, and the apps are migrated back to where the
previous release stood (ledger 0003, institutions 0007, wallets 0002, settlement 0007): the stored
answers get their HTTP statuses back and version 2 of the hold is the function in place. Version 2
then writes a hold, and a refusal is stored as that release stored it; migrating up again must keep
every answer replaying as it was first given, and holds must work on version 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.utils import timezone

from institutions.outbox import outbox_event_head
from settlement.services import redemption_request_hash
from tests.servers import ROOT, server_environment

pytestmark = pytest.mark.postgres

REQUESTED = "carbon.redemption.requested"
# (name, number of arguments) of every function the apps' migrations define, at the newest ones.
FUNCTIONS_NOW = {
    ("institutions_codes", 1),
    ("institutions_outbox_enqueue", 7),
    ("institutions_provider", 1),
    ("ledger_account_key", 8),
    ("ledger_accounts_ensure", 9),
    ("ledger_person_lots", 1),
    ("ledger_post", 7),
    ("ledger_refuse_change", 0),
    ("ledger_transfer_balanced", 0),
    ("settlement_cycle_kept", 0),
    ("settlement_obligation_append_only", 0),
    ("settlement_redemption_hold", 13),
    ("wallets_subject_sealed", 2),
}
FUNCTIONS_BEFORE = {
    ("ledger_refuse_change", 0),
    ("ledger_transfer_balanced", 0),
    ("settlement_cycle_kept", 0),
    ("settlement_obligation_append_only", 0),
    ("settlement_redemption_hold", 14),
}


@pytest.fixture
def scratch() -> Any:
    """An empty database beside the test database, dropped afterwards."""
    server = os.environ["DATABASE_URL"].rsplit("/", 1)[0]
    name = f"hub_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def manage(url: str, *args: str) -> str:
    done = subprocess.run(  # noqa: S603 (this interpreter and the hub's manage.py)
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=server_environment(DATABASE_URL=url, LOG_LEVEL="ERROR"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def story(url: str, function: str) -> dict[str, Any]:
    out = manage(url, "shell", "-c", f"from tests.migration_story import {function}; {function}()")
    return json.loads(out.strip().splitlines()[-1])


def functions(db: psycopg.Connection) -> set[tuple[str, int]]:
    rows = db.execute(
        "SELECT proname, pronargs FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        " AND proname ~ '^(ledger|settlement|institutions|wallets)_'"
    ).fetchall()
    return set(rows)


def test_migrations_from_zero_and_the_sql_functions_down_and_up_again(scratch):
    manage(scratch, "migrate", "--noinput")
    with psycopg.connect(scratch, autocommit=True) as db:
        assert functions(db) == FUNCTIONS_NOW
    first = story(scratch, "written")
    assert first["answers"] == {"new-held": [True, False, "pending"], "new-refused": [False, False, "out-of-stock"]}

    for app, target in [("settlement", "0007"), ("ledger", "0003"), ("institutions", "0007"), ("wallets", "0002")]:
        manage(scratch, "migrate", app, target, "--noinput")
    with psycopg.connect(scratch, autocommit=True) as db:
        assert functions(db) == FUNCTIONS_BEFORE
        statuses: dict[str, int] = dict(
            db.execute("SELECT key, status_code FROM settlement_redemptionrequest").fetchall()
        )
        assert statuses == {"new-held": 201, "new-refused": 409}
        # As the previous release held and refused: version 2 of the function, and a refusal stored by Python.
        now = timezone.now()
        message_id = f"msg_{uuid.uuid4().hex}"
        row = db.execute(
            "SELECT settlement_redemption_hold(%s, 1, 2, 'old-held', 'coffee', 1, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                first["person"],
                now,
                timezone.localdate(),
                f"rdm_{uuid.uuid4().hex[:24]}",
                now + timedelta(hours=48),
                redemption_request_hash(reward_code="coffee", quantity=1),
                message_id,
                REQUESTED,
                outbox_event_head(message_id=message_id, type=REQUESTED, time=now),
            ],
        ).fetchone()
        assert row is not None and row[0]["outcome"] == "held"
        refused = {"type": "/problems/out-of-stock", "status": 409, "code": "out-of-stock", "stock": 0}
        db.execute(
            "INSERT INTO settlement_redemptionrequest (person_id, key, request_hash, status_code, response,"
            " redemption_id, created_at) VALUES (%s, 'old-refused', %s, 409, %s, NULL, now())",
            [first["person"], redemption_request_hash(reward_code="mug", quantity=1), json.dumps(refused)],
        )

    manage(scratch, "migrate", "--noinput")
    with psycopg.connect(scratch, autocommit=True) as db:
        assert functions(db) == FUNCTIONS_NOW
        columns = {
            row[0]
            for row in db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'settlement_redemptionrequest'"
            )
        }
        assert "status_code" not in columns
    again = story(scratch, "read")
    assert again["answers"] == {
        "new-held": [True, True, "pending"],
        "new-refused": [False, True, "out-of-stock"],
        "old-held": [True, True, "pending"],
        "old-refused": [False, True, "out-of-stock"],
        "after": [True, False, "pending"],
    }
    assert (again["stock"], again["check"]) == (0, [])
