"""Settlement under real concurrency on PostgreSQL: simultaneous runs, simultaneous confirmations."""

from __future__ import annotations

import functools
from datetime import timedelta

import pytest
from django.db.models import Count
from django.test import Client

from institutions import intake
from institutions.inbox import inbox_drain
from institutions.models import InboxEvent
from settlement.exceptions import CycleOrder
from settlement.models import Confirmation, Cycle, CycleState, Instruction, Obligation
from settlement.services import cycle_run
from tests.conftest import make_sender, post_events, run_together
from tests.settlement.conftest import CUT, WORKED, confirmed_event, record

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def test_simultaneous_runs_put_each_obligation_in_exactly_one_cycle():
    senders = {name: make_sender(f"bank-{name.lower()}") for name in "ABCD"}
    record(senders, WORKED)
    jobs = [functools.partial(cycle_run, now=CUT + timedelta(seconds=n), minimum_minor=1) for n in range(4)]
    results, errors = run_together(len(jobs), lambda i: jobs[i]())
    assert all(isinstance(e, CycleOrder) for e in errors), errors  # a later cut-off committed first
    runs = [r for r in results if r is not None]
    assert len(runs) == 1 and runs[0].cycle.state == CycleState.INSTRUCTED
    assert Cycle.objects.count() == 1  # the losers left no empty cycle behind
    assert not Obligation.objects.filter(cycle__isnull=True).exists()
    per_institution = Instruction.objects.values("cycle", "institution").annotate(n=Count("id"))
    assert {row["n"] for row in per_institution} == {1} and len(per_institution) == 4


def test_simultaneous_confirmations_of_one_cycle_all_apply(monkeypatch, settings):
    settings.HUB_INBOX_BATCH_SIZE = 1  # every worker holds one event's locks while the others run
    monkeypatch.setattr(intake, "_kick_processing", lambda: None)  # store only; the workers below process
    senders = {name: make_sender(f"bank-{name.lower()}") for name in "ABCD"}
    record(senders, WORKED)
    run = cycle_run(now=CUT, minimum_minor=1)
    assert run is not None
    client = Client()
    for instruction in run.instructions:
        sender = next(s for s in senders.values() if s.institution.pk == instruction.institution_id)
        status = "paid" if instruction.direction == "pay" else "received"
        assert post_events(client, sender, confirmed_event(instruction.instruction_id, status)).status_code == 202
    assert InboxEvent.objects.filter(status="received").count() == 4

    _, errors = run_together(4, lambda _: inbox_drain())
    assert not errors
    assert InboxEvent.objects.filter(status="processed").count() == 4
    assert Confirmation.objects.count() == 4
    assert Cycle.objects.get().state == CycleState.RECONCILED
