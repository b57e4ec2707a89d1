"""Settlement's errors, each with a stable ``code``. Raised before anything is written (or with the
writes rolled back)."""

from __future__ import annotations

from typing import Any

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


# --- Rewards and redemptions ----------------------------------------------------------------------------


class InvalidReward(SettlementError):
    status, code, title = 400, "invalid-reward", "Invalid reward"


class RewardExists(SettlementError):
    code, title = "reward-exists", "Reward code taken"


class NotAProvider(SettlementError):
    status, code, title = 400, "not-a-provider", "Not a provider institution"


class RedemptionRefused(SettlementError):
    """A redemption the hub understood and said no to. It is the answer under its ``Idempotency-Key``:
    the same key gets it again."""

    code, title = "redemption-refused", "Redemption refused"


class RewardNotFound(RedemptionRefused):
    status, code, title = 404, "reward-not-found", "No such reward"


class RewardUnavailable(RedemptionRefused):
    code, title = "reward-unavailable", "Reward not available now"


class OutOfStock(RedemptionRefused):
    code, title = "out-of-stock", "Not enough stock"


class RedemptionLimitReached(RedemptionRefused):
    code, title = "redemption-limit-reached", "Per-person limit reached"


class InsufficientPoints(RedemptionRefused):
    code, title = "insufficient-points", "Insufficient points"


class IdempotencyKeyMissing(SettlementError):
    status, code, title = 400, "idempotency-key-missing", "Idempotency-Key required"


class IdempotencyKeyInvalid(SettlementError):
    status, code, title = 400, "idempotency-key-invalid", "Invalid Idempotency-Key"


class IdempotencyKeyReused(SettlementError):
    status, code, title = 422, "idempotency-key-reused", "Idempotency-Key reused with another request"


class IdempotencyKeyInFlight(SettlementError):
    """Another request with the key is running now; the client retries after ``Retry-After``."""

    status, code, title = 409, "idempotency-key-in-flight", "A request with this Idempotency-Key is still running"
    retry_after_seconds = 1

    def __init__(self, message: str | None = None, **extra: Any):
        super().__init__(message, headers={"Retry-After": str(self.retry_after_seconds)}, **extra)


class RedemptionNotPending(SettlementError):
    code, title = "redemption-not-pending", "Redemption no longer pending"
