"""The one registry through which the edge learns about the apps behind it (DESIGN.md, data flow).

An app that owns an event type registers a handler in its ``AppConfig.ready``::

    from institutions.handlers import register

    @register("carbon.activity.recorded")
    def handle_activity_recorded(events): ...

A handler receives a list of claimed :class:`~institutions.models.InboxEvent` rows of its type, in
id order, inside the dispatcher's transaction, and returns one :class:`Outcome` per row, in the same
order. It must be idempotent: a row may be handed to it again after a crash. Raising rolls back the
whole batch, which the dispatcher then retries row by row to isolate the failing one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from institutions.models import InboxEvent


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Literal["processed", "quarantined"]
    detail: dict[str, Any] | None = None
    reason: str = ""

    @classmethod
    def processed(cls, detail: dict[str, Any] | None = None) -> Outcome:
        return cls("processed", detail)

    @classmethod
    def quarantined(cls, reason: str, detail: dict[str, Any] | None = None) -> Outcome:
        return cls("quarantined", detail, reason)


Handler = Callable[[Sequence["InboxEvent"]], Sequence[Outcome]]

_handlers: dict[str, Handler] = {}


def register(event_type: str) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        existing = _handlers.get(event_type)
        if existing is not None and existing is not handler:
            raise RuntimeError(f"{event_type} already has a handler: {existing.__module__}.{existing.__name__}")
        _handlers[event_type] = handler
        return handler

    return decorate


def unregister(event_type: str) -> None:
    _handlers.pop(event_type, None)


def handler_for(event_type: str) -> Handler | None:
    return _handlers.get(event_type)


def handled_types() -> list[str]:
    return sorted(_handlers)
