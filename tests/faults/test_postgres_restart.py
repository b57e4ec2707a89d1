"""PostgreSQL crashed under load (``pg_ctl stop -m immediate``: no checkpoint, WAL replay at the next
start) and started again: while it is down the intake answers ``503 unavailable`` with ``Retry-After``
(problem+json, CONTRACT.md section 2), never a 202 and never a 500; nothing acknowledged before the
crash is lost; the sender retries its 503s and everything drains once the database is back.
"""

from __future__ import annotations

import pytest

from bench import campaign

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]


def test_while_postgres_is_down_the_intake_answers_503_and_nothing_acknowledged_is_lost(scene, private_postgres):
    report = campaign.fault_postgres_restart(
        scene, private_postgres, events=2000, rate=200, batch=20, down_at=0.3, down_seconds=5, drain_timeout=120
    )

    assert report.problems == []
    tally, check, figures = report.tally, report.check, report.figures
    # Only 202 and 503; the outage was seen, and every 503 said when to come back, as problem+json.
    assert set(tally["statuses"]) == {"202", "503"}, tally["statuses"]
    assert tally["unavailable_503"] > 0
    assert tally["unavailable_without_retry_after"] == 0 and tally["unavailable_not_problem_json"] == 0
    assert tally["unexpected"] == []
    # What was acknowledged before the crash survived it, and every retried batch was stored once.
    assert figures["acknowledged_before_the_crash"] > 0
    assert check["acknowledged"] == check["credited_once"] == check["inbox_rows"] == 2000
    assert check["lost"] == [] and check["doubled"] == [] and check["unacknowledged_stored"] == 0
    assert check["lots_total_mg"] == check["expected_total_mg"]
    assert check["wallet_mg"] == check["expected_wallet_mg"] > 0
    assert check["ledger_verify"].startswith("ok")
