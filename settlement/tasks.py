"""Celery tasks of settlement: thin shells around idempotent services, safe to run twice or at once."""

from __future__ import annotations

import logging

from celery import shared_task

from settlement.services import cycle_run, cycles_fail_undelivered, redemptions_expire

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def settlement_run_daily() -> int | None:
    """Cut, net and instruct the day's cycle (what ``manage.py settlement_run`` does); its id, or None.

    A second run finds nothing new to cut and does nothing.
    """
    run = cycle_run()
    if run is None:
        logger.info("settlement_run_daily: nothing to settle")
        return None
    logger.info(
        "settlement_run_daily: cycle %s %s with %d instruction(s)", run.cycle.pk, run.cycle.state, len(run.instructions)
    )
    return run.cycle.pk


@shared_task(acks_late=True, ignore_result=True)
def cycles_watch() -> list[int]:
    """Fail the instructed cycles whose instruction webhooks died undelivered, for the operator to resend."""
    return cycles_fail_undelivered()


@shared_task(acks_late=True, ignore_result=True)
def redemptions_expire_due() -> int:
    """Beat: void the holds whose provider did not answer in time (``HUB_REDEMPTION_HOLD_HOURS``)."""
    voided = redemptions_expire()
    if voided:
        logger.info("redemptions_expire_due: %d holds expired and returned to their lots", voided)
    return voided
