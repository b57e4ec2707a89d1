"""Settlement services against the database: recording, cut-off, netting, carry-forward, transitions, digests."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.utils import DatabaseError

from institutions.models import Institution
from settlement.digest import obligation_canonical_line, obligation_lines, statement_digest
from settlement.exceptions import CycleOrder, IllegalCycleTransition, InvalidObligation, ObligationImmutable
from settlement.models import Cycle, CycleState, NetPosition, Obligation, SettlementPrice
from settlement.services import (
    ObligationSpec,
    cycle_cut,
    cycle_net,
    cycle_obligations,
    cycle_transition,
    obligations_for_redemption,
    obligations_record,
    price_in_force,
)

pytestmark = pytest.mark.django_db

T0 = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def banks() -> dict[str, int]:
    return {code: Institution.objects.create(code=f"bank-{code.lower()}", name=code).pk for code in "ABCD"}


def record_worked_example(banks: dict[str, int], *, at: datetime = T0) -> None:
    a, b, c, d = (banks[k] for k in "ABCD")
    for n, (debtor, creditor, amount) in enumerate(
        [(a, b, 100), (b, c, 80), (c, a, 50), (a, d, 30), (d, b, 20), (c, d, 10)]
    ):
        obligations_record(source=f"test:{n}", obligations=[ObligationSpec(debtor, creditor, amount)], now=at)


def test_seeded_price_is_ten_fen_per_thousand_points():
    price = price_in_force(at=T0)
    assert (price.fen_per_thousand_points, price.currency) == (10, "CNY")


def test_worked_example_cut_and_netted(banks):
    record_worked_example(banks)
    cycle = cycle_cut(now=T0 + timedelta(hours=1))
    assert cycle is not None and cycle.state == CycleState.CUT_OFF
    assert cycle.obligations.count() == 6
    cycle_net(cycle=cycle, minimum_minor=1)
    cycle.refresh_from_db()
    assert cycle.state == CycleState.NETTED
    nets = {p.institution_id: (p.net_minor, p.gross_in, p.gross_out) for p in NetPosition.objects.filter(cycle=cycle)}
    a, b, c, d = (banks[k] for k in "ABCD")
    assert nets == {a: (-80, 50, 130), b: (40, 120, 80), c: (20, 80, 60), d: (20, 40, 20)}
    assert not Obligation.objects.filter(cycle__isnull=True).exists()  # nothing carried


def test_late_obligations_roll_into_the_next_cycle(banks):
    a, b = banks["A"], banks["B"]
    obligations_record(source="early", obligations=[ObligationSpec(a, b, 500)], now=T0)
    obligations_record(source="late", obligations=[ObligationSpec(b, a, 300)], now=T0 + timedelta(hours=2))
    first = cycle_cut(now=T0 + timedelta(hours=1))
    assert first is not None
    assert [o.source for o in first.obligations.all()] == ["early"]
    second = cycle_cut(now=T0 + timedelta(hours=3))
    assert second is not None
    assert [o.source for o in second.obligations.all()] == ["late"]
    assert first.obligations.count() == 1  # the closed cycle was not edited
    assert cycle_cut(now=T0 + timedelta(hours=4)) is None  # nothing waiting: no empty cycle


def test_cut_off_must_move_forward(banks):
    obligations_record(source="x", obligations=[ObligationSpec(banks["A"], banks["B"], 5)], now=T0)
    cycle_cut(now=T0 + timedelta(hours=1))
    with pytest.raises(CycleOrder):
        cycle_cut(now=T0 + timedelta(hours=1))


def test_small_nets_carry_forward_into_the_next_cycle(banks):
    record_worked_example(banks)
    cycle = cycle_cut(now=T0 + timedelta(hours=1))
    assert cycle is not None
    positions = {p.institution_id: p for p in cycle_net(cycle=cycle, minimum_minor=25)}
    a, _b, c, d = (banks[k] for k in "ABCD")
    assert positions[c].carried_forward_minor == 20 and positions[c].instructed_minor == 0
    assert positions[a].carried_forward_minor == 0 and positions[a].instructed_minor == -80
    carries = Obligation.objects.filter(source=f"carry:cycle-{cycle.pk}", cycle__isnull=True)
    assert {(o.debtor_id, o.creditor_id, o.amount_minor) for o in carries} == {(None, c, 20), (None, d, 20)}
    # Next cycle: only the carries; C and D now clear the minimum with it together with new business.
    obligations_record(source="new", obligations=[ObligationSpec(a, c, 10)], now=T0 + timedelta(hours=2))
    nxt = cycle_cut(now=T0 + timedelta(hours=3))
    assert nxt is not None
    positions = {p.institution_id: p for p in cycle_net(cycle=nxt, minimum_minor=25)}
    assert positions[c].net_minor == 30 and positions[c].carried_forward_minor == 0
    assert positions[d].net_minor == 20 and positions[d].carried_forward_minor == 20
    assert positions[a].net_minor == -10 and positions[a].carried_forward_minor == -10


def test_cycles_net_in_order(banks):
    obligations_record(source="one", obligations=[ObligationSpec(banks["A"], banks["B"], 500)], now=T0)
    first = cycle_cut(now=T0 + timedelta(hours=1))
    assert first is not None
    obligations_record(
        source="two", obligations=[ObligationSpec(banks["A"], banks["B"], 500)], now=T0 + timedelta(hours=2)
    )
    second = cycle_cut(now=T0 + timedelta(hours=3))
    assert second is not None
    with pytest.raises(CycleOrder):
        cycle_net(cycle=second)
    cycle_net(cycle=first)
    cycle_net(cycle=second)


def test_transitions_follow_the_lifecycle_and_refuse_the_rest(banks):
    obligations_record(source="x", obligations=[ObligationSpec(banks["A"], banks["B"], 500)], now=T0)
    cycle = cycle_cut(now=T0 + timedelta(hours=1))
    assert cycle is not None
    with pytest.raises(IllegalCycleTransition) as refused:
        cycle_transition(cycle=cycle, to=CycleState.SETTLED)
    assert refused.value.code == "illegal-cycle-transition"
    with pytest.raises(IllegalCycleTransition):
        cycle_transition(cycle=cycle, to=CycleState.OPEN)
    cycle_net(cycle=cycle)
    with pytest.raises(IllegalCycleTransition):
        cycle_net(cycle=cycle)  # netting twice is refused
    for state in (
        CycleState.INSTRUCTED,
        CycleState.FAILED,
        CycleState.INSTRUCTED,
        CycleState.SETTLED,
        CycleState.RECONCILED,
    ):
        cycle_transition(cycle=cycle, to=state)
    for value in CycleState.values:
        with pytest.raises(IllegalCycleTransition):
            cycle_transition(cycle=cycle, to=value)  # reconciled is final
    assert Cycle.objects.get(pk=cycle.pk).state == CycleState.RECONCILED


def test_recording_is_idempotent_and_refuses_a_changed_amount(banks):
    a, b = banks["A"], banks["B"]
    first = obligations_record(source="redemption:1", obligations=[ObligationSpec(a, b, 40)], now=T0)
    again = obligations_record(source="redemption:1", obligations=[ObligationSpec(a, b, 40)], now=T0)
    assert [o.pk for o in first] == [o.pk for o in again]
    with pytest.raises(ObligationImmutable):
        obligations_record(source="redemption:1", obligations=[ObligationSpec(a, b, 41)], now=T0)
    with pytest.raises(InvalidObligation):
        obligations_record(source="bad", obligations=[ObligationSpec(a, a, 1)])
    with pytest.raises(InvalidObligation):
        obligations_record(source="bad", obligations=[ObligationSpec(a, b, 0)])
    assert Obligation.objects.count() == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the append-only trigger is PostgreSQL's")
def test_database_refuses_editing_an_obligation(banks):
    [o] = obligations_record(source="x", obligations=[ObligationSpec(banks["A"], banks["B"], 40)], now=T0)
    with pytest.raises(DatabaseError), transaction.atomic():
        Obligation.objects.filter(pk=o.pk).update(amount_minor=1)
    with pytest.raises(DatabaseError), transaction.atomic():
        Obligation.objects.filter(pk=o.pk).delete()
    cycle = cycle_cut(now=T0 + timedelta(hours=1))  # the one allowed write: cycle set once, from NULL
    assert cycle is not None
    other = Cycle.objects.create(cut_off_at=T0 + timedelta(hours=5))
    with pytest.raises(DatabaseError), transaction.atomic():
        Obligation.objects.filter(pk=o.pk).update(cycle=other)
    assert Obligation.objects.get(pk=o.pk).cycle_id == cycle.pk


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the append-only trigger is PostgreSQL's")
def test_the_cut_may_only_set_the_cycle_and_a_cycle_with_obligations_stays(banks):
    [o] = obligations_record(source="x", obligations=[ObligationSpec(banks["A"], banks["B"], 40)], now=T0)
    cycle = Cycle.objects.create(cut_off_at=T0 + timedelta(hours=1))
    # Setting the cycle together with anything else is not the cut's write: refused.
    with pytest.raises(DatabaseError), transaction.atomic():
        Obligation.objects.filter(pk=o.pk).update(cycle=cycle, amount_minor=41)
    with pytest.raises(DatabaseError), transaction.atomic():
        Obligation.objects.filter(pk=o.pk).update(cycle=cycle, source="y")
    assert Obligation.objects.filter(pk=o.pk).update(cycle=cycle) == 1
    with pytest.raises(DatabaseError, match="has obligations"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM settlement_cycle WHERE id = %s", [cycle.pk])
    empty = Cycle.objects.create(cut_off_at=T0 + timedelta(hours=2))
    empty.delete()  # a cycle nothing names (a cut that lost a race) still can be


def test_redemption_obligations_at_the_price_in_force(banks):
    a, b, d = banks["A"], banks["B"], banks["D"]
    SettlementPrice.objects.create(fen_per_thousand_points=12, valid_from=T0 - timedelta(days=1))
    rows = obligations_for_redemption(redemption_id=7, provider_id=d, mg_by_issuer={a: 2_000_000, b: 500_000}, at=T0)
    assert [(o.debtor_id, o.creditor_id, o.amount_minor, o.points_mg) for o in rows] == [
        (a, d, 24, 2_000_000),
        (b, d, 6, 500_000),
    ]
    assert rows[0].price is not None
    assert rows[0].price.fen_per_thousand_points == 12


def test_digest_is_stable_under_reordering_and_sensitive_to_amounts(banks):
    record_worked_example(banks)
    cycle = cycle_cut(now=T0 + timedelta(hours=1))
    assert cycle is not None
    obligations = cycle_obligations(cycle=cycle)
    digest = statement_digest(obligation_lines(obligations))
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    for _ in range(5):
        shuffled = obligations[:]
        random.shuffle(shuffled)
        assert statement_digest(obligation_lines(shuffled)) == digest
    changed = obligations[:]
    changed[0] = Obligation(
        **{
            **{f.attname: getattr(changed[0], f.attname) for f in Obligation._meta.concrete_fields},
            "amount_minor": changed[0].amount_minor + 1,
        }
    )
    assert statement_digest(obligation_lines(changed)) != digest
    mine = [o for o in obligations if banks["A"] in (o.debtor_id, o.creditor_id)]
    assert len(mine) == 3 and statement_digest(obligation_lines(mine)) != digest


def test_settlement_run_command(banks):
    record_worked_example(banks, at=datetime.now(UTC) - timedelta(minutes=1))
    out = io.StringIO()
    call_command("settlement_run", "--minimum-minor", "1", stdout=out)
    text = out.getvalue()
    assert "pay 80" in text and text.count("receive") == 3 and "instructed: 4 instruction(s)" in text
    out = io.StringIO()
    call_command("settlement_run", stdout=out)
    assert "Nothing to settle." in out.getvalue()


def test_a_source_that_could_break_the_digest_is_refused(banks):
    a, b = banks["A"], banks["B"]
    for source in ("correction:a|b", "line\nbreak", "", "x" * 65):
        with pytest.raises(InvalidObligation):
            obligations_record(source=source, obligations=[ObligationSpec(a, b, 5)])
    assert not Obligation.objects.exists()


def test_digest_lines_name_parties_by_code_and_the_hub_by_none(banks):
    a, b = banks["A"], banks["B"]
    [owed] = obligations_record(source="x", obligations=[ObligationSpec(a, b, 40)], now=T0)
    [carry] = obligations_record(source="carry:cycle-0", obligations=[ObligationSpec(None, a, 3)], now=T0)
    lines = obligation_lines([owed, carry])
    assert [(x["debtor"], x["creditor"]) for x in lines] == [("bank-a", "bank-b"), (None, "bank-a")]
    assert obligation_canonical_line(lines[1]) == f"{carry.pk}|carry:cycle-0||bank-a|3|CNY"
    assert statement_digest(lines) == statement_digest(obligation_lines([carry, owed]))


def test_carry_forwards_alone_make_no_cycle(banks):
    a, b = banks["A"], banks["B"]
    obligations_record(source="small", obligations=[ObligationSpec(a, b, 5)], now=T0)
    cycle = cycle_cut(now=T0 + timedelta(hours=1))
    assert cycle is not None
    cycle_net(cycle=cycle, minimum_minor=100)  # both nets carried forward
    assert Obligation.objects.filter(cycle__isnull=True).count() == 2
    assert cycle_cut(now=T0 + timedelta(hours=2)) is None  # nothing new: no cycle of carries alone
    obligations_record(source="more", obligations=[ObligationSpec(b, a, 1)], now=T0 + timedelta(hours=3))
    nxt = cycle_cut(now=T0 + timedelta(hours=4))
    assert nxt is not None and nxt.obligations.count() == 3  # the carries ride along with new business
