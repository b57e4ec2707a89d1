"""The ledger's errors, each with a stable ``code``. Raised before anything is written (or with the
writes rolled back), so a caller that catches one may carry on in its own transaction."""

from __future__ import annotations

from clearinghouse.errors import HubError


class LedgerError(HubError):
    status, code, title = 409, "ledger-error", "Ledger error"


class InvalidAccount(LedgerError):
    status, code, title = 400, "invalid-account", "Invalid account identity"


class InvalidTransfer(LedgerError):
    status, code, title = 400, "invalid-transfer", "Invalid transfer"


class UnbalancedTransfer(InvalidTransfer):
    code, title = "unbalanced-transfer", "Postings do not sum to zero"


class CrossIssuerTransfer(InvalidTransfer):
    code, title = "cross-issuer-transfer", "Postings move points between issuers"


class UnknownAccount(InvalidTransfer):
    code, title = "unknown-account", "Unknown account"


class InsufficientBalance(LedgerError):
    status, code, title = 409, "insufficient-balance", "Insufficient balance"


class BalanceOutOfRange(LedgerError):
    """An account that may only go negative (outstanding, debt) would go above zero."""

    status, code, title = 409, "balance-out-of-range", "Balance out of range"
