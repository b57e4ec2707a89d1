"""Design overview: settlement turns spent points into money owed, nets it, and settles it through the hub.

Money is integer minor units (fen) with a currency code; never floats. Points are the ledger's
milligrams CO2e (1 point = 1,000 mg).

Spending points (two-phase, DESIGN.md "Ledger"):

    Reward                a provider's offer: ``points`` per unit, optional ``stock`` and per-person
                          limit, an active window;
    Redemption            a person's request for a reward: ``pending`` while its points sit in
                          ``redemption_hold`` accounts, then ``fulfilled`` (captured to ``redeemed``)
                          or voided back (``rejected``, ``expired``, ``voided``);
    RedemptionAllocation  where a pending redemption's points came from: one row per wallet lot,
                          so a void returns every milligram to the very lot it left;
    RedemptionRequest     the first answer under a person's ``Idempotency-Key``, replayed for repeats.

Each capture records the gross obligations "issuer owes provider" for the points taken from that
issuer's lots, at the price in force, split by largest remainder (``netting.obligations_for_capture``).

    SettlementPrice   the scheme's price, fen per 1,000 points, versioned by ``valid_from``;
    Obligation        one immutable gross obligation: ``debtor`` owes ``creditor`` ``amount_minor``.
                      A null party is the hub itself as central counterparty (carry-forward only);
    Cycle             a settlement period, closed by its cut-off; states move only by ``cycle_transition``;
    NetPosition       per cycle and institution: gross in, gross out, net, and what was carried forward;
    Instruction       per cycle and institution at most one: pay the hub, or be paid by it; sent as a
                      signed ``carbon.settlement.instruction`` webhook written in the same transaction;
    Confirmation      the institution's ``carbon.settlement.confirmed`` (paid, received or disputed).

A cycle's states, each entered by a real event (``settlement.services``):
    open        created by a cut, for the instant it takes to assign its obligations;
    cut_off     its obligations are fixed (everything unassigned created at or before the cut-off);
    netted      one NetPosition per institution is stored; nets under the minimum carried forward;
    instructed  the instructions and their webhooks are written (zero instructions is allowed);
    settled     every ``pay`` instruction is confirmed ``paid``: all money owed to the hub came in;
    reconciled  every instruction is confirmed: ``pay`` ones ``paid`` and ``receive`` ones ``received``,
                so both sides agree on every figure. Final: later confirmations are refused;
    disputed    some instruction's latest confirmation is ``disputed`` (flagged for the operator); once
                no instruction is disputed any more (the disputing institution confirmed again after the
                operator resolved it) it moves by the rules above, or back to instructed if some payer
                has not paid yet;
    failed      an instruction's webhook died undelivered (``cycles_fail_undelivered``, watching
                instructed, settled and disputed cycles: a settled cycle's receiver may never have
                been told); the operator resends it and the cycle is instructed again, and moves on
                as its confirmations justify.
A cycle moves as far as its confirmations justify at once: one with no ``pay`` instruction is settled
as soon as it is instructed, one with no instruction at all is reconciled.

Invariants (services check them; PostgreSQL enforces what a constraint or trigger can):
    1. an obligation is never edited or deleted; a correction is a new obligation (trigger). The one
       write it takes is being assigned to a cycle at cut-off: ``cycle`` set once, from NULL;
    2. an obligation belongs to at most one cycle, and a cycle past ``cut_off`` gains no obligations;
    3. the net positions of a cycle (hub included) sum to zero, and each equals gross in - gross out;
    4. each institution gets at most one instruction per cycle (unique), for exactly the part of its net
       not carried forward; nets under the minimum roll forward as a carry-forward obligation with the
       hub, so nothing is lost;
    5. an instruction exists if and only if its webhook does (one transaction); confirmations are only
       ever added, one per inbox event (unique);
    6. a redemption's allocations sum to its points x 1,000 mg; it leaves ``pending`` once, by exactly
       one ledger transfer (``redemption:<id>:capture`` or ``:void``), under its row lock;
    7. a reward's stock counts held and captured units as taken; a void gives them back.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from django.db import models
from django.db.models import F, Q
from django.utils import timezone

CURRENCY = "CNY"


class SettlementPrice(models.Model):
    """What the scheme pays for points, in fen per 1,000 points, from ``valid_from`` on."""

    fen_per_thousand_points = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3, default=CURRENCY)
    valid_from = models.DateTimeField()
    note = models.CharField(max_length=200, blank=True, help_text="Who set it and why (the scheme's decision).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["currency", "-valid_from"]
        constraints = [
            models.UniqueConstraint(fields=["currency", "valid_from"], name="settlement_price_one_per_instant"),
        ]

    def __str__(self) -> str:
        return f"{self.fen_per_thousand_points} {self.currency} minor per 1,000 points from {self.valid_from:%Y-%m-%d}"


class CycleState(models.TextChoices):
    OPEN = "open", "Open"
    CUT_OFF = "cut_off", "Cut off"
    NETTED = "netted", "Netted"
    INSTRUCTED = "instructed", "Instructed"
    SETTLED = "settled", "Settled"
    RECONCILED = "reconciled", "Reconciled"
    FAILED = "failed", "Failed"
    DISPUTED = "disputed", "Disputed"


class Cycle(models.Model):
    State = CycleState

    state = models.CharField(max_length=16, choices=CycleState.choices, default=CycleState.OPEN)
    currency = models.CharField(max_length=3, default=CURRENCY)
    cut_off_at = models.DateTimeField(help_text="Obligations created at or before this instant belong here.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(state__in=CycleState.values), name="settlement_cycle_state_known"),
            models.UniqueConstraint(fields=["currency", "cut_off_at"], name="settlement_cycle_one_cut_per_instant"),
        ]

    def __str__(self) -> str:
        return f"cycle {self.pk} ({self.state}, cut off {self.cut_off_at:%Y-%m-%d %H:%M})"


class Obligation(models.Model):
    """Immutable: ``debtor`` owes ``creditor`` ``amount_minor``. Null party = the hub (carry-forward)."""

    key = models.CharField(max_length=200, help_text="Idempotency key: source plus the pair, e.g. 'redemption:17:3>9'.")
    debtor = models.ForeignKey(
        "institutions.Institution", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    creditor = models.ForeignKey(
        "institutions.Institution", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    amount_minor = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3, default=CURRENCY)
    points_mg = models.BigIntegerField(default=0, help_text="Milligrams CO2e behind the amount (0 for carries).")
    source = models.CharField(
        max_length=64, help_text="What caused it: 'redemption:<id>', 'carry:cycle-<id>', 'correction:<ref>'."
    )
    price = models.ForeignKey(SettlementPrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    # Set once, at the cut, for every obligation of the cycle in one UPDATE; not checked per row by the
    # database (a million deferred checks at the commit of a large cut). A cycle that obligations name
    # can never be deleted instead (a trigger, settlement migration 0005).
    cycle = models.ForeignKey(
        Cycle, on_delete=models.PROTECT, null=True, blank=True, related_name="obligations", db_constraint=False
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["key"], name="settlement_obligation_key_unique"),
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="settlement_obligation_positive"),
            models.CheckConstraint(
                condition=Q(debtor__isnull=False) | Q(creditor__isnull=False), name="settlement_obligation_one_party"
            ),
            models.CheckConstraint(condition=~Q(debtor=F("creditor")), name="settlement_obligation_two_parties"),
        ]
        indexes = [
            # cycle_cut: the unassigned obligations, oldest first.
            models.Index(fields=["created_at"], condition=Q(cycle__isnull=True), name="settlement_obligation_open"),
        ]

    def __str__(self) -> str:
        return f"{self.debtor_id or 'hub'} owes {self.creditor_id or 'hub'} {self.amount_minor} {self.currency}"


class NetPosition(models.Model):
    cycle = models.ForeignKey(Cycle, on_delete=models.PROTECT, related_name="positions")
    institution = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="+")
    gross_in = models.BigIntegerField(help_text="Total owed to the institution in this cycle (minor units).")
    gross_out = models.BigIntegerField(help_text="Total the institution owes in this cycle (minor units).")
    net_minor = models.BigIntegerField(help_text="gross_in - gross_out; positive: the hub pays it.")
    carried_forward_minor = models.BigIntegerField(
        default=0, help_text="The part of net under the minimum, rolled into the next cycle instead of paid."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["cycle", "institution"], name="settlement_position_one_per_cycle"),
            models.CheckConstraint(
                condition=Q(net_minor=F("gross_in") - F("gross_out")), name="settlement_position_net_is_in_minus_out"
            ),
        ]

    def __str__(self) -> str:
        return f"cycle {self.cycle_id} institution {self.institution_id}: {self.net_minor:+d}"

    @property
    def instructed_minor(self) -> int:
        """Signed amount instructed: negative pays the hub, positive is paid by the hub."""
        return self.net_minor - self.carried_forward_minor


class InstructionDirection(models.TextChoices):
    PAY = "pay", "Pay the hub"
    RECEIVE = "receive", "Receive from the hub"


class InstructionState(models.TextChoices):
    SENT = "sent", "Sent (awaiting confirmation)"
    PAID = "paid", "Paid (the institution paid the hub)"
    RECEIVED = "received", "Received (the institution got the hub's payment)"
    DISPUTED = "disputed", "Disputed (needs the operator)"


class Instruction(models.Model):
    """One payment instruction: ``institution`` pays the hub its net, or the hub pays it (CONTRACT section 3).

    At most one per cycle and institution. ``statement_digest`` covers exactly the obligations behind
    the figure (those the institution is party to in the cycle, both directions, carries included).
    ``message`` is the ``carbon.settlement.instruction`` webhook, written in the same transaction.
    ``state`` follows the institution's latest confirmation; it changes only under the cycle's row lock.
    """

    Direction = InstructionDirection
    State = InstructionState

    instruction_id = models.CharField(max_length=64, unique=True, help_text="Public id, 'ins_' + 32 hex digits.")
    cycle = models.ForeignKey(Cycle, on_delete=models.PROTECT, related_name="instructions")
    institution = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="+")
    direction = models.CharField(max_length=8, choices=InstructionDirection.choices)
    amount_minor = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3, default=CURRENCY)
    value_date = models.DateField(help_text="When the money moves (HUB_SETTLEMENT_VALUE_DAYS after the cut-off).")
    statement_digest = models.CharField(max_length=71, help_text="sha256:<hex> over the obligations behind it.")
    state = models.CharField(max_length=16, choices=InstructionState.choices, default=InstructionState.SENT)
    message = models.OneToOneField("institutions.OutboxMessage", on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["cycle", "institution"]
        constraints = [
            models.UniqueConstraint(fields=["cycle", "institution"], name="settlement_instruction_one_per_cycle"),
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="settlement_instruction_positive"),
            models.CheckConstraint(
                condition=Q(direction__in=InstructionDirection.values), name="settlement_instruction_direction_known"
            ),
            models.CheckConstraint(
                condition=Q(state__in=InstructionState.values), name="settlement_instruction_state_known"
            ),
            models.CheckConstraint(
                condition=Q(statement_digest__regex=r"^sha256:[0-9a-f]{64}$"), name="settlement_instruction_digest"
            ),
        ]
        indexes = [
            # The operator's "needs attention" list: disputed instructions are few.
            models.Index(fields=["cycle"], condition=Q(state="disputed"), name="settlement_instr_disputed"),
        ]

    def __str__(self) -> str:
        return f"{self.instruction_id} {self.direction} {self.amount_minor} {self.currency}"


class ConfirmationStatus(models.TextChoices):
    PAID = "paid", "Paid"
    RECEIVED = "received", "Received"
    DISPUTED = "disputed", "Disputed"


class Confirmation(models.Model):
    """An institution's ``carbon.settlement.confirmed`` for one of its instructions; every one is kept.

    One per inbox event (the dispatcher may hand an event over again after a crash).
    """

    Status = ConfirmationStatus

    instruction = models.ForeignKey(Instruction, on_delete=models.PROTECT, related_name="confirmations")
    inbox_event = models.OneToOneField("institutions.InboxEvent", on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=ConfirmationStatus.choices)
    reference = models.CharField(max_length=256, help_text="The institution's bank reference.")
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["instruction", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=ConfirmationStatus.values), name="settlement_confirmation_status_known"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instruction_id} {self.status} {self.reference}"


# --- Rewards and redemptions ----------------------------------------------------------------------------


class Reward(models.Model):
    """A reward a provider institution offers: ``points`` per unit, while its window is open."""

    provider = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="rewards")
    code = models.CharField(max_length=40, help_text="[a-z0-9-]{2,40}; persons redeem by it. Unique hub-wide.")
    title = models.CharField(max_length=200)
    points = models.PositiveIntegerField(help_text="Points per unit (1 point = 1 g CO2e).")
    stock = models.PositiveIntegerField(
        null=True, blank=True, help_text="Units left; empty is unlimited. Held units are taken; a void puts them back."
    )
    per_person_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Units one person may have pending or fulfilled; empty is no limit."
    )
    active_from = models.DateTimeField(null=True, blank=True, help_text="Empty: from creation.")
    active_until = models.DateTimeField(null=True, blank=True, help_text="Empty: until further notice.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.UniqueConstraint(fields=["code"], name="settlement_reward_code_unique"),
            models.CheckConstraint(condition=Q(code__regex=r"^[a-z0-9-]{2,40}$"), name="settlement_reward_code_format"),
            models.CheckConstraint(condition=Q(points__gt=0), name="settlement_reward_points_positive"),
            models.CheckConstraint(
                condition=Q(per_person_limit__isnull=True) | Q(per_person_limit__gt=0),
                name="settlement_reward_limit_positive",
            ),
            models.CheckConstraint(
                condition=Q(active_from__isnull=True)
                | Q(active_until__isnull=True)
                | Q(active_until__gt=F("active_from")),
                name="settlement_reward_window_ordered",
            ),
        ]

    def __str__(self) -> str:
        return self.code

    def is_open_at(self, moment: datetime) -> bool:
        """Within the active window at ``moment`` (stock and the provider are checked elsewhere)."""
        return window_open(self.active_from, self.active_until, moment)


def window_open(active_from: datetime | None, active_until: datetime | None, moment: datetime) -> bool:
    """``active_from <= moment < active_until``, an empty end being open."""
    return (active_from is None or active_from <= moment) and (active_until is None or moment < active_until)


def new_redemption_id() -> str:
    """The id persons and providers see: random, so it tells nothing of volumes or other persons."""
    return "rdm_" + secrets.token_hex(12)


class RedemptionStatus(models.TextChoices):
    PENDING = "pending", "Pending (points held)"
    FULFILLED = "fulfilled", "Fulfilled (points captured)"
    REJECTED = "rejected", "Rejected by the provider (points returned)"
    EXPIRED = "expired", "Not answered in time (points returned)"
    VOIDED = "voided", "Voided by an operator (points returned)"


class Redemption(models.Model):
    Status = RedemptionStatus

    public_id = models.CharField(max_length=32, default=new_redemption_id, help_text="The id in the API and events.")
    person = models.ForeignKey("wallets.Person", on_delete=models.PROTECT, related_name="redemptions", db_index=False)
    reward = models.ForeignKey(Reward, on_delete=models.PROTECT, related_name="redemptions")
    provider = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="+", db_index=False)
    quantity = models.PositiveIntegerField()
    points = models.PositiveBigIntegerField(help_text="reward points x quantity, at the time of the hold.")
    status = models.CharField(max_length=16, choices=RedemptionStatus.choices, default=RedemptionStatus.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    hold_expires_at = models.DateTimeField(
        help_text="A hold not fulfilled by then is voided (HUB_REDEMPTION_HOLD_HOURS)."
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(
        max_length=160, blank=True, help_text="The provider's event id, 'expiry', or 'operator:<username>'."
    )
    voucher = models.CharField(max_length=256, blank=True, help_text="What the provider sent with its fulfilment.")
    reason = models.CharField(max_length=256, blank=True, help_text="Why it was rejected or voided.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["public_id"], name="settlement_redemption_public_id_unique"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="settlement_redemption_quantity_positive"),
            models.CheckConstraint(condition=Q(points__gt=0), name="settlement_redemption_points_positive"),
            models.CheckConstraint(
                condition=Q(status__in=RedemptionStatus.values), name="settlement_redemption_status_known"
            ),
            models.CheckConstraint(
                condition=Q(status="pending", resolved_at__isnull=True)
                | (~Q(status="pending") & Q(resolved_at__isnull=False)),
                name="settlement_redemption_resolved_once",
            ),
        ]
        indexes = [
            # GET /me/redemptions, newest first; also the per-person limit's count.
            models.Index(fields=["person", "created_at"], name="settlement_redemption_person"),
            # redemptions_expire: the pending holds by deadline.
            models.Index(fields=["hold_expires_at"], condition=Q(status="pending"), name="settlement_redemption_due"),
        ]

    def __str__(self) -> str:
        return self.public_id


class RedemptionAllocation(models.Model):
    """Milligrams a pending redemption took from one wallet lot, kept so a void returns them there."""

    redemption = models.ForeignKey(Redemption, on_delete=models.PROTECT, related_name="allocations", db_index=False)
    lot = models.ForeignKey("ledger.Account", on_delete=models.PROTECT, related_name="+", db_index=False)
    issuer = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="+", db_index=False)
    expires_on = models.DateField(help_text="The lot's expiry, as it was when the points were held.")
    milligrams = models.PositiveBigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["redemption", "lot"], name="settlement_allocation_one_per_lot"),
            models.CheckConstraint(condition=Q(milligrams__gt=0), name="settlement_allocation_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.milligrams} mg of lot {self.lot_id} for redemption {self.redemption_id}"


class RedemptionRequest(models.Model):
    """The first answer given to ``POST /me/redemptions`` under a person's ``Idempotency-Key``: the
    redemption it held, or the refusal (its problem document). Replayed for every repeat of the key.

    A hold's answer is written in the hold's transaction, so a row exists only for a finished request:
    a request still running is found by its advisory lock, not by a half-written row. On PostgreSQL a
    refusal is written just after its check's statement; the first answer stored for a key stands (see
    ``settlement.services.holds.redemption_request``).
    """

    person = models.ForeignKey("wallets.Person", on_delete=models.CASCADE, related_name="+", db_index=False)
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64, help_text="SHA-256 of the canonical request body.")
    # A held redemption's answer is the redemption as held: rebuilt from its rows (immutable but for its
    # resolution) when replayed, so the hold's one statement need not build it (settlement migration 0007).
    response = models.JSONField(
        null=True,
        blank=True,
        help_text="A refusal's problem document, replayed as is; null for a held redemption.",
    )
    redemption = models.ForeignKey(
        Redemption, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["person", "key"], name="settlement_request_one_per_key"),
        ]

    def __str__(self) -> str:
        answered = f"redemption {self.redemption_id}" if self.redemption_id else (self.response or {}).get("code")
        return f"{self.person_id}:{self.key} -> {answered}"
