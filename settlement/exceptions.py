"""Settlement's errors, each with a stable ``code``. Raised before anything is written (or with the
writes rolled back)."""

from __future__ import annotations

from clearinghouse.errors import HubError


class SettlementError(HubError):
    status, code, title = 409, "settlement-error", "Settlement error"


class IllegalCycleTransition(SettlementError):
    code, title = "illegal-cycle-transition", "Illegal cycle transition"


class ObligationImmutable(SettlementError):
    code, title = "obligation-immutable", "Obligations are never edited"


class InvalidObligation(SettlementError):
    status, code, title = 400, "invalid-obligation", "Invalid obligation"


class NoPrice(SettlementError):
    code, title = "no-settlement-price", "No settlement price in force"


class CycleOrder(SettlementError):
    code, title = "cycle-order", "Cycles must be cut and netted in order"
