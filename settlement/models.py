"""Design overview: settlement turns spent points into money owed, nets it, and settles it through the hub.

Money is integer minor units (fen) with a currency code; never floats. Points are the ledger's
milligrams CO2e (1 point = 1,000 mg).

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
    disputed    some instruction's latest confirmation is ``disputed`` (flagged for the operator); it
                moves on to settled (and reconciled) by the rules above once no instruction is disputed
                any more, i.e. the disputing institution confirmed again after the operator resolved it;
    failed      an instruction's webhook died undelivered (``cycles_fail_undelivered``); the operator
                resends it and the cycle is instructed again.
A cycle moves as far as its confirmations justify at once: one with no ``pay`` instruction is settled
as soon as it is instructed, one with no instruction at all is reconciled.

Invariants (services check them; PostgreSQL enforces the marked ones):
    1. an obligation is never edited or deleted; a correction is a new obligation (trigger). The one
       write it takes is being assigned to a cycle at cut-off: ``cycle`` set once, from NULL;
    2. an obligation belongs to at most one cycle, and a cycle past ``cut_off`` gains no obligations;
    3. the net positions of a cycle (hub included) sum to zero, and each equals gross in - gross out;
    4. each institution gets at most one instruction per cycle (unique), for exactly the part of its net
       not carried forward; nets under the minimum roll forward as a carry-forward obligation with the
       hub, so nothing is lost;
    5. an instruction exists if and only if its webhook does (one transaction); confirmations are only
       ever added, one per inbox event (unique).
"""

from __future__ import annotations

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
    cycle = models.ForeignKey(Cycle, on_delete=models.PROTECT, null=True, blank=True, related_name="obligations")
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

    @property
    def signed_minor(self) -> int:
        """Negative when the institution pays the hub, positive when the hub pays it (as ``net_minor``)."""
        return -self.amount_minor if self.direction == InstructionDirection.PAY else self.amount_minor


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
