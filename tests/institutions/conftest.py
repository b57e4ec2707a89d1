"""Fixtures for the dispatcher: a handler the test controls, registered for one event type."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from institutions import handlers
from institutions.envelope import ACTIVITY_RECORDED
from institutions.handlers import Outcome
from institutions.models import InboxEvent


@dataclass
class RecordingHandler:
    """Processes every row it is given, except the event ids the test tells it to fail or quarantine."""

    fail: set[str] = field(default_factory=set)
    quarantine: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, events: Sequence[InboxEvent]) -> list[Outcome]:
        with self.lock:
            self.seen.extend(event.event_id for event in events)
            self.threads.add(threading.current_thread().name)
        outcomes = []
        for event in events:
            if event.event_id in self.fail:
                raise RuntimeError(f"handler refuses {event.event_id}")
            if event.event_id in self.quarantine:
                outcomes.append(Outcome.quarantined("unknown_action", {"action": event.data.get("action")}))
            else:
                outcomes.append(Outcome.processed({"points": 42, "reason": None}))
        return outcomes


@pytest.fixture
def activity_handler() -> Iterator[RecordingHandler]:
    """A test handler for ``carbon.activity.recorded``; an app's own handler is set aside meanwhile."""
    previous = handlers.handler_for(ACTIVITY_RECORDED)
    handlers.unregister(ACTIVITY_RECORDED)
    handler = RecordingHandler()
    handlers.register(ACTIVITY_RECORDED)(handler)
    yield handler
    handlers.unregister(ACTIVITY_RECORDED)
    if previous is not None:
        handlers.register(ACTIVITY_RECORDED)(previous)
