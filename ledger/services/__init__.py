"""Writes of the ledger, one module per concept:

- :mod:`~ledger.services.accounts`: accounts by natural identity (:class:`AccountKey`, :func:`accounts_ensure`);
- :mod:`~ledger.services.transfers`: the posting engine (:class:`TransferSpec`, :func:`transfers_post`);
- :mod:`~ledger.services.expiry`: lapsed lots swept to ``expired(issuer)``;
- :mod:`~ledger.services.sealing`: signed Merkle blocks over the postings.

The ledger imports no other app. Callers name accounts with :class:`AccountKey`, turn them into ids
with :func:`accounts_ensure`, and post :class:`TransferSpec` batches with :func:`transfers_post`.
Sealing takes a ``signer`` from the caller (``clearinghouse.keys.hub_signer``).

On PostgreSQL a batch is one call of the database function ``ledger_post`` whatever its size: transfers
inserted ``ON CONFLICT DO NOTHING``, postings, one ``SELECT ... FOR NO KEY UPDATE`` of the touched
accounts in id order, the checks, one netted ``UPDATE``. SQLite (the embedded default, one writer at a
time) takes the same steps through the ORM. The public names are here too.
"""

from ledger.services.accounts import AccountKey, accounts_ensure, lot_expiry
from ledger.services.expiry import LotSweep, Swept, lots_expire, lots_sweep, person_lots_forfeit, sweep_keys
from ledger.services.sealing import LeafRow, Signer, block_header_of, blocks_seal, leaf_rows, leaves_root
from ledger.services.transfers import (
    KEY_MAX_LENGTH,
    MAX_AMOUNT,
    METADATA_MAX_BYTES,
    PostResult,
    TransferSpec,
    ledger_refusal,
    transfers_post,
)

__all__ = [
    "KEY_MAX_LENGTH",
    "MAX_AMOUNT",
    "METADATA_MAX_BYTES",
    "AccountKey",
    "LeafRow",
    "LotSweep",
    "PostResult",
    "Signer",
    "Swept",
    "TransferSpec",
    "accounts_ensure",
    "block_header_of",
    "blocks_seal",
    "leaf_rows",
    "leaves_root",
    "ledger_refusal",
    "lot_expiry",
    "lots_expire",
    "lots_sweep",
    "person_lots_forfeit",
    "sweep_keys",
    "transfers_post",
]
