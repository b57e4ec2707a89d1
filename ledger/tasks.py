"""Celery beat tasks of the ledger: thin shells around idempotent services, safe to run twice or at once.

This module (with the management commands) is the one place the ledger meets the hub's signing key:
the services take a ``signer`` and never import ``institutions``.
"""

from __future__ import annotations

import logging

from celery import shared_task

from institutions.services import hub_signing_key
from ledger import services
from ledger.units import standard_today

logger = logging.getLogger(__name__)

# A beat run seals at most this many blocks, so one run stays short; the next run takes the rest.
SEAL_BLOCKS_PER_RUN = 20


def hub_signer() -> services.Signer:
    """Sign with the hub's active Ed25519 key (created on first use), naming the key and its public half."""
    key, private = hub_signing_key()

    def sign(message: bytes) -> tuple[str, str, bytes]:
        return key.key_id, key.public_key, private.sign(message)

    return sign


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
