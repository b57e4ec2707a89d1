"""Normalization: turn recorded activity events into measured, capped, de-duplicated activities."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from clearinghouse.db import array_literal, copy_rows, text_array_literal
from institutions.envelope import ACTIVITY_RECORDED
from institutions.handlers import Outcome
from institutions.models import InboxEvent
from institutions.selectors import inbox_events_named, points_validity_months
from ledger.books import (
    Credit,
    add_months,
    credit_legs,
    credit_reverse,
    credits_post,
    owners_lock,
    person_owner,
    subject_owner,
)
from ledger.models import AccountKind
from ledger.services import MAX_AMOUNT
from ledger.units import MG_PER_GRAM, MG_PER_POINT
from methodology.models import (
    GRAMS_DIGITS,
    QUANTITY_DIGITS,
    ActFingerprint,
    CapUsage,
    NormalizedActivity,
    StandardRevision,
)
from methodology.persons import persons_for_subjects
from methodology.standard import Resolved, ScenarioInfo, Unresolved, current_standard, period_start

# Wide enough that quantity x factor x 1000 is exact for every value the intake accepts
# (12 + 12 integer and fractional digits times a 20-digit factor).
EXACT = Context(prec=80)
MG_PER_GRAM_EXACT = Decimal(MG_PER_GRAM)
ZERO = Decimal(0)
ONE = Decimal(1)
GRAMS_DISPLAY = Decimal("0.001")

Status = NormalizedActivity.Status
Reason = NormalizedActivity.Reason


def _column_limit(digits: dict[str, int]) -> Decimal:
    """The first value a ``numeric(max_digits, decimal_places)`` column cannot hold, once PostgreSQL
    has rounded it (half away from zero) to its places."""
    places = digits["decimal_places"]
    return EXACT.subtract(Decimal(10) ** (digits["max_digits"] - places), Decimal(5).scaleb(-(places + 1)))


# What the columns of a measured activity hold (docs/decisions.md, "Only what can be stored and read
# back"). The intake bounds the quantity sent; what it becomes after the unit conversion and times the
# factor depends on the registry, and so is checked here, as is the credit against the ledger's
# ``MAX_AMOUNT`` per leg.
QUANTITY_LIMIT = _column_limit(QUANTITY_DIGITS)
GRAMS_LIMIT = _column_limit(GRAMS_DIGITS)
# Acts on days before this year expire before 9999 under any validity (at most 32767 months).
_EXPIRY_CHECK_FROM_YEAR = 9999 - 32767 // 12 - 1


def owner_key(*, person_id: int | None, institution_id: int, subject_ref: str) -> str:
    return person_owner(person_id) if person_id is not None else subject_owner(institution_id, subject_ref)


@dataclass(slots=True)
class _Plan:
    index: int
    event: InboxEvent
    resolved: Resolved
    owner: str
    person_id: int | None
    fingerprint: str
    evidence: str
    issuer_points: int | None
    grams: Decimal  # quantity x the factor's grams per unit, exact


def activities_normalize(*, events: Sequence[InboxEvent]) -> list[Outcome]:
    """Measure each ``carbon.activity.recorded`` event under the standard; one outcome per event.

    Must run inside the dispatcher's transaction. Guarantees, also under concurrent workers:
    an event yields at most one activity (unique on the inbox row; a replayed row is not measured
    twice); per owner, caps hold across every institution and a fingerprint is credited once.
    Events that cannot be measured are quarantined with their reason, never dropped.
    """
    standard = current_standard()
    outcomes: list[Outcome | None] = [None] * len(events)

    measured = _already_measured([e.id for e in events])
    # Subjects first, then the persons they are linked to *after* their locks are held: a link
    # committing meanwhile is then seen, so no credit lands in a holding lot already pooled.
    subjects = {(e.institution_id, e.subject_ref) for e in events}
    owners_lock(subject_owner(i, r) for i, r in subjects)
    persons = persons_for_subjects(subjects)
    owners_lock(person_owner(p) for p in set(persons.values()))
    plans: list[_Plan] = []
    resolve, append, multiply = standard.resolve, plans.append, EXACT.multiply
    for index, event in enumerate(events):
        if measured and event.id in measured:  # handed again after a crash or a replay: report, don't measure twice
            outcomes[index] = Outcome.processed(activity_outcome(measured[event.id]))
            continue
        data = event.data
        assert event.time is not None  # required by the envelope for this type
        institution_id, subject_ref = event.institution_id, event.subject_ref
        resolved = resolve(institution_id, data["action"], Decimal(data["quantity"]), data["unit"], event.time)
        if isinstance(resolved, Unresolved):
            outcomes[index] = Outcome.quarantined(
                resolved.reason, {"reason": resolved.reason, "detail": resolved.detail}
            )
            continue
        grams = multiply(resolved.quantity, resolved.factor.grams_per_unit)
        too_large = _past_columns(resolved.quantity, grams)
        if too_large:
            outcomes[index] = Outcome.quarantined("out_of_range", {"reason": "out_of_range", "detail": too_large})
            continue
        person_id = persons.get((institution_id, subject_ref))
        append(
            _Plan(
                index,
                event,
                resolved,
                subject_owner(institution_id, subject_ref) if person_id is None else person_owner(person_id),
                person_id,
                data.get("fingerprint", ""),
                data.get("evidence", "automatic"),
                data.get("issuer_points"),
                grams,
            )
        )
    if any(p.resolved.local_day.year >= _EXPIRY_CHECK_FROM_YEAR for p in plans):
        plans = _without_unexpirable(plans, outcomes)
    if plans:
        for plan, outcome in zip(plans, _measure(plans, standard.evidence_weights), strict=True):
            outcomes[plan.index] = outcome
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def _past_columns(quantity: Decimal, grams: Decimal) -> str:
    """Why an act measured so cannot be stored in its activity's columns, or ``""``. (Its credit is
    checked against the ledger's limit once caps and evidence have shaped it, in :func:`_measure`.)"""
    if quantity >= QUANTITY_LIMIT:
        return f"{quantity:.3E} in the scenario's unit is more than the hub stores (under 1E+18)."
    if grams >= GRAMS_LIMIT:
        return f"{grams:.3E} g is more than the hub stores (under 1E+18 g)."
    return ""


def _without_unexpirable(plans: list[_Plan], outcomes: list[Outcome | None]) -> list[_Plan]:
    """Quarantine the acts whose points would expire after 9999 (an act dated late in the 9990s, or
    an issuer's long validity); the others, in order."""
    late = [p for p in plans if p.resolved.local_day.year >= _EXPIRY_CHECK_FROM_YEAR]
    months = points_validity_months({p.event.institution_id for p in late})
    kept = []
    for plan in plans:
        try:
            if plan.resolved.local_day.year >= _EXPIRY_CHECK_FROM_YEAR:
                add_months(plan.resolved.local_day, months[plan.event.institution_id])
        except ValueError:
            detail = f"Its points, earned on {plan.resolved.local_day}, would expire after 9999-12-31."
            outcomes[plan.index] = Outcome.quarantined("out_of_range", {"reason": "out_of_range", "detail": detail})
            continue
        kept.append(plan)
    return kept


def _already_measured(inbox_ids: list[int]) -> dict[int, NormalizedActivity]:
    """Activities that exist for these inbox rows (normally none: one cheap probe before the join)."""
    if not NormalizedActivity.objects.filter(
        inbox_event_id__gte=min(inbox_ids), inbox_event_id__lte=max(inbox_ids)
    ).exists():
        return {}
    activities = NormalizedActivity.objects.filter(inbox_event_id__in=inbox_ids).select_related(
        "scenario", "factor_version__scenario"
    )
    return {a.inbox_event_id: a for a in activities}


_ACTIVITY_COLUMNS = (
    "inbox_event_id",
    "institution_id",
    "person_id",
    "subject_ref",
    "owner_key",
    "scenario_id",
    "factor_version_id",
    "quantity",
    "credited_quantity",
    "grams",
    "credited_mg",
    "issuer_points",
    "evidence",
    "fingerprint",
    "occurred_at",
    "status",
    "reason",
    "created_at",
)


def _measure(plans: list[_Plan], weights: dict[str, Decimal]) -> list[Outcome]:
    """Apply fingerprints and caps in event order under the owners' locks, then write everything in
    bulk: activities and fingerprints by COPY, cap usage by one upsert."""
    fingerprinted = {(p.owner, p.fingerprint) for p in plans if p.fingerprint}
    seen_fingerprints = _fingerprints_seen(fingerprinted) if fingerprinted else set()
    # The caps of each plan as (usage key, maximum); the period starts depend only on the scenario
    # and the local day, which most of a batch shares.
    periods: dict[tuple[ScenarioInfo, date], tuple[tuple[int, str, date, Decimal], ...]] = {}
    plan_caps: list[list[tuple[UsageKey, Decimal]] | None] = []
    for plan in plans:
        resolved = plan.resolved
        scenario = resolved.scenario
        if not scenario.caps:
            plan_caps.append(None)
            continue
        starts = periods.get((scenario, resolved.local_day))
        if starts is None:
            starts = periods[(scenario, resolved.local_day)] = tuple(
                (scenario.id, period, period_start(period, resolved.local_day), maximum)
                for period, maximum in scenario.caps
            )
        owner = plan.owner
        plan_caps.append([((owner, s, period, start), maximum) for s, period, start, maximum in starts])
    usage = _usage_load({key for caps in plan_caps if caps for key, _ in caps})
    touched: set[UsageKey] = set()

    now = timezone.now()
    activity_rows: list[tuple[Any, ...]] = []
    credits: list[Credit] = []
    fingerprint_rows: list[tuple[Any, ...]] = []
    outcomes: list[Outcome] = []
    credited, capped, duplicate = Status.CREDITED, Status.CAPPED, Status.DUPLICATE
    with localcontext(EXACT):
        for plan, caps in zip(plans, plan_caps, strict=True):
            resolved, event, fingerprint = plan.resolved, plan.event, plan.fingerprint
            scenario, factor, quantity, grams = resolved.scenario, resolved.factor, resolved.quantity, plan.grams
            credited_quantity = quantity
            status, reason = credited, ""
            repeated = bool(fingerprint) and (plan.owner, fingerprint) in seen_fingerprints
            if repeated:
                credited_quantity, status, reason = ZERO, duplicate, Reason.DUPLICATE_ACT
            elif caps is not None:
                for key, maximum in caps:
                    room = max(maximum - usage.get(key, ZERO), ZERO)
                    if room < credited_quantity:
                        credited_quantity, reason = room, Reason.CAP_REACHED
                if credited_quantity == ZERO:
                    status = capped
            weight = weights.get(plan.evidence, ONE)
            # quantity x factor is ``grams`` already when nothing was capped (the usual case).
            full = grams if credited_quantity is quantity else credited_quantity * factor.grams_per_unit
            credited_mg = int((full * MG_PER_GRAM_EXACT * weight).quantize(ONE, ROUND_HALF_EVEN))
            if credited_mg > MAX_AMOUNT:  # the ledger refuses the leg: quarantined before it counts anywhere
                detail = f"{credited_mg:.3E} mg is more than one credit may be (at most 1E+12 mg, a thousand tonnes)."
                outcomes.append(Outcome.quarantined("out_of_range", {"reason": "out_of_range", "detail": detail}))
                continue
            if not repeated:
                if caps is not None:
                    for key, _ in caps:
                        usage[key] = usage.get(key, ZERO) + credited_quantity
                        touched.add(key)
                if fingerprint and status == credited:
                    seen_fingerprints.add((plan.owner, fingerprint))
                    fingerprint_rows.append((plan.owner, fingerprint, event.id, now))
            credits.append(
                Credit(
                    event.id, event.institution_id, plan.person_id, event.subject_ref, resolved.local_day, credited_mg
                )
            )
            activity_rows.append(
                (
                    event.id,
                    event.institution_id,
                    plan.person_id,
                    event.subject_ref,
                    plan.owner,
                    scenario.id,
                    factor.id,
                    quantity,
                    credited_quantity,
                    grams,
                    credited_mg,
                    plan.issuer_points,
                    plan.evidence,
                    fingerprint,
                    event.time,
                    status,
                    reason,
                    now,
                )
            )
            outcomes.append(
                Outcome.processed(
                    _outcome(scenario.code, quantity, scenario.unit, grams, credited_mg, factor.label, status, reason)
                )
            )

    copy_rows(NormalizedActivity, _ACTIVITY_COLUMNS, activity_rows)
    credits_post(credits, validity_months=points_validity_months({c.issuer_id for c in credits if c.milligrams > 0}))
    copy_rows(ActFingerprint, ("owner_key", "fingerprint", "inbox_event_id", "created_at"), fingerprint_rows)
    if touched:
        _usage_save({key: usage[key] for key in touched})
    return outcomes


def _fingerprints_seen(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (owner, fingerprint) pairs are already recorded."""
    if connection.vendor != "postgresql":
        return set(
            ActFingerprint.objects.filter(
                owner_key__in={owner for owner, _ in pairs}, fingerprint__in={fp for _, fp in pairs}
            ).values_list("owner_key", "fingerprint")
        )
    owners, prints = zip(*pairs, strict=True)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT f.owner_key, f.fingerprint
                  FROM {ActFingerprint._meta.db_table} f
                  JOIN unnest(%s::text[], %s::text[]) AS k(o, p) ON f.owner_key = k.o AND f.fingerprint = k.p""",  # noqa: S608
            [text_array_literal(owners), text_array_literal(prints)],
        )
        return set(cursor.fetchall())


UsageKey = tuple[str, int, str, date]


def _usage_load(keys: set[UsageKey]) -> dict[UsageKey, Decimal]:
    if not keys:
        return {}
    if connection.vendor != "postgresql":
        rows = CapUsage.objects.filter(
            owner_key__in={k[0] for k in keys}, scenario_id__in={k[1] for k in keys}
        ).values_list("owner_key", "scenario_id", "period", "period_start", "used_quantity")
        return {(o, s, p, d): used for o, s, p, d, used in rows if (o, s, p, d) in keys}
    owners, scenarios, periods, starts = (list(column) for column in zip(*keys, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT u.owner_key, u.scenario_id, u.period, u.period_start, u.used_quantity
                  FROM {CapUsage._meta.db_table} u
                  JOIN unnest(%s::text[], %s::bigint[], %s::text[], %s::date[]) AS k(o, s, p, d)
                    ON u.owner_key = k.o AND u.scenario_id = k.s AND u.period = k.p AND u.period_start = k.d""",  # noqa: S608
            [text_array_literal(owners), array_literal(scenarios), text_array_literal(periods), array_literal(starts)],
        )
        return {(o, s, p, d): used for o, s, p, d, used in cursor.fetchall()}


def _usage_save(values: dict[UsageKey, Decimal]) -> None:
    """Write absolute usage figures; safe because the owners are locked for this transaction."""
    if connection.vendor != "postgresql":
        CapUsage.objects.bulk_create(
            [
                CapUsage(owner_key=o, scenario_id=s, period=p, period_start=d, used_quantity=used)
                for (o, s, p, d), used in values.items()
            ],
            update_conflicts=True,
            unique_fields=["owner_key", "scenario", "period", "period_start"],
            update_fields=["used_quantity"],
        )
        return
    keys = sorted(values)  # a fixed order: concurrent upserts of other owners never interleave badly
    owners, scenarios, periods, starts = (list(column) for column in zip(*keys, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO {CapUsage._meta.db_table} (owner_key, scenario_id, period, period_start, used_quantity)
                SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::date[], %s::numeric[])
                ON CONFLICT (owner_key, scenario_id, period, period_start)
                DO UPDATE SET used_quantity = EXCLUDED.used_quantity""",  # noqa: S608
            [
                text_array_literal(owners),
                array_literal(scenarios),
                text_array_literal(periods),
                array_literal(starts),
                array_literal([values[k] for k in keys]),
            ],
        )


def _outcome(
    scenario: str, quantity: Decimal, unit: str, grams: Decimal, credited_mg: int, factor: str, status: str, reason: str
) -> dict[str, Any]:
    """The ``outcome`` the event status endpoint shows for a measured activity (CONTRACT section 2)."""
    return {
        "scenario": scenario,
        "quantity": format(quantity.normalize(), "f"),
        "unit": unit,
        "grams": str(grams.quantize(GRAMS_DISPLAY, ROUND_HALF_EVEN)),
        "points": credited_mg // MG_PER_POINT,
        "credited_mg": credited_mg,
        "factor_version": factor,
        "status": status,
        "reason": reason or None,
    }


def activity_outcome(activity: NormalizedActivity) -> dict[str, Any]:
    return _outcome(
        activity.scenario.code,
        activity.quantity,
        activity.scenario.unit,
        activity.grams,
        activity.credited_mg,
        activity.factor_version.label,
        activity.status,
        activity.reason,
    )


@transaction.atomic
def standard_changed() -> None:
    """Bump the registry revision so every worker reloads its snapshot before its next batch."""
    token = uuid.uuid4().hex
    if not StandardRevision.objects.update(token=token, changed_at=timezone.now()):
        StandardRevision.objects.create(token=token)


def activities_reverse(*, events: Sequence[InboxEvent]) -> list[Outcome]:
    """``carbon.activity.reversed``: take back the credit of an earlier recorded event of the same
    institution. An unknown or never-credited original is quarantined (an operator can replay both
    once the original is processed); an original still waiting is retried later."""
    originals = inbox_events_named(
        type=ACTIVITY_RECORDED, pairs={(e.institution_id, e.data["event_id"]) for e in events}
    )
    subjects = {(e.institution_id, e.subject_ref) for e in events}
    owners_lock(subject_owner(i, r) for i, r in subjects)
    persons = persons_for_subjects(subjects)
    owners_lock(person_owner(p) for p in set(persons.values()))
    outcomes: list[Outcome] = []
    for event in events:
        original = originals.get((event.institution_id, event.data["event_id"]))
        if original is None:
            outcomes.append(Outcome.quarantined("unknown_event", {"reason": "unknown_event"}))
            continue
        if original.status == InboxEvent.Status.RECEIVED:
            raise OriginalPending(f"{original.event_id} is not processed yet")
        activity = NormalizedActivity.objects.filter(inbox_event_id=original.pk).first()
        if activity is None:
            outcomes.append(Outcome.quarantined("original_not_measured", {"reason": "original_not_measured"}))
            continue
        if original.subject_ref != event.subject_ref:
            outcomes.append(Outcome.quarantined("subject_mismatch", {"reason": "subject_mismatch"}))
            continue
        reversal = credit_reverse(
            original_inbox_id=original.pk,
            issuer_id=event.institution_id,
            person_id=persons.get((event.institution_id, event.subject_ref)),
            subject_ref=event.subject_ref,
        )
        if activity.status != Status.REVERSED:
            NormalizedActivity.objects.filter(pk=activity.pk).update(status=Status.REVERSED, reason=Reason.REVERSED)
        outcomes.append(
            Outcome.processed(
                {
                    "reversed_event": original.event_id,
                    "points": reversal.milligrams // MG_PER_POINT,
                    "reversed_mg": reversal.milligrams,
                    "from_lots_mg": reversal.from_lots_mg,
                    "debt_mg": reversal.debt_mg,
                    "reason": event.data.get("reason"),
                }
            )
        )
    return outcomes


class OriginalPending(Exception):
    """A reversal arrived before its original was processed; the dispatcher retries it later."""


def subject_activities_adopt(*, person_id: int, institution_id: int, subject_ref: str) -> dict[tuple[int, date], int]:
    """A subject just linked to a person: its activities and fingerprints become the person's (called in
    the linking transaction, under the owners' locks of the subject and then the person).

    Acts the person already has credited (the same fingerprint, reported elsewhere first) are marked
    ``duplicate_act``. Returns what their credits put into the subject's holding lots, in milligrams per
    (issuer, expiry): consolidation (``ledger.books.holdings_consolidate``) takes that back instead of
    pooling it.
    """
    mine = person_owner(person_id)
    held = NormalizedActivity.objects.filter(
        institution_id=institution_id, subject_ref=subject_ref, person__isnull=True
    )
    prints = dict(
        held.filter(status=Status.CREDITED).exclude(fingerprint="").values_list("fingerprint", "inbox_event_id")
    )
    known = set(
        ActFingerprint.objects.filter(owner_key=mine, fingerprint__in=list(prints)).values_list(
            "fingerprint", flat=True
        )
    )
    duplicate_ids = [prints[fp] for fp in known]
    duplicates: dict[tuple[int, date], int] = {}
    if duplicate_ids:
        for leg in credit_legs(inbox_event_ids=duplicate_ids):
            if leg.kind != AccountKind.HOLDING_LOT:
                continue
            assert leg.expires_on is not None  # every lot has an expiry
            duplicates[(leg.issuer_id, leg.expires_on)] = (
                duplicates.get((leg.issuer_id, leg.expires_on), 0) + leg.amount
            )
        NormalizedActivity.objects.filter(inbox_event_id__in=duplicate_ids).update(
            status=Status.DUPLICATE, reason=Reason.DUPLICATE_ACT
        )
    now = timezone.now()
    ActFingerprint.objects.bulk_create(
        [
            ActFingerprint(owner_key=mine, fingerprint=fp, inbox_event_id=i, created_at=now)
            for fp, i in prints.items()
            if fp not in known
        ],
        ignore_conflicts=True,
    )
    held.update(person_id=person_id)
    return duplicates
