"""Confirmations through the real signed intake and dispatcher: paid, received, disputed, refused."""

from __future__ import annotations

from datetime import timedelta

import pytest

from settlement.models import Confirmation, Cycle, CycleState, Instruction, InstructionState
from settlement.services import ConfirmationIn, confirmations_record, cycle_run
from tests.settlement.conftest import CUT, WORKED, bearer, confirmed_event, outcome, record

pytestmark = pytest.mark.django_db


@pytest.fixture
def instructed(senders) -> dict[str, Instruction]:
    """The worked example, run: A pays 80; B, C and D receive 40, 20 and 20. By sender name."""
    record(senders, WORKED)
    run = cycle_run(now=CUT, minimum_minor=1)
    assert run is not None and run.cycle.state == CycleState.INSTRUCTED
    by_code = {i.institution.code: i for i in run.instructions}
    return {name: by_code[sender.code] for name, sender in senders.items()}


def cycle_state(instruction: Instruction) -> str:
    return Cycle.objects.get(pk=instruction.cycle_id).state


def test_payer_paid_settles_and_every_receiver_received_reconciles(client, senders, instructed, deliver):
    (row,) = deliver(senders["A"], confirmed_event(instructed["A"].instruction_id, "paid", "CN-TRX-0001"))
    assert outcome(row) == {
        "confirmed": True,
        "instruction_id": instructed["A"].instruction_id,
        "status": "paid",
        "instruction_state": "paid",
        "cycle_id": instructed["A"].cycle_id,
        "cycle_state": "settled",  # every pay instruction is paid: all money owed to the hub came in
    }
    for name in "BC":
        deliver(senders[name], confirmed_event(instructed[name].instruction_id, "received", f"IN-{name}"))
        assert cycle_state(instructed[name]) == CycleState.SETTLED  # D has not confirmed yet
    (last,) = deliver(senders["D"], confirmed_event(instructed["D"].instruction_id, "received", "IN-D"))
    assert outcome(last)["cycle_state"] == "reconciled"
    assert dict(Instruction.objects.values_list("institution__code", "state")) == {
        "bank-a": "paid",
        "bank-b": "received",
        "bank-c": "received",
        "bank-d": "received",
    }
    assert Confirmation.objects.get(instruction=instructed["A"]).reference == "CN-TRX-0001"

    # The institution follows its event, and sees the confirmation on its statement.
    followed = client.get(f"/api/v1/institutions/bank-a/events/{row.event_id}", headers=bearer(senders["A"]))
    assert followed.json()["status"] == "processed" and followed.json()["outcome"]["cycle_state"] == "settled"
    body = client.get("/api/v1/institutions/bank-d/settlements", headers=bearer(senders["D"])).json()
    (statement,) = body["results"]
    assert statement["cycle_state"] == "reconciled"
    assert statement["confirmation"]["status"] == "received" and statement["confirmation"]["reference"] == "IN-D"
    assert statement["instruction"]["state"] == "received"


def test_receivers_first_then_the_payer_goes_straight_to_reconciled(senders, instructed, deliver):
    for name in "BCD":
        deliver(senders[name], confirmed_event(instructed[name].instruction_id, "received"))
    assert cycle_state(instructed["A"]) == CycleState.INSTRUCTED  # the hub has not been paid yet
    (row,) = deliver(senders["A"], confirmed_event(instructed["A"].instruction_id, "paid"))
    assert outcome(row)["cycle_state"] == "reconciled"


def test_a_dispute_is_flagged_and_a_later_confirmation_resolves_it(admin_client, senders, instructed, deliver):
    deliver(senders["A"], confirmed_event(instructed["A"].instruction_id, "paid"))
    (row,) = deliver(senders["C"], confirmed_event(instructed["C"].instruction_id, "disputed", "expected 25"))
    assert outcome(row)["instruction_state"] == "disputed" and outcome(row)["cycle_state"] == "disputed"

    flagged = admin_client.get("/admin/settlement/instruction/", {"needs_operator": "yes"})
    assert flagged.status_code == 200
    listed = [i.instruction_id for i in flagged.context["cl"].result_list]
    assert listed == [instructed["C"].instruction_id]
    assert "disputed" in admin_client.get("/admin/settlement/cycle/").content.decode()

    # The operator settles it with C out of band; C confirms the receipt; the others follow.
    for name, status in (("C", "received"), ("B", "received"), ("D", "received")):
        deliver(senders[name], confirmed_event(instructed[name].instruction_id, status))
    assert cycle_state(instructed["C"]) == CycleState.RECONCILED
    states = list(Confirmation.objects.filter(instruction=instructed["C"]).values_list("status", flat=True))
    assert states == ["disputed", "received"]  # every confirmation is kept


def test_a_dispute_withdrawn_before_the_payer_paid_puts_the_cycle_back_to_instructed(senders, instructed, deliver):
    (row,) = deliver(senders["C"], confirmed_event(instructed["C"].instruction_id, "disputed", "expected 25"))
    assert outcome(row)["cycle_state"] == "disputed"
    # Resolved with the operator, C confirms; A has not paid yet, so the cycle is simply instructed again.
    (row,) = deliver(senders["C"], confirmed_event(instructed["C"].instruction_id, "received"))
    assert outcome(row)["cycle_state"] == "instructed"
    deliver(senders["A"], confirmed_event(instructed["A"].instruction_id, "paid"))
    assert cycle_state(instructed["A"]) == CycleState.SETTLED


def test_another_institutions_instruction_is_refused_like_an_unknown_one(senders, instructed, deliver):
    (row,) = deliver(senders["B"], confirmed_event(instructed["A"].instruction_id, "paid", "not mine"))
    assert outcome(row) == {"confirmed": False, "reason": "unknown_instruction"}
    instructed["A"].refresh_from_db()
    assert instructed["A"].state == InstructionState.SENT and not Confirmation.objects.exists()
    assert cycle_state(instructed["A"]) == CycleState.INSTRUCTED


def test_an_unknown_instruction_id_is_a_failed_outcome_not_a_crash(client, senders, instructed, deliver):
    (row,) = deliver(senders["A"], confirmed_event("ins_" + "0" * 32, "paid"))
    assert outcome(row) == {"confirmed": False, "reason": "unknown_instruction"}
    followed = client.get(f"/api/v1/institutions/bank-a/events/{row.event_id}", headers=bearer(senders["A"]))
    assert followed.json()["outcome"] == {"confirmed": False, "reason": "unknown_instruction"}
    assert row.attempts == 1 and not Confirmation.objects.exists()


@pytest.mark.parametrize(("name", "status"), [("A", "received"), ("B", "paid")])
def test_a_status_must_fit_the_direction(senders, instructed, deliver, name, status):
    (row,) = deliver(senders[name], confirmed_event(instructed[name].instruction_id, status))
    assert outcome(row) == {"confirmed": False, "reason": "status_mismatch"}
    assert not Confirmation.objects.exists()


def test_a_reconciled_cycle_takes_no_more_confirmations(senders, instructed, deliver):
    deliver(senders["A"], confirmed_event(instructed["A"].instruction_id, "paid"))
    for name in "BCD":
        deliver(senders[name], confirmed_event(instructed[name].instruction_id, "received"))
    (late,) = deliver(senders["B"], confirmed_event(instructed["B"].instruction_id, "disputed"))
    assert outcome(late) == {"confirmed": False, "reason": "cycle_reconciled"}
    assert cycle_state(instructed["B"]) == CycleState.RECONCILED
    assert Confirmation.objects.count() == 4


def test_a_batch_of_confirmations_in_one_request_applies_in_order(senders, instructed, deliver):
    rows = deliver(
        senders["A"],
        confirmed_event(instructed["A"].instruction_id, "disputed", "wrong amount"),
        confirmed_event(instructed["A"].instruction_id, "paid", "TRX-2"),
    )
    assert [outcome(r)["instruction_state"] for r in rows] == ["disputed", "paid"]
    assert [outcome(r)["cycle_state"] for r in rows] == ["disputed", "settled"]


def test_a_resent_event_is_one_confirmation(client, senders, instructed, deliver):
    event = confirmed_event(instructed["A"].instruction_id, "paid", event_id="conf-1")
    deliver(senders["A"], event)
    deliver(senders["A"], event)  # the institution's retry: a duplicate at the intake
    assert Confirmation.objects.count() == 1


def test_recording_is_idempotent_per_inbox_event(senders, instructed, deliver):
    (row,) = deliver(senders["B"], confirmed_event(instructed["B"].instruction_id, "received", "R-1"))
    again = ConfirmationIn(
        inbox_event_id=row.pk,
        institution_id=senders["B"].institution.pk,
        instruction_id=instructed["B"].instruction_id,
        status="received",
        reference="R-1",
    )
    # A crash after the handler but before the dispatcher recorded the outcome hands the event over again.
    assert confirmations_record(confirmations=[again])[0]["confirmed"] is True
    assert Confirmation.objects.count() == 1


def test_the_cycle_admin_pages_cost_the_same_queries_however_many_institutions(admin_client, senders):
    """The cycle list counts per row, and the change page loads the institutions with their positions and
    instructions: the same number of queries for a cycle of four institutions as for one of eight."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.conftest import make_sender

    record(senders, WORKED)
    small = cycle_run(now=CUT, minimum_minor=1)
    more = {**senders, **{name: make_sender(f"bank-{name.lower()}") for name in "EFGH"}}
    record(more, [*WORKED, ("E", "F", 7), ("F", "G", 9), ("G", "H", 11), ("H", "E", 3)], tag="later")
    large = cycle_run(now=CUT + timedelta(hours=1), minimum_minor=1)
    assert small is not None and large is not None

    def queries(url: str) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(url).status_code == 200
        return len(captured)

    change = "/admin/settlement/cycle/{}/change/"
    queries(change.format(small.cycle.pk))  # the first page of a session also loads the session and caches
    assert queries(change.format(small.cycle.pk)) == queries(change.format(large.cycle.pk))
    listing = admin_client.get("/admin/settlement/cycle/").content.decode()
    # The counts shown: 6 obligations and 4 instructions, then 10 and 8.
    assert '<td class="field-obligation_count">6</td>' in listing
    assert '<td class="field-obligation_count">10</td>' in listing
