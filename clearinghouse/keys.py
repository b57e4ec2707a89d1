"""The hub's signing keys, as every floor sees them: sign with the active key, list the keys to trust.

The hub signs what it vouches for (sealed ledger blocks, webhooks) with its own Ed25519 key. The keys
themselves are kept by the edge (``institutions``: the ``HubKey`` table, a key created on first use, its
private half sealed at rest, rotation, publication), which registers its keeper here in
``InstitutionsConfig.ready``, as apps register their event handlers with the edge. The floors below the
edge, the ledger first, sign and verify through this module and never import ``institutions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured

# ``signer(message) -> (key_id, public_key, signature)``: Ed25519 over ``message`` by the hub's active key,
# with the key's id and its public half as ``whpk_<base64>``.
Signer = Callable[[bytes], tuple[str, str, bytes]]


@dataclass(frozen=True, slots=True)
class Keeper:
    """Who keeps the keys: ``signer()`` signs with the active key (creating the first on first use);
    ``trusted()`` is ``{key id: public key}`` of every key the hub ever published, retired ones included,
    so what was signed before a rotation still verifies."""

    signer: Callable[[], Signer]
    trusted: Callable[[], dict[str, str]]


_keeper: Keeper | None = None


def register(keeper: Keeper) -> None:
    global _keeper
    _keeper = keeper


def _registered() -> Keeper:
    if _keeper is None:
        raise ImproperlyConfigured("No keeper of the hub's keys is registered (institutions registers it).")
    return _keeper


def hub_signer() -> Signer:
    """Sign with the hub's active key (created on first use), naming the key and its public half."""
    return _registered().signer()


def hub_trusted_keys() -> dict[str, str]:
    """``{key id: whpk_ public key}`` of every key the hub has published, retired ones included."""
    return _registered().trusted()
