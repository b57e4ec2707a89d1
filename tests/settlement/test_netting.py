"""The pure arithmetic: netting, largest-remainder splits, capture obligations, instructions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from settlement import netting
from settlement.netting import HUB, Gross, Instruction

A, B, C, D = 1, 2, 3, 4

# The worked example from the issue: six gross obligations among four institutions.
WORKED = [(A, B, 100), (B, C, 80), (C, A, 50), (A, D, 30), (D, B, 20), (C, D, 10)]


def test_worked_example_nets_to_four_positions():
    assert netting.net_positions(WORKED) == {A: -80, B: 40, C: 20, D: 20}


def test_worked_example_gives_four_instructions_through_the_hub():
    paid, carried = netting.instructions(netting.net_positions(WORKED), minimum_minor=1)
    assert paid == [
        Instruction(A, "pay", 80),
        Instruction(B, "receive", 40),
        Instruction(C, "receive", 20),
        Instruction(D, "receive", 20),
    ]
    assert carried == {}
    assert sum(i.amount_minor for i in paid if i.direction == "pay") == sum(
        i.amount_minor for i in paid if i.direction == "receive"
    )


def test_small_nets_are_carried_not_instructed():
    paid, carried = netting.instructions(netting.net_positions(WORKED), minimum_minor=25)
    assert paid == [Instruction(A, "pay", 80), Instruction(B, "receive", 40)]
    assert carried == {C: 20, D: 20}


def test_hub_position_is_never_instructed():
    positions = netting.net_positions([(A, HUB, 30), (HUB, B, 5), (C, B, 200)])
    assert positions == {A: -30, HUB: 25, B: 205, C: -200}
    paid, _ = netting.instructions(positions, minimum_minor=1)
    assert {i.institution for i in paid} == {A, B, C}


def test_objects_and_tuples_net_alike():
    assert netting.net_positions([Gross(A, B, 7)]) == netting.net_positions([(A, B, 7)]) == {A: -7, B: 7}


def test_negative_obligation_refused():
    with pytest.raises(ValueError):
        netting.net_positions([(A, B, -1)])


obligation_lists = st.lists(
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10**12)).filter(lambda t: t[0] != t[1]),
    max_size=200,
)


@given(obligation_lists)
def test_positions_sum_to_zero_and_equal_gross_in_minus_out(obligations):
    positions = netting.net_positions(obligations)
    assert sum(positions.values()) == 0
    gross_in, gross_out = netting.gross_totals(obligations)
    for party, net in positions.items():
        assert net == gross_in.get(party, 0) - gross_out.get(party, 0)


@given(obligation_lists, st.integers(0, 10**6))
def test_instructions_plus_carried_account_for_every_net(obligations, minimum):
    positions = netting.net_positions(obligations)
    paid, carried = netting.instructions(positions, minimum)
    assert len({i.institution for i in paid}) == len(paid)  # at most one instruction each
    assert not set(carried) & {i.institution for i in paid}
    signed = {i.institution: (i.amount_minor if i.direction == "receive" else -i.amount_minor) for i in paid}
    for party, net in positions.items():
        assert signed.get(party, 0) + carried.get(party, 0) == net
    assert all(abs(v) < minimum for v in carried.values())
    assert all(i.amount_minor >= max(minimum, 1) for i in paid)


@given(st.integers(0, 10**15), st.lists(st.integers(0, 10**12), min_size=1, max_size=50))
def test_largest_remainder_sums_exactly(total, weights):
    if sum(weights) == 0:
        total = 0
    parts = netting.largest_remainder_split(total, weights)
    assert sum(parts) == total
    whole = sum(weights) or 1
    for part, weight in zip(parts, weights, strict=True):
        exact_floor = total * weight // whole
        assert exact_floor <= part <= exact_floor + 1  # never more than one unit from the exact share
        if weight == 0:
            assert part == 0


def test_largest_remainder_ties_go_to_earlier_then_heavier():
    assert netting.largest_remainder_split(1, [1, 1, 1]) == [1, 0, 0]
    assert netting.largest_remainder_split(2, [1, 1, 1]) == [1, 1, 0]
    # 10 over 3:3:1 -> 4.29, 4.29, 1.43: remainders .29, .29, .43; one unit left, to the largest remainder.
    assert netting.largest_remainder_split(10, [3, 3, 1]) == [4, 4, 2]


def test_round_half_even():
    assert [netting.round_half_even_div(n, 2) for n in (1, 3, 5, 7)] == [0, 2, 2, 4]
    assert netting.round_half_even_div(14, 10) == 1
    assert netting.round_half_even_div(16, 10) == 2


def test_capture_obligations_split_the_rounded_total():
    # 3 issuers gave 1,500 + 1,500 + 1,000 points (mg x 1000) at 10 fen per 1,000 points: 40 fen in all.
    gross = netting.obligations_for_capture({A: 1_500_000, B: 1_500_000, C: 1_000_000}, D, 10)
    assert [(g.debtor, g.creditor, g.amount_minor) for g in gross] == [(A, D, 15), (B, D, 15), (C, D, 10)]


def test_capture_total_rounds_half_even_and_parts_add_up():
    # 250 points at 10 fen per 1,000 = 2.5 fen -> 2 (half to even); split 1:1 -> 1 + 1.
    gross = netting.obligations_for_capture({A: 125_000, B: 125_000}, D, 10)
    assert sum(g.amount_minor for g in gross) == 2


@given(st.dictionaries(st.integers(1, 30), st.integers(1, 10**10), min_size=1, max_size=10), st.integers(0, 10**4))
def test_capture_parts_always_sum_to_the_rounded_total(mg_by_issuer, price):
    gross = netting.obligations_for_capture(mg_by_issuer, 99, price)
    total = netting.round_half_even_div(sum(mg_by_issuer.values()) * price, netting.MG_PER_THOUSAND_POINTS)
    assert sum(g.amount_minor for g in gross) == total
    assert all(g.creditor == 99 and g.amount_minor > 0 for g in gross)
