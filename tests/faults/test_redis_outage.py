"""Redis wiped, stopped and restarted empty mid-stream loses no event (DESIGN.md: "losing Redis loses
no data"). Redis is the broker, not the store: the intake keeps answering 202 while it is gone (the
rows are committed to PostgreSQL before the answer), and afterwards the beat's sweeper re-enqueues the
work whose broker messages and wake-ups went with it.

The stream ends while Redis is down, so once it is back no request will wake a worker: the test shows
the rows still waiting with no sweeper, then runs the sweeper as beat would and checks every event
credited exactly once.
"""

from __future__ import annotations

import pytest

from bench import campaign

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]


def test_the_intake_accepts_through_a_redis_outage_and_the_sweeper_recovers_what_the_broker_lost(scene):
    report = campaign.fault_redis_outage(scene, events=2000, rate=200, batch=20, outage_at=0.4, drain_timeout=120)

    assert report.problems == []
    check, figures = report.check, report.figures
    # Only 202s, all of them on the first try: no 503, no retry, no connection error.
    assert report.tally["statuses"] == {"202": 100}
    assert report.tally["connection_errors"] == 0
    # What arrived while Redis was away waited with no worker told, until the sweeper ran.
    assert figures["waiting_without_the_sweeper"] > 0
    assert figures["waiting_without_the_sweeper"] == figures["waiting_when_redis_came_back"]
    assert figures["drain_seconds_after_the_first_sweep"] is not None
    assert check["acknowledged"] == check["credited_once"] == 2000
    assert check["lost"] == [] and check["doubled"] == []
    assert check["lots_total_mg"] == check["expected_total_mg"]
    assert check["wallet_mg"] == check["expected_wallet_mg"] > 0
    assert check["ledger_verify"].startswith("ok")
