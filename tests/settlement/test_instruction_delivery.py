"""Instruction webhooks over real HTTP: a flaky receiver, a dead endpoint failing the cycle, a resend."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from institutions import outbox
from institutions.models import Institution, OutboxMessage
from settlement.models import Cycle, CycleState, Instruction
from settlement.services import ObligationSpec, cycle_run, cycles_fail_undelivered, obligations_record
from settlement.tasks import cycles_watch
from tests.conftest import Receiver, free_port, make_sender
from tests.settlement.conftest import CUT, T0

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _allow_private(settings: Any) -> None:
    settings.HUB_ALLOW_PRIVATE_ENDPOINTS = True


def ring(count: int, url: str) -> list[Instruction]:
    """``count`` institutions at ``url``, each owing the next a different amount: every one is instructed."""
    ids = []
    for n in range(count):
        sender = make_sender(f"ring-{n}")
        Institution.objects.filter(pk=sender.institution.pk).update(endpoint_url=url)
        ids.append(sender.institution.pk)
    for n, debtor in enumerate(ids):
        spec = ObligationSpec(debtor, ids[(n + 1) % count], 1000 * (n + 1))
        obligations_record(source=f"ring:{n}", obligations=[spec], now=T0)
    run = cycle_run(now=CUT, minimum_minor=100)
    assert run is not None and len(run.instructions) == count
    return run.instructions


def make_due() -> None:
    OutboxMessage.objects.filter(status__in=["pending", "failed"]).update(next_attempt_at=timezone.now())
    Institution.objects.update(endpoint_paused_until=None)


def test_a_flaky_receiver_that_was_down_applies_each_instruction_exactly_once() -> None:
    port = free_port()
    instructions = ring(8, f"http://127.0.0.1:{port}/hooks")

    assert outbox.deliveries_send(limit=100) == {"delivered": 0, "failed": 8, "dead": 0}  # nobody listens yet

    receiver = Receiver(port)
    applied: dict[str, int] = {}  # instruction_id -> times applied by the institution
    rng = random.Random(2030)

    def flaky(headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        roll = rng.random()
        if roll < 0.2:
            return 500, {}
        if headers["webhook-id"] not in receiver.effects:  # the institution dedupes by webhook-id
            receiver.effects[headers["webhook-id"]] = 1
            instruction_id = json.loads(body)["data"]["instruction_id"]
            applied[instruction_id] = applied.get(instruction_id, 0) + 1
        return (503, {}) if roll < 0.4 else (200, {})  # 503 here: applied, but the answer was lost

    receiver.respond = flaky
    try:
        for _ in range(15):
            make_due()
            if not outbox.deliveries_send(limit=100):
                break
    finally:
        receiver.close()

    assert OutboxMessage.objects.filter(status="delivered").count() == 8
    assert applied == {i.instruction_id: 1 for i in instructions}
    webhook_ids = {h["webhook-id"] for h, _ in receiver.requests}
    assert webhook_ids == {i.message.message_id for i in instructions}
    assert len(receiver.requests) > 8  # retries happened, and changed nothing on the receiver's side


def test_a_dead_instruction_webhook_fails_the_cycle_and_the_operator_resends_it(admin_client) -> None:
    port = free_port()
    instructions = ring(3, f"http://127.0.0.1:{port}/hooks")
    cycle = Cycle.objects.get()
    for _ in range(outbox.MAX_ATTEMPTS):  # nobody ever listens: every attempt fails
        make_due()
        outbox.deliveries_send(limit=100)
    assert OutboxMessage.objects.filter(status="dead").count() == 3
    assert cycles_fail_undelivered() == [cycle.pk]
    assert cycles_watch() == []  # already failed: a second run does nothing
    cycle.refresh_from_db()
    assert cycle.state == CycleState.FAILED
    assert "failed" in admin_client.get(reverse("admin:settlement_cycle_changelist")).content.decode()

    receiver = Receiver(port)
    try:
        response = admin_client.post(
            reverse("admin:settlement_cycle_changelist"), {"action": "resend", "_selected_action": [cycle.pk]}
        )
        assert response.status_code == 302
        cycle.refresh_from_db()
        assert cycle.state == CycleState.INSTRUCTED
        make_due()
        assert outbox.deliveries_send(limit=100) == {"delivered": 3, "failed": 0, "dead": 0}
    finally:
        receiver.close()
    assert {json.loads(b)["data"]["instruction_id"] for _, b in receiver.requests} == {
        i.instruction_id for i in instructions
    }
    # Same webhook-ids as the first attempts: a receiver that saw one before drops it.
    assert {h["webhook-id"] for h, _ in receiver.requests} == {i.message.message_id for i in instructions}


def test_a_dead_webhook_of_an_already_settled_cycle_still_fails_it_for_the_operator() -> None:
    """A cycle whose payers paid is settled, but a receiver that was never told still needs the operator."""
    port = free_port()
    instructions = ring(3, f"http://127.0.0.1:{port}/hooks")
    cycle = Cycle.objects.get()
    Instruction.objects.filter(direction="pay").update(state="paid")
    Cycle.objects.filter(pk=cycle.pk).update(state=CycleState.SETTLED)  # as the payers' confirmations leave it
    for _ in range(outbox.MAX_ATTEMPTS):  # nobody ever listens
        make_due()
        outbox.deliveries_send(limit=100)
    assert OutboxMessage.objects.filter(status="dead").count() == len(instructions)

    assert cycles_fail_undelivered() == [cycle.pk]
    cycle.refresh_from_db()
    assert cycle.state == CycleState.FAILED
