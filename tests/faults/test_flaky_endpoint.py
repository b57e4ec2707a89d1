"""An institution's webhook endpoint down for minutes and then failing 40 % of requests: every webhook
the hub owes it arrives, each applied once by a receiver that dedupes by ``webhook-id``, and each retry
waits what CONTRACT.md section 3 says (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h,
with jitter).

The schedule spans three days, so the test plays it on an advanced clock: the delivery worker (a real
``celery worker`` process) reads when a message is due from ``next_attempt_at`` and compares it with the
present; moving every pending ``next_attempt_at`` back by Δ is, to the worker, Δ passing. Every request
is still real HTTP to a real receiver on loopback, signed with the hub's key and checked there. The
clock goes from one due moment to the next (plus 5 % of the wait), so a retry may be a little late,
never early; the test measures each gap on that clock.
"""

from __future__ import annotations

import pytest

from bench import campaign

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis]

MESSAGES = 60


def test_webhooks_to_a_flaky_endpoint_arrive_once_each_on_the_contracts_schedule(scene):
    report = campaign.fault_flaky_endpoint(scene, messages=MESSAGES, failure_rate=0.4, down_minutes=10, timeout=240)

    assert report.problems == []
    figures = report.figures
    # None lost: every message delivered (replayed by the operator if it used up all ten attempts).
    assert figures["delivered"] == MESSAGES
    # None doubled at the receiver: each redemption applied once, because the hub resent each message
    # only ever under its own webhook-id (and resend it did: the receiver's dedupe skipped some).
    assert figures["applied_at_the_receiver"] == MESSAGES and figures["redemptions_applied_twice"] == 0
    assert figures["redemptions_under_more_than_one_webhook_id"] == 0
    assert figures["resends_skipped_by_the_receivers_dedupe"] > 0
    # The endpoint really was down (its first attempts unanswered) and really flaky afterwards.
    assert figures["attempts_unanswered"] >= 3 * MESSAGES  # immediately, 5 s and 5 min all fell in the 10 min
    assert figures["requests_received"] > MESSAGES
    assert {"500", "503", "200"} <= set(figures["answers"])
    # Every gap between two attempts of a message on the contract's schedule: none early, none late
    # beyond the clock's step, and every request made while the endpoint was up reached it.
    assert figures["early_retries"] == 0 and figures["late_retries"] == 0
    assert figures["max_attempts_of_a_message"] >= 5  # the schedule was played past its hours-long waits
    assert figures["attempts_unanswered_while_the_endpoint_was_up"] == 0
    assert figures["virtual_hours_played"] >= 2.5  # at least to the fifth attempt (2 h after the fourth)
