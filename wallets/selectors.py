"""Reads of the wallets app."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection
from django.db.models import Q, QuerySet
from django.utils import timezone

from clearinghouse.db import array_literal, text_array_literal
from institutions.models import Institution
from ledger.models import Account, AccountKind, Posting
from methodology.models import NormalizedActivity
from wallets.models import LinkAttempt, LinkCode, Membership, Person


def person_for_user(user: Any) -> Person | None:
    """The person behind an authenticated user, or None (anonymous users, operators)."""
    if user is None or not user.is_authenticated:
        return None
    try:
        # Loaded with the token by PersonTokenAuthentication (no query); one query for a session user.
        return user.person  # type: ignore[no-any-return]
    except Person.DoesNotExist:
        return None


def links_for_person(person: Person) -> list[Membership]:
    """The person's active links, oldest first, with their institutions loaded."""
    return list(
        Membership.objects.filter(person=person, unlinked_at__isnull=True)
        .select_related("institution")
        .order_by("linked_at", "pk")
    )


def persons_for_subjects(pairs: Iterable[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """``{(institution id, subject ref): person id}`` for the subjects currently linked."""
    wanted = set(pairs)
    if not wanted:
        return {}
    if connection.vendor == "postgresql":
        # One join against the pairs as arrays: cheaper than an OR of a thousand conditions.
        institution_ids, refs = (list(column) for column in zip(*wanted, strict=True))
        with connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT m.institution_id, m.subject_ref, m.person_id
                      FROM {Membership._meta.db_table} m
                      JOIN unnest(%s::bigint[], %s::text[]) AS q(i, r)
                        ON m.institution_id = q.i AND m.subject_ref = q.r
                     WHERE m.unlinked_at IS NULL""",  # noqa: S608
                [array_literal(institution_ids), text_array_literal(refs)],
            )
            return {(i, r): p for i, r, p in cursor.fetchall()}
    by_institution: dict[int, list[str]] = {}
    for institution_id, ref in wanted:
        by_institution.setdefault(institution_id, []).append(ref)
    condition = Q()
    for institution_id, refs in by_institution.items():
        condition |= Q(institution_id=institution_id, subject_ref__in=refs)
    rows = Membership.objects.filter(condition, unlinked_at__isnull=True).values_list(
        "institution_id", "subject_ref", "person_id"
    )
    return {(institution_id, ref): person_id for institution_id, ref, person_id in rows}


def subject_sealed_at(*, person_id: int, institution_id: int) -> str | None:
    """The person's subject id at the institution, sealed, if they are linked there now (for a webhook
    that carries it, unsealed when sent). SQL twin: ``wallets_subject_sealed`` (wallets/sql)."""
    return (
        Membership.objects.filter(person_id=person_id, institution_id=institution_id, unlinked_at__isnull=True)
        .values_list("subject_sealed", flat=True)
        .first()
    )


# --- The wallet -------------------------------------------------------------------------------------

MG_PER_POINT = 1000
GRAMS_PLACES = Decimal("0.001")


def grams_text(milligrams: int) -> str:
    """Milligrams as grams with three places, exactly: 144000 -> ``"144.000"``."""
    return format(Decimal(milligrams).scaleb(-3), "f")


def standard_today() -> date:
    """Today where the scheme keeps its dates: lots lapse at the end of a local day."""
    return timezone.localdate(timezone=ZoneInfo(settings.HUB_STANDARD_TIMEZONE))


@dataclass(frozen=True, slots=True)
class InstitutionBalance:
    institution: str
    milligrams: int
    next_expiry: date

    @property
    def points(self) -> int:
        return self.milligrams // MG_PER_POINT


@dataclass(frozen=True, slots=True)
class ExpiringPoints:
    expires_on: date
    milligrams: int

    @property
    def points(self) -> int:
        return self.milligrams // MG_PER_POINT


@dataclass(frozen=True, slots=True)
class WalletSummary:
    """What a person holds: ``milligrams`` in live wallet lots, per issuer and what lapses soon, and
    ``debt_milligrams`` owed back after reversals of points already spent (>= 0)."""

    milligrams: int
    by_institution: list[InstitutionBalance]
    expiring_soon: list[ExpiringPoints]
    debt_milligrams: int

    @property
    def points(self) -> int:
        # Whole points, rounded down: a person never sees a point the ledger does not hold.
        return self.milligrams // MG_PER_POINT

    @property
    def grams(self) -> str:
        return grams_text(self.milligrams)

    @property
    def debt_points(self) -> int:
        # Rounded up: any debt at all shows as at least one point owed.
        return -(-self.debt_milligrams // MG_PER_POINT)


def wallet_summary(person: Person, *, today: date | None = None) -> WalletSummary:
    """The person's wallet from the ledger's balances, never from its history: two queries however
    many lots and postings the person has.

    1. the person's wallet lots with points left that have not lapsed (``expires_on >= today``) and
       their debts, through the ledger's ``ledger_account_person`` index (at most issuers x months rows);
    2. the codes of the issuers among them.

    A lot past its expiry date that the daily sweep has not moved yet is no longer counted. Points are
    whole grams rounded down, per total, per institution and per expiry date alike, so the parts may
    add up to less than the total. ``expiring_soon``: lots lapsing within ``HUB_EXPIRING_SOON_DAYS``,
    grouped by date, soonest first, leaving out dates with less than a point.
    """
    today = today or standard_today()
    horizon = today + timedelta(days=settings.HUB_EXPIRING_SOON_DAYS)
    rows = Account.objects.filter(
        Q(kind=AccountKind.WALLET_LOT, balance__gt=0, expires_on__gte=today) | Q(kind=AccountKind.DEBT, balance__lt=0),
        person_id=person.pk,
    ).values_list("kind", "issuer_id", "expires_on", "balance")
    held: dict[int, int] = defaultdict(int)
    soonest: dict[int, date] = {}
    expiring: dict[date, int] = defaultdict(int)
    debt = 0
    for kind, issuer_id, expires_on, balance in rows:
        if kind == AccountKind.DEBT:
            debt -= balance
            continue
        assert expires_on is not None  # a wallet lot always has one (the ledger_account_identity CHECK)
        held[issuer_id] += balance
        if issuer_id not in soonest or expires_on < soonest[issuer_id]:
            soonest[issuer_id] = expires_on
        if expires_on <= horizon:
            expiring[expires_on] += balance
    codes = dict(Institution.objects.filter(pk__in=held).values_list("pk", "code")) if held else {}
    return WalletSummary(
        milligrams=sum(held.values()),
        by_institution=sorted(
            (
                InstitutionBalance(institution=codes.get(i, str(i)), milligrams=mg, next_expiry=soonest[i])
                for i, mg in held.items()
            ),
            key=lambda b: b.institution,
        ),
        expiring_soon=[
            ExpiringPoints(expires_on=day, milligrams=mg) for day, mg in sorted(expiring.items()) if mg >= MG_PER_POINT
        ],
        debt_milligrams=debt,
    )


# --- Activities -------------------------------------------------------------------------------------


def activities_for_person(person: Person) -> QuerySet[NormalizedActivity]:
    """The person's measured activities, newest first (the ``activity_person_recent`` index), with the
    institution and scenario joined in."""
    return (
        NormalizedActivity.objects.filter(person=person)
        .select_related("institution", "scenario")
        .order_by("-occurred_at", "-id")
    )


def activity_grams(activity: NormalizedActivity) -> str:
    """Measured grams with three places, rounded as the event's outcome shows them."""
    return str(activity.grams.quantize(GRAMS_PLACES, ROUND_HALF_EVEN))


# --- Export -----------------------------------------------------------------------------------------

EXPORT_FORMAT = "carbon-wallet-export/1"


def wallet_json(summary: WalletSummary) -> dict[str, Any]:
    """The wallet as ``GET /me/wallet`` shows it (CONTRACT section 4); ``debt_points`` only when owed."""
    body: dict[str, Any] = {
        "points": summary.points,
        "grams": summary.grams,
        "by_institution": [
            {"institution": b.institution, "points": b.points, "next_expiry": b.next_expiry}
            for b in summary.by_institution
        ],
        "expiring_soon": [{"points": e.points, "expires_on": e.expires_on} for e in summary.expiring_soon],
    }
    if summary.debt_milligrams:
        body["debt_points"] = summary.debt_points
    return body


def person_export(person: Person) -> dict[str, Any]:
    """Everything the hub holds about ``person``, as one JSON-ready document (dates and times as Python
    values; the API's renderer writes them in ISO 8601).

    Read-only. Leaves out on purpose what is not the person's to read or would undo the privacy of
    others: institutions' subject ids, their keyed hashes and sealed copies, link codes and their
    hashes, owner keys and act fingerprints, and the ledger's accounts of other holders. Builds the
    document in memory: a person has at most issuers x months accounts, and activities are bounded by
    the caps of the standard.
    """
    user = person.user
    accounts = list(
        Account.objects.filter(person_id=person.pk)
        .order_by("kind", "issuer_id", "expires_on", "id")
        .values_list("id", "kind", "issuer_id", "expires_on", "balance")
    )
    postings: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for account_id, key, kind, amount, at in (
        Posting.objects.filter(account_id__in=[a[0] for a in accounts])
        .order_by("account_id", "id")
        .values_list("account_id", "transfer__idempotency_key", "transfer__kind", "amount", "created_at")
    ):
        postings[account_id].append({"transfer": key, "kind": kind, "amount_mg": amount, "at": at})
    issuers = dict(Institution.objects.filter(pk__in={a[2] for a in accounts}).values_list("pk", "code"))
    links = Membership.objects.filter(person=person).select_related("institution").order_by("linked_at", "pk")
    codes = LinkCode.objects.filter(person=person).select_related("used_by").order_by("created_at", "pk")
    attempts = LinkAttempt.objects.filter(person=person).select_related("institution").order_by("created_at", "pk")
    activities = activities_for_person(person).select_related("factor_version__scenario").iterator(chunk_size=2000)
    return {
        "format": EXPORT_FORMAT,
        "exported_at": timezone.now(),
        "pseudonym": person.pseudonym,
        "username": user.get_username() if user is not None else None,
        "joined": person.created_at,
        "erased_at": person.erased_at,
        "links": [
            {
                "institution": m.institution.code,
                "linked_at": m.linked_at,
                "unlinked_at": m.unlinked_at,
                "unlinked_by": m.unlinked_by or None,
            }
            for m in links
        ],
        "link_codes": [
            {
                "created_at": c.created_at,
                "expires_at": c.expires_at,
                "used_at": c.used_at,
                "used_by": c.used_by.code if c.used_by is not None else None,
            }
            for c in codes
        ],
        "link_attempts": [
            {"institution": a.institution.code, "result": a.result, "at": a.created_at} for a in attempts
        ],
        "wallet": wallet_json(wallet_summary(person)),
        "accounts": [
            {
                "kind": kind,
                "issuer": issuers.get(issuer_id, str(issuer_id)),
                "expires_on": expires_on,
                "balance_mg": balance,
                "postings": postings.get(account_id, []),
            }
            for account_id, kind, issuer_id, expires_on, balance in accounts
        ],
        "activities": [
            {
                "institution": a.institution.code,
                "scenario": a.scenario.code,
                "time": a.occurred_at,
                "quantity": format(a.quantity.normalize(), "f"),
                "unit": a.scenario.unit,
                "grams": activity_grams(a),
                "points": a.credited_mg // MG_PER_POINT,
                "credited_mg": a.credited_mg,
                "factor_version": a.factor_version.label,
                "evidence": a.evidence,
                "status": a.status,
                "reason": a.reason or None,
                "recorded_at": a.created_at,
            }
            for a in activities
        ],
        "redemptions": _redemptions(person),
    }


def _redemptions(person: Person) -> list[dict[str, Any]]:
    """The person's redemptions as ``GET /me/redemptions`` shows them, oldest first."""
    # Imported here: settlement builds on wallets (its rows name persons), not the other way round.
    from settlement.selectors import redemption_json, redemptions_for_person

    return [redemption_json(r) for r in reversed(list(redemptions_for_person(person)))]
