"""Reads of the settlement app: the reward catalogue and a person's redemptions, as the API shows them."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from institutions.models import Institution
from settlement import netting
from settlement.models import Redemption, RedemptionAllocation, Reward
from wallets.models import Person
from wallets.selectors import MG_PER_POINT, grams_text


def _time(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with ``Z``, as DRF renders times; stored answers keep this text as is."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- Rewards ------------------------------------------------------------------------------------------


def rewards_catalogue(*, now: datetime | None = None) -> list[Reward]:
    """Rewards offered now or later by active providers (not those whose window closed), by code."""
    now = now or timezone.now()
    return list(
        Reward.objects.select_related("provider")
        .filter(Q(active_until__isnull=True) | Q(active_until__gt=now))
        .filter(provider__is_provider=True, provider__status=Institution.Status.ACTIVE)
        .order_by("code")
    )


def reward_json(reward: Reward, *, now: datetime | None = None) -> dict[str, Any]:
    """One catalogue entry (CONTRACT section 4): ``code``, ``title``, ``provider``, ``points`` per unit,
    and its availability: ``available`` now, ``stock`` (null: unlimited), ``per_person_limit`` (null: none),
    the window ``active_from`` / ``active_until`` (null: open-ended)."""
    now = now or timezone.now()
    provider = reward.provider
    return {
        "code": reward.code,
        "title": reward.title,
        "provider": provider.code,
        "points": reward.points,
        "available": reward.is_open_at(now)
        and provider.is_active
        and provider.is_provider
        and (reward.stock is None or reward.stock > 0),
        "stock": reward.stock,
        "per_person_limit": reward.per_person_limit,
        "active_from": _time(reward.active_from),
        "active_until": _time(reward.active_until),
    }


# --- Redemptions --------------------------------------------------------------------------------------


def redemptions_for_person(person: Person) -> QuerySet[Redemption]:
    """The person's redemptions, newest first, with what :func:`redemption_json` reads loaded."""
    return (
        Redemption.objects.filter(person=person)
        .select_related("reward", "provider")
        .prefetch_related(
            Prefetch("allocations", queryset=RedemptionAllocation.objects.select_related("issuer").order_by("id"))
        )
        .order_by("-created_at", "-id")
    )


def allocation_points(milligrams_by_institution: dict[str, int], points: int) -> list[dict[str, Any]]:
    """Per institution (by code): the whole points it gave, split by largest remainder so they add up
    to ``points`` exactly, and the exact grams (a lot may give part of a point)."""
    codes = sorted(milligrams_by_institution)
    weights = [milligrams_by_institution[code] for code in codes]
    parts = netting.largest_remainder_split(points, weights)
    return [
        {"institution": code, "points": part, "grams": grams_text(mg)}
        for code, part, mg in zip(codes, parts, weights, strict=True)
    ]


def redemption_json(redemption: Redemption) -> dict[str, Any]:
    """A redemption as the API shows it (each entry of ``GET /me/redemptions``; see :func:`redemption_body`),
    its allocations read from the prefetch of :func:`redemptions_for_person` when there is one."""
    milligrams: dict[str, int] = defaultdict(int)
    allocations = list(redemption.allocations.all())
    missing = {a.issuer_id for a in allocations if not RedemptionAllocation.issuer.is_cached(a)}
    codes = dict(Institution.objects.filter(pk__in=missing).values_list("pk", "code")) if missing else {}
    for allocation in allocations:
        code = codes[allocation.issuer_id] if allocation.issuer_id in codes else allocation.issuer.code  # noqa: SIM401 (.get would load the issuer)
        milligrams[code] += allocation.milligrams
    return redemption_body(
        public_id=redemption.public_id,
        status=redemption.status,
        reward=redemption.reward.code,
        provider=redemption.provider.code,
        quantity=redemption.quantity,
        points=redemption.points,
        milligrams=milligrams,
        created_at=redemption.created_at,
        hold_expires_at=redemption.hold_expires_at,
        resolved_at=redemption.resolved_at,
        voucher=redemption.voucher,
        reason=redemption.reason,
    )


def redemption_body(
    *,
    public_id: str,
    status: str,
    reward: str,
    provider: str,
    quantity: int,
    points: int,
    milligrams: dict[str, int],
    created_at: datetime,
    hold_expires_at: datetime,
    resolved_at: datetime | None = None,
    voucher: str = "",
    reason: str = "",
) -> dict[str, Any]:
    """The JSON of a redemption (the ``201`` of ``POST /me/redemptions``, stored as the key's answer, and
    the entries of ``GET /me/redemptions``): ``id``, ``status``, ``reward`` and ``provider`` codes,
    ``quantity``, ``points``, ``allocations`` per institution (``milligrams`` is per issuer code), the
    times, and once resolved the ``voucher`` or ``reason``."""
    assert sum(milligrams.values()) == points * MG_PER_POINT, "allocations must cover the points"
    return {
        "id": public_id,
        "status": status,
        "reward": reward,
        "provider": provider,
        "quantity": quantity,
        "points": points,
        "allocations": allocation_points(milligrams, points),
        "created_at": _time(created_at),
        "hold_expires_at": _time(hold_expires_at),
        "resolved_at": _time(resolved_at),
        "voucher": voucher or None,
        "reason": reason or None,
    }
