"""Who stands behind a subject: the one thing the standard needs of the wallets, on the floor above it.

Caps and fingerprints count per owner, and a linked subject's owner is its person. Which person a
subject is linked to is the wallets' to say (their memberships), so ``wallets`` registers its lookup
here in ``WalletsConfig.ready``, as apps register their event handlers with the edge; methodology never
imports ``wallets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from django.core.exceptions import ImproperlyConfigured

# ``lookup(pairs) -> {(institution id, subject ref): person id}`` for the subjects currently linked.
PersonsForSubjects = Callable[[Iterable[tuple[int, str]]], dict[tuple[int, str], int]]

_lookup: PersonsForSubjects | None = None


def register(lookup: PersonsForSubjects) -> None:
    global _lookup
    _lookup = lookup


def persons_for_subjects(pairs: Iterable[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """``{(institution id, subject ref): person id}`` for the subjects currently linked."""
    if _lookup is None:
        raise ImproperlyConfigured("No lookup of subjects' persons is registered (wallets registers it).")
    return _lookup(pairs)
