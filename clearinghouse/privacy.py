"""A person's rights over what the hub holds about them (DESIGN.md, identity and privacy): the export of
everything, and erasure. Each app contributes its part here, registered in its ``AppConfig.ready`` as
event handlers are registered with the edge, so no app imports the apps above it for them.

``wallets`` owns persons and runs both: ``wallets.selectors.person_export`` writes its own sections
(the person, links, link codes, the wallet, the accounts), then every registered section, in the order
registered (``INSTALLED_APPS``, floor by floor); ``wallets.services.person_erase`` calls every registered
eraser inside its one transaction, after the person's lots are forfeited and under the locks it took,
before the person's user is deleted. Parts receive the person's id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ``section(person id) -> JSON-ready value`` of one key of the export document.
ExportSection = Callable[[int], Any]
# ``eraser(person id)``: delete or detach what the app holds about the person. Idempotent.
Eraser = Callable[[int], None]

_sections: dict[str, ExportSection] = {}
_erasers: dict[str, Eraser] = {}


def _add(registry: dict[str, Any], name: str, part: Any) -> None:
    existing = registry.get(name)
    if existing is not None and existing is not part:
        raise RuntimeError(f"{name} is already registered: {existing.__module__}.{existing.__name__}")
    registry[name] = part


def export_section(name: str) -> Callable[[ExportSection], ExportSection]:
    """Register ``section`` as the export's key ``name``."""

    def decorate(section: ExportSection) -> ExportSection:
        _add(_sections, name, section)
        return section

    return decorate


def eraser(name: str) -> Callable[[Eraser], Eraser]:
    """Register an app's part of erasure under ``name`` (for messages only)."""

    def decorate(part: Eraser) -> Eraser:
        _add(_erasers, name, part)
        return part

    return decorate


def export_sections(person_id: int) -> dict[str, Any]:
    """Every registered section of the person's export, in the order registered."""
    return {name: section(person_id) for name, section in _sections.items()}


def erase(person_id: int) -> None:
    """Run every registered eraser, in the order registered, in the caller's transaction."""
    for part in _erasers.values():
        part(person_id)


def registered() -> tuple[list[str], list[str]]:
    """(export sections, erasers) by name, in order: what an operator or a test can check."""
    return list(_sections), list(_erasers)
