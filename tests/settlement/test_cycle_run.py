"""The whole run: cut, net, instruct, with the webhooks, statements, carries, closed cycles and beat."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime, time, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from clearinghouse.celery import app as celery_app
from institutions.models import OutboxMessage
from settlement.exceptions import IllegalCycleTransition
from settlement.models import Cycle, CycleState, Instruction, NetPosition, Obligation
from settlement.services import (
    ObligationSpec,
    cycle_instruct,
    cycle_net,
    cycle_run,
    obligations_record,
    value_date_for,
)
from settlement.tasks import settlement_run_daily
from settlement.webhooks import instruction_webhook_data
from tests.settlement.conftest import CUT, T0, WORKED, bearer, canonical_digest, record

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)

CONTRACT_FIELDS = {
    "instruction_id",
    "cycle_id",
    "direction",
    "amount_minor",
    "currency",
    "value_date",
    "statement_digest",
}


def statement(client, sender, cycle_id: int) -> dict:
    response = client.get(
        f"/api/v1/institutions/{sender.code}/settlements", {"cycle": cycle_id}, headers=bearer(sender)
    )
    assert response.status_code == 200, response.content
    (only,) = response.json()["results"]
    return only


def test_worked_example_through_the_full_run(client, senders):
    record(senders, WORKED)
    out = io.StringIO()
    call_command("settlement_run", "--now", CUT.isoformat(), "--minimum-minor", "1", stdout=out)
    cycle = Cycle.objects.get()
    assert cycle.state == CycleState.INSTRUCTED

    nets = {p.institution.code: p.net_minor for p in NetPosition.objects.filter(cycle=cycle)}
    assert nets == {"bank-a": -80, "bank-b": 40, "bank-c": 20, "bank-d": 20}
    instructions = {i.institution.code: i for i in Instruction.objects.filter(cycle=cycle)}
    assert {code: (i.direction, i.amount_minor) for code, i in instructions.items()} == {
        "bank-a": ("pay", 80),
        "bank-b": ("receive", 40),
        "bank-c": ("receive", 20),
        "bank-d": ("receive", 20),
    }
    assert all(i.value_date == date(2030, 3, 4) for i in instructions.values())  # Friday's cut, paid Monday

    # One webhook per instruction, carrying exactly the contract's fields.
    messages = OutboxMessage.objects.filter(type="carbon.settlement.instruction")
    assert messages.count() == 4
    for code, instruction in instructions.items():
        event = json.loads(instruction.message.body)
        assert instruction.message.institution.code == code
        assert event["type"] == "carbon.settlement.instruction" and event["id"] == instruction.message.message_id
        assert set(event["data"]) == CONTRACT_FIELDS
        assert event["data"] == instruction_webhook_data(instruction)
        assert event["data"]["cycle_id"] == cycle.pk and event["data"]["value_date"] == "2030-03-04"
        assert instruction.instruction_id.startswith("ins_")

    # Each digest recomputes from the obligations the institution's own statement lists.
    line_counts = {}
    for name, sender in senders.items():
        body = statement(client, sender, cycle.pk)
        instruction = instructions[sender.code]
        lines = body["obligations"]["lines"]
        line_counts[name] = len(lines)
        assert canonical_digest(lines) == body["obligations"]["digest"] == instruction.statement_digest
        assert body["instruction"]["statement_digest"] == instruction.statement_digest
        assert body["instruction"]["instruction_id"] == instruction.instruction_id
        assert (
            sum(x["amount_minor"] for x in lines if x["creditor"] == sender.code)
            == body["obligations"]["gross_in_minor"]
        )
        assert body["net_minor"] == nets[sender.code]
        assert (body["opening_minor"], body["closing_minor"]) == (0, 0)
    assert line_counts == {"A": 3, "B": 3, "C": 3, "D": 3}

    text = out.getvalue()
    assert "bank-a" in text and "pay 80 ins_" in text and text.count("receive") == 3
    assert "instructed: 4 instruction(s), value date 2030-03-04" in text


def test_under_the_minimum_no_instruction_and_the_amount_opens_the_next_cycle(client, senders):
    record(senders, WORKED)
    first = cycle_run(now=CUT, minimum_minor=25)
    assert first is not None
    assert {i.institution.code: (i.direction, i.amount_minor) for i in first.instructions} == {
        "bank-a": ("pay", 80),
        "bank-b": ("receive", 40),
    }
    c_first = statement(client, senders["C"], first.cycle.pk)
    assert c_first["instruction"] is None and (c_first["net_minor"], c_first["closing_minor"]) == (20, 20)

    # Next cycle: A owes C 10 more; C's 20 carried in plus 10 clears the minimum, D's 20 carries again.
    record(senders, [("A", "C", 10)], at=CUT + timedelta(hours=1), tag="later")
    second = cycle_run(now=CUT + timedelta(hours=2), minimum_minor=25)
    assert second is not None
    c_second = statement(client, senders["C"], second.cycle.pk)
    assert c_second["opening_minor"] == c_first["closing_minor"] == 20
    assert c_second["net_minor"] == 30 and c_second["closing_minor"] == 0
    assert c_second["instruction"]["direction"] == "receive" and c_second["instruction"]["amount_minor"] == 30
    carry = [x for x in c_second["obligations"]["lines"] if x["source"] == f"carry:cycle-{first.cycle.pk}"]
    assert [(x["debtor"], x["creditor"], x["amount_minor"]) for x in carry] == [(None, "bank-c", 20)]
    assert canonical_digest(c_second["obligations"]["lines"]) == c_second["instruction"]["statement_digest"]

    d_second = statement(client, senders["D"], second.cycle.pk)
    assert (d_second["opening_minor"], d_second["net_minor"], d_second["closing_minor"]) == (20, 20, 20)
    assert d_second["instruction"] is None
    a_second = statement(client, senders["A"], second.cycle.pk)
    assert (a_second["opening_minor"], a_second["net_minor"], a_second["closing_minor"]) == (0, -10, -10)
    assert {i.institution.code for i in second.instructions} == {"bank-c"}


def test_everything_carried_means_nothing_to_confirm(senders):
    record(senders, WORKED)
    run = cycle_run(now=CUT, minimum_minor=1000)
    assert run is not None and run.instructions == []
    assert run.cycle.state == CycleState.RECONCILED  # no instruction waits for a confirmation
    assert Obligation.objects.filter(cycle__isnull=True, source__startswith="carry:").count() == 4


def test_a_closed_cycle_is_never_edited_and_late_obligations_land_in_the_next(client, senders):
    record(senders, WORKED)
    first = cycle_run(now=CUT, minimum_minor=1)
    assert first is not None
    before = {name: statement(client, s, first.cycle.pk) for name, s in senders.items()}

    # Late: recorded after the cut although its business time is before it; and a correction of A->B.
    record(senders, [("B", "A", 7)], at=T0, tag="late")
    a, b = senders["A"].institution.pk, senders["B"].institution.pk
    obligations_record(source="correction:cycle-1-a-b", obligations=[ObligationSpec(a, b, 3)], now=CUT + HOUR)
    with pytest.raises(IllegalCycleTransition):
        cycle_net(cycle=first.cycle)
    with pytest.raises(IllegalCycleTransition):
        cycle_instruct(cycle=first.cycle)
    second = cycle_run(now=CUT + 2 * HOUR, minimum_minor=1)
    assert second is not None
    assert sorted(second.cycle.obligations.values_list("source", flat=True)) == ["correction:cycle-1-a-b", "late:0"]

    after = {name: statement(client, s, first.cycle.pk) for name, s in senders.items()}
    assert after == before  # the first cycle's statements, digests and figures did not move
    assert first.cycle.obligations.count() == 6


def test_the_daily_task_runs_the_same_service_and_is_safe_to_repeat(senders):
    record(senders, [(d, c, amount * 100) for d, c, amount in WORKED], at=timezone.now() - timedelta(minutes=1))
    cycle_id = settlement_run_daily()
    assert cycle_id is not None
    cycle = Cycle.objects.get(pk=cycle_id)
    assert cycle.state == CycleState.INSTRUCTED and cycle.instructions.count() == 4  # minimum is 100 by default
    assert settlement_run_daily() is None
    assert Cycle.objects.count() == 1 and Instruction.objects.count() == 4


def test_beat_runs_the_daily_cut_on_the_settlement_queue(settings):
    entries = {entry["task"]: entry for entry in celery_app.conf.beat_schedule.values()}
    daily = entries["settlement.tasks.settlement_run_daily"]["schedule"]
    assert len(daily.day_of_week) == 7 and len(daily.day_of_month) == 31  # every day, once
    local = time.fromisoformat(settings.HUB_SETTLEMENT_CUT_OFF_TIME)  # beat counts in the standard's zone
    assert (daily.hour, daily.minute) == ({local.hour}, {local.minute})
    assert celery_app.conf.timezone == settings.HUB_STANDARD_TIMEZONE
    assert "settlement.tasks.cycles_watch" in entries
    assert celery_app.amqp.router.route({}, "settlement.tasks.settlement_run_daily")["queue"].name == "settlement"


@pytest.mark.parametrize(
    ("cut_off", "days", "value_date"),
    [
        (datetime(2030, 3, 1, 12, 0, tzinfo=UTC), 1, date(2030, 3, 4)),  # Friday 20:00 local -> Monday
        (datetime(2030, 3, 1, 17, 0, tzinfo=UTC), 1, date(2030, 3, 4)),  # Saturday 01:00 local -> Monday
        (datetime(2030, 3, 3, 15, 0, tzinfo=UTC), 1, date(2030, 3, 4)),  # Sunday 23:00 local -> Monday
        (datetime(2030, 3, 4, 2, 0, tzinfo=UTC), 1, date(2030, 3, 5)),  # Monday -> Tuesday
        (datetime(2030, 3, 4, 2, 0, tzinfo=UTC), 5, date(2030, 3, 11)),  # a week of business days
        (datetime(2030, 3, 4, 2, 0, tzinfo=UTC), 0, date(2030, 3, 4)),  # same day
    ],
)
def test_value_date_counts_business_days_in_the_standard_time_zone(cut_off, days, value_date):
    assert value_date_for(cut_off, business_days=days) == value_date


def test_instruction_webhooks_exist_only_with_their_instructions(senders):
    record(senders, WORKED)
    cycle = cycle_run(now=CUT, minimum_minor=1)
    assert cycle is not None
    assert set(Instruction.objects.values_list("message_id", flat=True)) == set(
        OutboxMessage.objects.values_list("pk", flat=True)
    )
    with pytest.raises(IllegalCycleTransition):
        cycle_instruct(cycle=cycle.cycle)  # a second instruct writes nothing
    assert OutboxMessage.objects.count() == Instruction.objects.count() == 4


@pytest.mark.parametrize("value", ["yesterday", "2030-03-01T13:00:00"])
def test_settlement_run_wants_an_instant_with_an_offset(senders, value):
    record(senders, WORKED)
    with pytest.raises(CommandError, match="offset"):
        call_command("settlement_run", "--now", value, stdout=io.StringIO())
    assert not Cycle.objects.exists()
