"""A Hypothesis state machine over the hub's own bookkeeping services (ledger.books): credit,
repeat a credit (a duplicate event), consolidate a subject into a person, reverse an earlier credit
(with a debt when its points are gone) and expire lots, in any order. After every step each issuer's
points are conserved, no lot is negative and ``ledger_check`` finds nothing."""

from __future__ import annotations

from collections import defaultdict
from datetime import date

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from institutions.selectors import points_validity_months
from ledger.books import Credit, credit_reverse, credits_post, holdings_consolidate
from ledger.models import NON_NEGATIVE_KINDS, Account
from ledger.selectors import ledger_check
from ledger.services import lots_expire

ISSUERS = (1, 2, 3)
PERSON = 10
SUBJECTS = ("aa" * 32, "bb" * 32)
DAYS = (date(2026, 1, 15), date(2026, 2, 15), date(2026, 3, 15))


class BooksMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.savepoint = transaction.savepoint()
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        self.next_inbox_id = 1
        self.credits: list[Credit] = []
        self.linked: dict[tuple[int, str], int] = {}  # (issuer, subject) -> person
        self.links = 0
        self.reversed: set[int] = set()

    def teardown(self) -> None:
        transaction.savepoint_rollback(self.savepoint)

    @rule(
        issuer=st.sampled_from(ISSUERS),
        subject=st.sampled_from(SUBJECTS),
        day=st.sampled_from(DAYS),
        milligrams=st.integers(min_value=0, max_value=500_000),
    )
    def credit(self, issuer, subject, day, milligrams):
        credit = Credit(self.next_inbox_id, issuer, self.linked.get((issuer, subject)), subject, day, milligrams)
        self.next_inbox_id += 1
        credits_post([credit], validity_months=points_validity_months(ISSUERS))
        self.credits.append(credit)

    @precondition(lambda self: bool(self.credits))
    @rule(data=st.data())
    def repeat_a_credit(self, data):
        before = dict(Account.objects.values_list("key", "balance"))
        credits_post([data.draw(st.sampled_from(self.credits))], validity_months=points_validity_months(ISSUERS))
        assert dict(Account.objects.values_list("key", "balance")) == before

    @rule(issuer=st.sampled_from(ISSUERS), subject=st.sampled_from(SUBJECTS))
    def link(self, issuer, subject):
        if (issuer, subject) in self.linked:
            return
        self.linked[(issuer, subject)] = PERSON
        self.links += 1
        holdings_consolidate(
            person_id=PERSON, institution_id=issuer, subject_ref=subject, duplicates={}, link_key=f"link:{self.links}"
        )
        assert not Account.objects.filter(
            kind="holding_lot", holder_institution_id=issuer, subject_ref=subject, balance__gt=0
        ).exists()

    @precondition(lambda self: bool(self.credits))
    @rule(data=st.data())
    def reverse(self, data):
        credit = data.draw(st.sampled_from(self.credits))
        reversal = credit_reverse(
            original_inbox_id=credit.inbox_event_id,
            issuer_id=credit.issuer_id,
            person_id=self.linked.get((credit.issuer_id, credit.subject_ref)),
            subject_ref=credit.subject_ref,
        )
        assert reversal.milligrams == credit.milligrams
        assert reversal.from_lots_mg + reversal.debt_mg == reversal.milligrams
        self.reversed.add(credit.inbox_event_id)

    @rule(today=st.sampled_from([date(2028, 2, 1), date(2028, 3, 1), date(2028, 4, 1)]))
    def expire(self, today):
        lots_expire(today=today)

    @invariant()
    def each_issuer_is_conserved(self):
        per_issuer: dict[int, int] = defaultdict(int)
        for issuer, balance in Account.objects.values_list("issuer_id", "balance"):
            per_issuer[issuer] += balance
        assert all(total == 0 for total in per_issuer.values()), per_issuer

    @invariant()
    def no_lot_is_negative(self):
        assert not Account.objects.filter(kind__in=NON_NEGATIVE_KINDS, balance__lt=0).exists()

    @invariant()
    def ledger_check_finds_nothing(self):
        assert ledger_check() == []


@pytest.mark.django_db
def test_books_conserve_points_through_any_sequence():
    run_state_machine_as_test(
        BooksMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
