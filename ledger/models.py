"""Design overview: the hub's double-entry books of carbon points.

One unit: integer milligrams CO2e (1 point = 1 g = 1,000 mg). Money lives in ``settlement``.

Accounts, by kind. Every account names its issuer (``issuer_id``): the institution whose points it holds.
    issuer_outstanding(issuer)                 points the issuer has put into circulation (<= 0)
    holding_lot(holder, subject_ref, issuer, expires_on)   points of a subject not linked to a person (>= 0)
    wallet_lot(person, issuer, expires_on)     a person's pooled points, one lot per issuer and month (>= 0)
    redemption_hold(redemption, issuer)        points held for a redemption until capture or void (>= 0)
    redeemed(provider, issuer)                 points spent on a provider's rewards (>= 0)
    expired(issuer), reversed(issuer)          points that lapsed, and points the issuer took back (>= 0)
    debt(person or holder+subject, issuer)     what a holder owes back after a reversal of spent points (<= 0)
Lots are bucketed by expiry month: ``expires_on`` is the last day of the month the points lapse after.

Sign convention: a transfer is a set of signed postings that sum to zero. Crediting a person debits
``issuer_outstanding`` (it goes negative; outstanding = -balance) and credits a lot (+).

Invariants (the database enforces what it can on PostgreSQL; services check everything, everywhere):
    1. the postings of every transfer sum to zero, per issuer (points never change issuer); so does the ledger;
    2. balances keep the signs listed above (CHECK constraints) and equal the sum of the account's postings;
    3. a transfer's ``idempotency_key`` is unique: one inbound event makes at most one transfer;
    4. per issuer, -outstanding = lots + holds + redeemed + expired + reversed + debts, i.e. the balances of
       all accounts with that ``issuer_id`` sum to zero;
    5. postings, transfers and blocks are never updated or deleted (a correction is a new transfer); the one
       write a transfer takes is being sealed: ``block`` set once, from NULL;
    6. sealed blocks chain postings by SHA-256 Merkle roots and hashes, signed with the hub's Ed25519 key.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class AccountKind(models.TextChoices):
    ISSUER_OUTSTANDING = "issuer_outstanding", "Issuer outstanding"
    HOLDING_LOT = "holding_lot", "Holding lot (unlinked subject)"
    WALLET_LOT = "wallet_lot", "Wallet lot (person)"
    REDEMPTION_HOLD = "redemption_hold", "Redemption hold"
    REDEEMED = "redeemed", "Redeemed"
    EXPIRED = "expired", "Expired"
    REVERSED = "reversed", "Reversed"
    DEBT = "debt", "Debt"


# The sign half of invariant 2: kinds never below zero, and kinds never above zero.
NON_NEGATIVE_KINDS: tuple[str, ...] = (
    "holding_lot",
    "wallet_lot",
    "redemption_hold",
    "redeemed",
    "expired",
    "reversed",
)
NON_POSITIVE_KINDS: tuple[str, ...] = ("issuer_outstanding", "debt")
LOT_KINDS: tuple[str, ...] = ("holding_lot", "wallet_lot")


class TransferKind(models.TextChoices):
    CREDIT = "credit", "Credit"
    CONSOLIDATE = "consolidate", "Consolidate"
    REVERSE = "reverse", "Reverse"
    EXPIRE = "expire", "Expire"
    HOLD = "hold", "Hold"
    CAPTURE = "capture", "Capture"
    VOID = "void", "Void"
    FORFEIT = "forfeit", "Forfeit"
    ADJUST = "adjust", "Adjust"


class Account(models.Model):
    Kind = AccountKind

    kind = models.CharField(max_length=24, choices=AccountKind.choices)
    # The natural identity as one string, e.g. ``wallet_lot:p=12:i=3:e=2028-11-30`` (ledger.services.AccountKey).
    key = models.CharField(max_length=200)
    # Plain integers, not foreign keys: the ledger is the base app and knows no other app's tables.
    issuer_id = models.BigIntegerField(help_text="Institution that issued the points this account holds.")
    person_id = models.BigIntegerField(null=True, blank=True)
    subject_ref = models.CharField(max_length=64, blank=True, default="")
    holder_institution_id = models.BigIntegerField(
        null=True, blank=True, help_text="For holding lots and subject debts: the institution whose subject it is."
    )
    provider_id = models.BigIntegerField(null=True, blank=True, help_text="For redeemed: the reward's provider.")
    redemption_id = models.BigIntegerField(null=True, blank=True)
    expires_on = models.DateField(null=True, blank=True, help_text="For lots: last day of the expiry month.")
    balance = models.BigIntegerField(default=0, help_text="Milligrams CO2e; the sum of this account's postings.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # Unique constraints rather than unique=True: PostgreSQL then keeps one index per key, without
        # the extra LIKE-pattern index Django adds for unique text fields, which would cost every insert.
        constraints = [
            models.UniqueConstraint(fields=["key"], name="ledger_account_key_unique"),
            models.CheckConstraint(condition=Q(kind__in=AccountKind.values), name="ledger_account_kind_known"),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=NON_NEGATIVE_KINDS, balance__gte=0) | Q(kind__in=NON_POSITIVE_KINDS, balance__lte=0)
                ),
                name="ledger_account_balance_sign",
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=["issuer_outstanding", "expired", "reversed"])
                    | Q(
                        kind="holding_lot",
                        holder_institution_id__isnull=False,
                        expires_on__isnull=False,
                        person_id__isnull=True,
                    )
                    & ~Q(subject_ref="")
                    | Q(kind="wallet_lot", person_id__isnull=False, expires_on__isnull=False)
                    | Q(kind="redemption_hold", redemption_id__isnull=False)
                    | Q(kind="redeemed", provider_id__isnull=False)
                    | Q(kind="debt", person_id__isnull=False)
                    | Q(kind="debt", person_id__isnull=True, holder_institution_id__isnull=False) & ~Q(subject_ref="")
                ),
                name="ledger_account_identity",
            ),
        ]
        indexes = [
            # lots_expire: lots by expiry date. expires_on never changes, so balance updates stay HOT.
            models.Index(fields=["expires_on"], condition=Q(kind__in=LOT_KINDS), name="ledger_lot_expiry"),
            models.Index(fields=["person_id"], condition=Q(person_id__isnull=False), name="ledger_account_person"),
            models.Index(fields=["issuer_id", "kind"], name="ledger_account_issuer"),
        ]

    def __str__(self) -> str:
        return self.key


class Block(models.Model):
    """A sealed, signed batch of postings: the Merkle root over them, chained to the previous block.

    ``hash`` = SHA-256 over the header (see ``ledger.merkle.block_header``); ``signature`` is Ed25519
    over the 32 raw bytes of ``hash``, by the hub key ``key_id`` whose public half is kept here too.
    """

    height = models.PositiveBigIntegerField(unique=True)
    prev_hash = models.CharField(max_length=64)
    merkle_root = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)
    signature = models.CharField(max_length=100, help_text="Base64 Ed25519 signature over the raw block hash.")
    key_id = models.CharField(max_length=32)
    public_key = models.CharField(max_length=64)
    transfer_count = models.PositiveIntegerField()
    entry_count = models.PositiveIntegerField(help_text="Postings sealed in this block.")
    first_posting_id = models.BigIntegerField(null=True, blank=True)
    last_posting_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-height"]
        constraints = [models.UniqueConstraint(fields=["hash"], name="ledger_block_hash_unique")]

    def __str__(self) -> str:
        return f"block {self.height}"


class Transfer(models.Model):
    Kind = TransferKind

    idempotency_key = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=TransferKind.choices)
    created_at = models.DateTimeField(default=timezone.now)
    metadata = models.JSONField(default=dict, blank=True)
    block = models.ForeignKey(Block, null=True, blank=True, on_delete=models.PROTECT, related_name="transfers")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["idempotency_key"], name="ledger_transfer_key_unique"),
            models.CheckConstraint(condition=Q(kind__in=TransferKind.values), name="ledger_transfer_kind_known"),
        ]
        indexes = [
            # The sealer's queue: transfers not yet in a block, in id order.
            models.Index(fields=["id"], condition=Q(block__isnull=True), name="ledger_transfer_unsealed"),
        ]

    def __str__(self) -> str:
        return self.idempotency_key


class Posting(models.Model):
    """One signed leg of a transfer. Append-only."""

    # Not checked by the database per inserted row (db_constraint=False): the deferred check of both keys
    # of every posting was about a third of a crediting batch's commit. What the keys guarded holds
    # anyway: transfers and accounts can never be deleted nor change id (PostgreSQL triggers, migration
    # 0002), and postings are written only by ``transfers_post``, naming the transfers it has just
    # inserted and the accounts it has just locked, in the same transaction.
    transfer = models.ForeignKey(Transfer, on_delete=models.PROTECT, related_name="postings", db_constraint=False)
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="postings", db_constraint=False)
    amount = models.BigIntegerField(help_text="Milligrams CO2e; + credits the account, - debits it.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="ledger_posting_amount_nonzero")]

    def __str__(self) -> str:
        return f"{self.amount:+d} mg to account {self.account_id}"
