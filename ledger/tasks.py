"""Celery beat tasks of the ledger: thin shells around idempotent services, safe to run twice or at once.

The services take a ``signer``; the tasks and the management commands get the hub's from
:mod:`clearinghouse.keys`.
"""

from __future__ import annotations

import logging

from celery import shared_task

from clearinghouse.keys import hub_signer
from ledger import services
from ledger.units import standard_today

logger = logging.getLogger(__name__)

# A beat run seals at most this many blocks, so one run stays short; the next run takes the rest.
SEAL_BLOCKS_PER_RUN = 20


@shared_task(acks_late=True, ignore_result=True)
def lots_expire_daily() -> int:
    made = services.lots_expire(today=standard_today())
    logger.info("lots_expire_daily: %d lots expired", made)
    return made


@shared_task(acks_late=True, ignore_result=True)
def blocks_seal_recent() -> int:
    """Seal what was posted since the last run. Two runs at once take turns (the service's lock)."""
    signer = hub_signer()
    sealed = 0
    while sealed < SEAL_BLOCKS_PER_RUN and services.blocks_seal(signer=signer) is not None:
        sealed += 1
    return sealed
