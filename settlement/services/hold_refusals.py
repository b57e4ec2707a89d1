"""How a hold says no: the refusals' wording, the same whichever engine found them."""

from __future__ import annotations

from ledger.units import MG_PER_POINT
from settlement.exceptions import (
    InsufficientPoints,
    OutOfStock,
    RedemptionLimitReached,
    RedemptionRefused,
    RewardNotFound,
    RewardUnavailable,
)


def refusal(code: str, reward: str, figures: dict[str, int]) -> RedemptionRefused:
    """A hold's refusal found by its checks, before anything was written: ``code`` is the error's and
    ``figures`` what its problem names (``stock``; ``limit`` and ``taken``; ``points`` and ``available_mg``)."""
    if code == RewardNotFound.code:
        return RewardNotFound(f"No reward {reward!r}.")
    if code == RewardUnavailable.code:
        return RewardUnavailable(f"The reward {reward!r} is not offered now.")
    if code == OutOfStock.code:
        return OutOfStock(f"Only {figures['stock']} of {reward!r} left.", stock=figures["stock"])
    if code == RedemptionLimitReached.code:
        limit, taken = figures["limit"], figures["taken"]
        return RedemptionLimitReached(
            f"At most {limit} of {reward!r} per person; you have {taken}.", limit=limit, taken=taken
        )
    if code == InsufficientPoints.code:
        points, available = figures["points"], max(figures["available_mg"], 0) // MG_PER_POINT
        return InsufficientPoints(
            f"{points} points are needed; {available} can be spent.", points=points, available_points=available
        )
    raise ValueError(f"unknown refusal {code!r}")


def points_gone() -> InsufficientPoints:
    """A lot read by a hold was swept by the expiry job before the hold's transfer (the race both engines
    catch after their writes began: the transaction rolls back, and a retry decides afresh)."""
    return InsufficientPoints("Some of the points lapsed just now; try again.")


def stock_gone(reward: str) -> OutOfStock:
    """The last unit was taken by a concurrent hold after this one's checks (the other race both engines
    catch at their stock UPDATE, after their writes began: the transaction rolls back)."""
    return OutOfStock(f"{reward!r} ran out just now.", stock=0)
