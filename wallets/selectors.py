"""Reads of the wallets app."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from clearinghouse import privacy
from clearinghouse.db import array_literal, text_array_literal
from institutions.models import Institution
from ledger.models import AccountKind
from ledger.selectors import person_accounts, person_balances
from ledger.units import MG_PER_POINT, grams_text, standard_today
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
    held: dict[int, int] = defaultdict(int)
    soonest: dict[int, date] = {}
    expiring: dict[date, int] = defaultdict(int)
    debt = 0
    for row in person_balances(person_id=person.pk, live_on=today):
        kind, issuer_id, expires_on, balance = row.kind, row.issuer_id, row.expires_on, row.balance
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

    Read-only. The wallets' own sections (the person, links, link codes and attempts, the wallet, the
    ledger's accounts of the person with their postings), then every section another app registered
    with :mod:`clearinghouse.privacy` (methodology's activities, settlement's redemptions). Leaves out on
    purpose what is not the person's to read or would undo the privacy of others: institutions' subject
    ids, their keyed hashes and sealed copies, link codes and their hashes, owner keys and act
    fingerprints, and the ledger's accounts of other holders. Builds the document in memory: a person has
    at most issuers x months accounts, and activities are bounded by the caps of the standard.
    """
    user = person.user
    accounts = person_accounts(person_id=person.pk)
    issuers = dict(Institution.objects.filter(pk__in={a.issuer_id for a in accounts}).values_list("pk", "code"))
    links = Membership.objects.filter(person=person).select_related("institution").order_by("linked_at", "pk")
    codes = LinkCode.objects.filter(person=person).select_related("used_by").order_by("created_at", "pk")
    attempts = LinkAttempt.objects.filter(person=person).select_related("institution").order_by("created_at", "pk")
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
                "kind": account.kind,
                "issuer": issuers.get(account.issuer_id, str(account.issuer_id)),
                "expires_on": account.expires_on,
                "balance_mg": account.balance,
                "postings": [
                    {"transfer": key, "kind": kind, "amount_mg": amount, "at": at}
                    for key, kind, amount, at in account.postings
                ],
            }
            for account in accounts
        ],
        **privacy.export_sections(person.pk),
    }
