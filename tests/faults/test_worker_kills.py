"""A Celery worker SIGKILLed again and again under load loses nothing and credits nothing twice
(DESIGN.md, reliability model): the claim counts the attempt in the database before any work, the
crediting transaction dies with the worker, the lease runs out and the sweeper or the next kick hands
the rows to the restarted worker, and the ledger's idempotency keys make a second credit impossible.

3,000 signed events go through the real intake at 150 a second while the worker is killed four
times, each time frozen inside a batch it claimed (see ``bench.campaign.kill_mid_batch``) and
restarted at once, as a supervisor would.
"""

from __future__ import annotations

import pytest

from bench import campaign

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]

KILLS = 4


def test_every_acknowledged_event_is_credited_once_while_the_worker_is_killed_mid_batch(scene):
    report = campaign.fault_worker_kills(scene, events=3000, rate=150, batch=20, kills=KILLS, drain_timeout=120)

    assert report.problems == []
    check, figures = report.check, report.figures
    # Every event acknowledged with a 202, every one processed and credited exactly once, the amounts
    # the standard gives, and the books (lots, issuer, the linked person's wallet) add up to them.
    assert report.tally["statuses"] == {"202": report.tally["requests"]}
    assert check["acknowledged"] == check["credited_once"] == check["inbox_rows"] == 3000
    assert check["statuses"] == {"processed": 3000}
    assert check["lost"] == [] and check["dead"] == []
    assert check["doubled"] == [] and check["wrong_amount"] == []
    assert check["lots_total_mg"] == check["expected_total_mg"] == -check["issuer_outstanding_mg"]
    assert check["wallet_mg"] == check["expected_wallet_mg"] > 0
    assert check["ledger_verify"].startswith("ok")
    # Every kill landed inside a batch, and those rows were claimed again, within their attempts.
    assert figures["kills"] == KILLS, figures
    assert figures["rows_claimed_again"] >= max(figures["rows_in_flight_at_each_kill"])
    assert figures["most_claims_of_a_row"] <= scene.hub.settings.max_attempts
