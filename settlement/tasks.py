"""Celery tasks of settlement: thin shells around idempotent services, safe to run twice or at once."""

from __future__ import annotations

import logging

from celery import shared_task

from settlement import services

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def redemptions_expire_due() -> int:
    """Beat: void the holds whose provider did not answer in time (``HUB_REDEMPTION_HOLD_HOURS``)."""
    voided = services.redemptions_expire()
    if voided:
        logger.info("redemptions_expire_due: %d holds expired and returned to their lots", voided)
    return voided
