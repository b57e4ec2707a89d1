"""Rewards: what providers offer for points (CONTRACT section 6)."""

from __future__ import annotations

import re
from datetime import datetime

from django.db import IntegrityError, transaction

from institutions.models import Institution
from settlement.exceptions import InvalidReward, NotAProvider, RewardExists
from settlement.models import Reward

REWARD_CODE = re.compile(r"^[a-z0-9-]{2,40}$")
REWARD_TITLE_MAX = 200


@transaction.atomic
def reward_create(
    *,
    provider: Institution,
    code: str,
    title: str,
    points: int,
    stock: int | None = None,
    per_person_limit: int | None = None,
    active_from: datetime | None = None,
    active_until: datetime | None = None,
) -> Reward:
    """Add a reward offered by ``provider`` (CONTRACT section 6).

    Raises :class:`NotAProvider` unless the institution is a provider, :class:`InvalidReward` for a
    code outside ``[a-z0-9-]{2,40}``, an empty title, non-positive points or limit, negative stock or a
    window that ends before it starts, and :class:`RewardExists` when the code is taken (by any provider:
    persons redeem by code alone). Changes nothing when it raises.
    """
    if not provider.is_provider:
        raise NotAProvider(f"{provider.code} is not a provider; register it with --provider to offer rewards.")
    problems = []
    if not REWARD_CODE.match(code):
        problems.append("the code must match [a-z0-9-]{2,40}")
    if not title.strip() or len(title) > REWARD_TITLE_MAX:
        problems.append(f"the title must be 1 to {REWARD_TITLE_MAX} characters")
    if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
        problems.append("points must be a positive integer")
    if stock is not None and stock < 0:
        problems.append("stock cannot be negative")
    if per_person_limit is not None and per_person_limit <= 0:
        problems.append("the per-person limit must be positive")
    if active_from is not None and active_until is not None and active_until <= active_from:
        problems.append("the window must end after it starts")
    if problems:
        raise InvalidReward("; ".join(problems).capitalize() + ".")
    try:
        with transaction.atomic():
            return Reward.objects.create(
                provider=provider,
                code=code,
                title=title.strip(),
                points=points,
                stock=stock,
                per_person_limit=per_person_limit,
                active_from=active_from,
                active_until=active_until,
            )
    except IntegrityError as exc:
        raise RewardExists(f"The reward code {code!r} is taken.") from exc
