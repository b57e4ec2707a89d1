"""A Hypothesis state machine over the ledger services alone: credit, consolidate, redeem (hold, then
capture or void), reverse (with debt when the points were spent), expire and seal, in any order.
After every step the books must agree with a plain Python model, conserve every issuer's points and
keep every account's sign, and ``ledger_check`` must find nothing."""

from __future__ import annotations

import base64
from collections import defaultdict
from datetime import date, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.db import connection, transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ledger.exceptions import InsufficientBalance
from ledger.models import NON_NEGATIVE_KINDS, Account
from ledger.selectors import blocks_verify, ledger_check
from ledger.services import AccountKey, TransferSpec, accounts_ensure, blocks_seal, lots_expire, transfers_post

ISSUERS = (1, 2, 3)
PERSONS = (10, 11)
SUBJECTS = ("aa" * 32, "bb" * 32)
MONTHS = (date(2029, 1, 31), date(2029, 2, 28), date(2029, 3, 31))
PROVIDER = 99
HOLDERS = [("person", p) for p in PERSONS] + [("subject", s) for s in SUBJECTS]

amounts = st.integers(min_value=1, max_value=5_000)


def make_signer():
    """A throwaway Ed25519 key: sealing is exercised here, not the hub's key management."""
    key = Ed25519PrivateKey.generate()
    public = "whpk_" + base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    return lambda message: ("test-key", public, key.sign(message))


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each example runs in a savepoint of the test's transaction and is rolled back at teardown.
        self.savepoint = transaction.savepoint()
        if connection.vendor == "postgresql":
            # Fire the deferred sum-to-zero trigger at each statement instead of at a commit that never comes.
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        self.expected: dict[str, int] = defaultdict(int)
        self.identities: dict[str, AccountKey] = {}
        self.ids: dict[str, int] = {}
        self.today = date(2029, 1, 1)
        self.serial = 0
        self.posted: list[TransferSpec] = []
        self.signer = make_signer()

    def teardown(self) -> None:
        transaction.savepoint_rollback(self.savepoint)

    # --- helpers ----------------------------------------------------------------------------------

    def account(self, key: AccountKey) -> int:
        if key.key not in self.ids:
            self.ids[key.key] = accounts_ensure(keys=[key])[key]
            self.identities[key.key] = key
        return self.ids[key.key]

    def post(self, kind: str, legs: list[tuple[AccountKey, int]]) -> None:
        self.serial += 1
        spec = TransferSpec(f"{kind}:{self.serial}", kind, [(self.account(k), amount) for k, amount in legs])
        result = transfers_post(transfers=[spec])
        assert list(result.created) == [spec.idempotency_key]
        for key, amount in legs:
            self.expected[key.key] += amount
        self.posted.append(spec)

    def lot(self, holder: tuple[str, object], issuer: int, month: date) -> AccountKey:
        kind, who = holder
        if kind == "person":
            return AccountKey.wallet_lot(person_id=int(who), issuer_id=issuer, expires_on=month)  # type: ignore[call-overload]
        return AccountKey.holding_lot(
            issuer_id=issuer, holder_institution_id=issuer, subject_ref=str(who), expires_on=month
        )

    def lots_of(self, holder: tuple[str, object], issuer: int | None = None) -> list[AccountKey]:
        """The holder's lots with points, soonest-expiring first."""
        found = [
            self.identities[k]
            for k, v in self.expected.items()
            if v > 0 and self.identities[k].kind in ("wallet_lot", "holding_lot")
        ]
        kind, who = holder
        mine = [
            k
            for k in found
            if (k.person_id == who if kind == "person" else (k.subject_ref == who and k.person_id is None))
            and (issuer is None or k.issuer_id == issuer)
        ]
        return sorted(mine, key=lambda k: (k.expires_on, k.issuer_id, k.key))

    def redeemed(self, issuer: int) -> AccountKey:
        return AccountKey.redeemed(provider_id=PROVIDER, issuer_id=issuer)

    # --- rules ------------------------------------------------------------------------------------

    @rule(
        issuer=st.sampled_from(ISSUERS), holder=st.sampled_from(HOLDERS), month=st.sampled_from(MONTHS), amount=amounts
    )
    def credit(self, issuer, holder, month, amount):
        outstanding = AccountKey.issuer_outstanding(issuer_id=issuer)
        self.post("credit", [(outstanding, -amount), (self.lot(holder, issuer, month), amount)])

    @rule(index=st.integers(min_value=0, max_value=1_000))
    def repeat_a_transfer(self, index):
        """Running a transfer twice posts it once."""
        if self.posted:
            spec = self.posted[index % len(self.posted)]
            assert transfers_post(transfers=[spec]).created == {}

    @rule(subject=st.sampled_from(SUBJECTS), person=st.sampled_from(PERSONS), issuer=st.sampled_from(ISSUERS))
    def consolidate(self, subject, person, issuer):
        """Linking: the subject's holding lots move to the person's wallet lots, keeping issuer and expiry."""
        legs: list[tuple[AccountKey, int]] = []
        for lot in self.lots_of(("subject", subject), issuer):
            assert lot.expires_on is not None
            amount = self.expected[lot.key]
            legs += [(lot, -amount), (self.lot(("person", person), issuer, lot.expires_on), amount)]
        if legs:
            self.post("consolidate", legs)

    @rule(person=st.sampled_from(PERSONS), amount=amounts, capture=st.booleans())
    def redeem(self, person, amount, capture):
        """Hold the soonest-expiring points (any issuer), then capture them or void back to the same lots."""
        self.serial += 1
        redemption = self.serial
        taken: list[tuple[AccountKey, int]] = []
        for lot in self.lots_of(("person", person)):
            if amount <= 0:
                break
            part = min(amount, self.expected[lot.key])
            taken.append((lot, part))
            amount -= part
        if not taken:
            return
        issuers = {lot.issuer_id for lot, _ in taken}
        holds = {i: AccountKey.redemption_hold(redemption_id=redemption, issuer_id=i) for i in issuers}
        self.post("hold", [leg for lot, part in taken for leg in ((lot, -part), (holds[lot.issuer_id], part))])
        if capture:
            self.post(
                "capture",
                [
                    leg
                    for lot, part in taken
                    for leg in ((holds[lot.issuer_id], -part), (self.redeemed(lot.issuer_id), part))
                ],
            )
        else:
            self.post("void", [leg for lot, part in taken for leg in ((holds[lot.issuer_id], -part), (lot, part))])

    @rule(issuer=st.sampled_from(ISSUERS), holder=st.sampled_from(HOLDERS), amount=amounts)
    def reverse(self, issuer, holder, amount):
        """The issuer takes back ``amount``: from the holder's lots first, the rest becomes the holder's debt."""
        legs: list[tuple[AccountKey, int]] = [(AccountKey.reversed(issuer_id=issuer), amount)]
        left = amount
        for lot in self.lots_of(holder, issuer):
            part = min(left, self.expected[lot.key])
            if part:
                legs.append((lot, -part))
                left -= part
        if left:
            kind, who = holder
            debt = (
                AccountKey.person_debt(person_id=int(who), issuer_id=issuer)  # type: ignore[call-overload]
                if kind == "person"
                else AccountKey.subject_debt(issuer_id=issuer, holder_institution_id=issuer, subject_ref=str(who))
            )
            legs.append((debt, -left))
        self.post("reverse", legs)

    @rule(holder=st.sampled_from(HOLDERS), extra=st.integers(min_value=1, max_value=100))
    def overdraw_is_refused(self, holder, extra):
        lots = self.lots_of(holder)
        if not lots:
            return
        lot = lots[0]
        sink = self.account(AccountKey.expired(issuer_id=lot.issuer_id))
        before = list(Account.objects.order_by("id").values_list("id", "balance"))
        self.serial += 1
        amount = self.expected[lot.key] + extra
        with pytest.raises(InsufficientBalance):
            transfers_post(
                transfers=[
                    TransferSpec(f"overdraw:{self.serial}", "forfeit", [(self.ids[lot.key], -amount), (sink, amount)])
                ]
            )
        assert list(Account.objects.order_by("id").values_list("id", "balance")) == before

    @rule(day=st.sampled_from([m + timedelta(days=d) for m in MONTHS for d in (-1, 0, 1)]))
    def expire(self, day):
        """Time moves on (never back) to around a month's end, where the boundary matters, and the sweep runs."""
        self.today = max(self.today, day)
        lots = [self.identities[k] for k, v in self.expected.items() if v > 0]
        due = [k.key for k in lots if k.expires_on is not None and k.expires_on < self.today]
        assert lots_expire(today=self.today) == len(due)
        for key in due:
            identity = self.identities[key]
            expired = AccountKey.expired(issuer_id=identity.issuer_id)
            self.account(expired)
            self.expected[expired.key] += self.expected[key]
            self.expected[key] = 0

    @rule()
    def seal(self):
        blocks_seal(signer=self.signer, max_entries=16)
        assert blocks_verify().problems == []

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def books_match_the_model(self):
        stored = {key: balance for key, balance in Account.objects.values_list("key", "balance") if balance}
        assert stored == {key: balance for key, balance in self.expected.items() if balance}

    @invariant()
    def every_issuer_is_conserved_and_signs_hold(self):
        per_issuer: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for kind, issuer, balance in Account.objects.values_list("kind", "issuer_id", "balance"):
            per_issuer[issuer][kind] += balance
            if kind in NON_NEGATIVE_KINDS:
                assert balance >= 0, (kind, issuer, balance)
            else:
                assert balance <= 0, (kind, issuer, balance)
        for kinds in per_issuer.values():
            held = sum(v for k, v in kinds.items() if k != "issuer_outstanding")
            assert -kinds["issuer_outstanding"] == held

    @invariant()
    def ledger_check_finds_nothing(self):
        assert ledger_check() == []


@pytest.mark.django_db
def test_ledger_state_machine():
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
