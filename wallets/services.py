"""Writes of the wallets app: persons, link codes, and binding institution subjects to persons.

Linking (DESIGN.md, identity and privacy): a person asks the hub for a link code and gives it to an
institution, which sends ``carbon.account.linked`` for its own subject with that code. The hub then
binds (institution, subject) to the person in a :class:`~wallets.models.Membership`.

A code is 8 characters of Crockford's base32 (no I, L, O or U), so 40 random bits, single use, live
for ``HUB_LINK_CODE_TTL_SECONDS``. The hub keeps only its keyed hash. An institution presenting a
bad code is told why (``wrong_code``, ``expired``, ``reused``) and every attempt is logged as a
:class:`~wallets.models.LinkAttempt`; past ``HUB_LINK_MAX_FAILURES_PER_HOUR`` failures the
institution's attempts are refused (``throttled``) without looking at the code, so guessing cannot
outrun the limit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from math import ceil

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Min
from django.utils import timezone
from rest_framework.authtoken.models import Token

from clearinghouse import privacy
from clearinghouse.errors import HubError
from clearinghouse.throttle import Ticket, Window, throttle_acquire_all, throttle_release, throttle_reset
from institutions.models import Institution
from institutions.outbox import outbox_subjects_reseal, outbox_subjects_sealed
from institutions.services import sealed_subjects_reseal
from ledger.books import holdings_consolidate, owners_lock, person_owner, subject_owner
from ledger.services import person_lots_forfeit
from methodology.services import subject_activities_adopt
from wallets.exceptions import InvalidCredentials, InvalidPassword, LinkNotFound, TooManyLinkCodes, UsernameTaken
from wallets.models import LinkAttempt, LinkCode, Membership, Person

logger = logging.getLogger(__name__)

Result = LinkAttempt.Result
EndedBy = Membership.EndedBy

CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 8
# Crockford's decoding: a person who reads 1 or 0 may type I, L or O.
_CONFUSABLES = str.maketrans({"I": "1", "L": "1", "O": "0"})
_SEPARATORS = re.compile(r"[\s-]+")
# Results that count against an institution's hourly budget of failed attempts: the code did not pan
# out. A refusal for a valid code (subject_taken, person_has_other_account) is not a guess.
FAILED_RESULTS = (Result.WRONG_CODE, Result.EXPIRED, Result.REUSED)
LINKED_RESULTS = (Result.LINKED, Result.ALREADY_LINKED)


# --- Persons ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedUp:
    person: Person
    token: str


def _signin_windows() -> tuple[Window, Window]:
    """(per account, per address), read from the settings on every call (tests change them)."""
    seconds = settings.HUB_SIGNIN_WINDOW_SECONDS
    return (
        Window(
            "signin-account",
            settings.HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT,
            seconds,
            "Too many failed sign-ins for this account: at most {limit} in {seconds} s.",
        ),
        Window(
            "signin-address",
            settings.HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS,
            seconds,
            "Too many failed sign-ins from this address: at most {limit} in {seconds} s.",
        ),
    )


def _signup_windows() -> tuple[Window, Window]:
    seconds = settings.HUB_SIGNUP_WINDOW_SECONDS
    return (
        Window(
            "signup-account",
            settings.HUB_SIGNUP_MAX_PER_ACCOUNT,
            seconds,
            "Too many sign-ups asking for this username: at most {limit} in {seconds} s.",
        ),
        Window(
            "signup-address",
            settings.HUB_SIGNUP_MAX_PER_ADDRESS,
            seconds,
            "Too many sign-ups from this address: at most {limit} in {seconds} s.",
        ),
    )


def _account(username: str) -> str:
    """The throttles' subject for a username: one per account, whatever case or Unicode form is typed."""
    return unicodedata.normalize("NFKC", username).casefold()


def _throttled(windows: tuple[Window, Window], username: str, address: str | None) -> list[Ticket]:
    """Tickets for one attempt: per address first (when known), then per account; :class:`RateLimited`
    from either, with nothing counted."""
    account_window, address_window = windows
    attempts = [(address_window, address)] if address is not None else []
    return throttle_acquire_all([*attempts, (account_window, _account(username))])


def person_signup(*, username: str, password: str, address: str | None = None) -> SignedUp:
    """Create a user, its person and its API token.

    Usernames are unique regardless of case (``Alice`` and ``alice`` would be one person to a reader).
    Throttled: every attempt counts against ``HUB_SIGNUP_MAX_PER_ACCOUNT`` (per username asked for)
    and, when the client's ``address`` is given, ``HUB_SIGNUP_MAX_PER_ADDRESS``, in any
    ``HUB_SIGNUP_WINDOW_SECONDS``; past either, :class:`RateLimited` before anything is checked.
    Raises :class:`UsernameTaken`, or :class:`InvalidPassword` with the validators' ``errors``.
    """
    tickets = _throttled(_signup_windows(), username, address)
    try:
        return _person_create(username=username, password=password)
    except HubError:
        raise  # a refused sign-up was an attempt: it counts
    except BaseException:
        throttle_release(*tickets)  # the hub failed, not the caller
        raise


@transaction.atomic
def _person_create(*, username: str, password: str) -> SignedUp:
    user_model = get_user_model()
    username = user_model.normalize_username(username)
    if user_model._default_manager.filter(username__iexact=username).exists():
        raise UsernameTaken(f"The username {username!r} is taken.")
    try:
        validate_password(password, user=user_model(username=username))
    except DjangoValidationError as exc:
        errors = [
            {"field": "password", "code": e.code or "invalid", "message": " ".join(e.messages)} for e in exc.error_list
        ]
        raise InvalidPassword("; ".join(e["message"] for e in errors), errors=errors) from exc
    try:
        with transaction.atomic():
            user = user_model._default_manager.create_user(username=username, password=password)
    except IntegrityError as exc:  # a concurrent signup took the name between the check and the insert
        raise UsernameTaken(f"The username {username!r} is taken.") from exc
    person = Person.objects.create(user=user)
    token = Token.objects.create(user=user)
    return SignedUp(person=person, token=token.key)


def person_authenticate(*, username: str, password: str, address: str | None = None) -> AbstractBaseUser:
    """The user of the person with these credentials: the one sign-in check, for the API's token and
    the persons' pages alike.

    Throttled: at most ``HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT`` failed sign-ins per account (the username,
    in any case; unknown ones too) and, when the client's ``address`` is given,
    ``HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS`` per address, in any ``HUB_SIGNIN_WINDOW_SECONDS``. Past either,
    :class:`RateLimited` (429, ``Retry-After``) without looking at the password. A success forgets the
    account's failures and does not count against the address.

    Raises :class:`InvalidCredentials` for a wrong password, an unknown or inactive user, and a user
    that is not a person (operators use the admin, not person tokens), alike.
    """
    account_window, _ = windows = _signin_windows()
    tickets = _throttled(windows, username, address)
    try:
        user = authenticate(username=username, password=password)
        if user is None or not Person.objects.filter(user_id=user.pk).exists():
            raise InvalidCredentials("Unknown username or wrong password.", headers={"WWW-Authenticate": "Token"})
    except InvalidCredentials:
        raise  # a failure: its tickets stay counted
    except BaseException:
        throttle_release(*tickets)  # the hub failed, not the caller
        raise
    throttle_release(*tickets)
    throttle_reset(account_window, _account(username))
    return user


def person_token_obtain(*, username: str, password: str, address: str | None = None) -> str:
    """The API token of the person with these credentials (the same token on every call); signs in
    through :func:`person_authenticate` (throttled, raises as it does)."""
    user = person_authenticate(username=username, password=password, address=address)
    token, _ = Token.objects.get_or_create(user_id=user.pk)
    return token.key


# --- Link codes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedLinkCode:
    """A new code in clear, shown to its person once."""

    code: str
    expires_at: datetime


def link_code_normalize(code: str) -> str | None:
    """The canonical form of a code as typed (any case, spaces or dashes, I/L/O for 1/0), or None when
    it cannot be a code at all."""
    cleaned = _SEPARATORS.sub("", code).upper().translate(_CONFUSABLES)
    if len(cleaned) != CODE_LENGTH or not all(c in CODE_ALPHABET for c in cleaned):
        return None
    return cleaned


def link_code_hash(code: str) -> str:
    """Keyed hash of a normalized code: without the hub's key, a database reader cannot test guesses."""
    message = b"link-code\x00" + code.encode()
    return hmac.new(settings.HUB_SUBJECT_KEY.encode(), message, hashlib.sha256).hexdigest()


def link_code_create(*, person: Person) -> IssuedLinkCode:
    """Issue a fresh single-use code for ``person``; only its hash is stored.

    Throttled: at most ``HUB_LINK_CODE_MAX_PER_PERSON`` attempts per person in any
    ``HUB_LINK_CODE_WINDOW_SECONDS`` (refused ones count too), else :class:`RateLimited`. Locks the
    person row, so concurrent requests cannot exceed ``HUB_LINK_CODES_LIVE_MAX`` live codes. Raises
    :class:`TooManyLinkCodes` (with ``Retry-After``: when the soonest live code expires).
    """
    window = Window(
        "link-code",
        settings.HUB_LINK_CODE_MAX_PER_PERSON,
        settings.HUB_LINK_CODE_WINDOW_SECONDS,
        "Too many link codes asked for: at most {limit} in {seconds} s.",
    )
    tickets = throttle_acquire_all([(window, str(person.pk))])
    try:
        return _link_code_issue(person=person)
    except HubError:
        raise
    except BaseException:
        throttle_release(*tickets)
        raise


@transaction.atomic
def _link_code_issue(*, person: Person) -> IssuedLinkCode:
    Person.objects.select_for_update(no_key=True).get(pk=person.pk)
    now = timezone.now()
    live = LinkCode.objects.filter(person=person, used_at__isnull=True, expires_at__gt=now)
    if live.count() >= settings.HUB_LINK_CODES_LIVE_MAX:
        soonest = live.aggregate(soonest=Min("expires_at"))["soonest"]
        wait = max(1, ceil((soonest - now).total_seconds()))
        raise TooManyLinkCodes(
            f"At most {settings.HUB_LINK_CODES_LIVE_MAX} live link codes; use one or wait until one expires.",
            headers={"Retry-After": str(wait)},
        )
    expires_at = now + timedelta(seconds=settings.HUB_LINK_CODE_TTL_SECONDS)
    for _ in range(8):
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        try:
            with transaction.atomic():
                LinkCode.objects.create(
                    person=person, code_hash=link_code_hash(code), expires_at=expires_at, created_at=now
                )
        except IntegrityError:
            # This code was issued before (hashes are unique over all time, so a lookup is never
            # ambiguous); draw another.
            continue
        return IssuedLinkCode(code=code, expires_at=expires_at)
    raise RuntimeError("Could not draw an unused link code in 8 tries; the code space is exhausted.")


# --- Linking ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkDecision:
    result: Result
    membership: Membership | None = None

    @property
    def linked(self) -> bool:
        return self.result in LINKED_RESULTS


@transaction.atomic
def account_link(
    *, institution: Institution, subject_ref: str, subject_sealed: str, link_code: str, event_id: str = ""
) -> LinkDecision:
    """Bind the institution's subject to the person who made ``link_code``, if the code allows it.

    Never raises for a bad code: every attempt is recorded as a :class:`LinkAttempt` and its result
    returned, so a wrong code is an answer to the institution, not an error of the hub. The code is
    used up only by a successful link (``linked``, ``already_linked``); a valid code refused for
    ``subject_taken`` or ``person_has_other_account`` stays live for its person.

    Idempotent: the same subject presented again with a code that linked it to its person (or with a
    fresh code of that person) answers ``already_linked`` and changes nothing else.

    Locks the institution row (``FOR NO KEY UPDATE``, which the intake's inserts of that institution's
    events do not wait for) so the failure budget holds across concurrent workers, and the code row.
    """
    if not subject_ref or not subject_sealed:
        raise ValueError("A link needs the subject's keyed hash and its sealed copy.")
    Institution.objects.select_for_update(no_key=True).get(pk=institution.pk)
    now = timezone.now()

    def decide(result: Result, *, person_id: int | None = None, membership: Membership | None = None) -> LinkDecision:
        LinkAttempt.objects.create(
            institution=institution, result=result, person_id=person_id, event_id=event_id, created_at=now
        )
        if result in FAILED_RESULTS or result == Result.THROTTLED:
            logger.info("link attempt by %s refused: %s (event %s)", institution.code, result, event_id)
        return LinkDecision(result=result, membership=membership)

    failures = LinkAttempt.objects.filter(
        institution=institution, result__in=FAILED_RESULTS, created_at__gt=now - timedelta(hours=1)
    ).count()
    if failures >= settings.HUB_LINK_MAX_FAILURES_PER_HOUR:
        return decide(Result.THROTTLED)

    normalized = link_code_normalize(link_code)
    code = None
    if normalized is not None:
        code = LinkCode.objects.select_for_update().filter(code_hash=link_code_hash(normalized)).first()
    if code is None:
        return decide(Result.WRONG_CODE)

    person_id = code.person_id
    active = Membership.objects.filter(
        institution=institution, subject_ref=subject_ref, unlinked_at__isnull=True
    ).first()
    if code.used_at is not None:
        if active is not None and active.person_id == person_id and code.used_by_id == institution.pk:
            return decide(Result.ALREADY_LINKED, person_id=person_id, membership=active)
        return decide(Result.REUSED, person_id=person_id)
    if code.expires_at <= now:
        return decide(Result.EXPIRED, person_id=person_id)
    if active is not None:
        if active.person_id != person_id:
            return decide(Result.SUBJECT_TAKEN, person_id=person_id)
        _code_use(code, institution, now)
        return decide(Result.ALREADY_LINKED, person_id=person_id, membership=active)
    if Membership.objects.filter(institution=institution, person_id=person_id, unlinked_at__isnull=True).exists():
        return decide(Result.PERSON_HAS_OTHER_ACCOUNT, person_id=person_id)

    membership = Membership.objects.create(
        institution=institution,
        person_id=person_id,
        subject_ref=subject_ref,
        subject_sealed=subject_sealed,
        linked_at=now,
    )
    _code_use(code, institution, now)
    # Points the subject earned before the link pool into the person's wallet, in this transaction.
    _subject_pool(
        person_id=person_id,
        institution_id=institution.pk,
        subject_ref=subject_ref,
        link_key=f"consolidate:{membership.pk}",
    )
    return decide(Result.LINKED, person_id=person_id, membership=membership)


def _subject_pool(*, person_id: int, institution_id: int, subject_ref: str, link_key: str) -> dict[str, int]:
    """Consolidate a subject that just linked to a person (in the linking transaction).

    Under the owners' locks (the subject's, then the person's, as crediting takes them): the subject's
    activities and fingerprints become the person's, acts the person already had credited being
    ``duplicate_act`` (methodology); then its holding lots move into the person's wallet lots in one
    transfer keyed ``link_key``, the duplicates' points taken back instead (the ledger's books).
    """
    owners_lock([subject_owner(institution_id, subject_ref)])
    owners_lock([person_owner(person_id)])
    duplicates = subject_activities_adopt(person_id=person_id, institution_id=institution_id, subject_ref=subject_ref)
    return holdings_consolidate(
        person_id=person_id,
        institution_id=institution_id,
        subject_ref=subject_ref,
        duplicates=duplicates,
        link_key=link_key,
    )


def _code_use(code: LinkCode, institution: Institution, now: datetime) -> None:
    code.used_at = now
    code.used_by = institution
    code.save(update_fields=["used_at", "used_by"])


def membership_end(*, membership: Membership, ended_by: EndedBy) -> bool:
    """End an active binding; False when it had already ended (safe to call twice, or concurrently).

    The points already pooled stay the person's; later events of the subject find no active binding
    and go to the subject's holding again.
    """
    now = timezone.now()
    ended = Membership.objects.filter(pk=membership.pk, unlinked_at__isnull=True).update(
        unlinked_at=now, unlinked_by=ended_by
    )
    if ended:
        membership.unlinked_at = now
        membership.unlinked_by = ended_by
    return bool(ended)


@transaction.atomic
def account_unlink(*, institution: Institution, subject_ref: str) -> Membership | None:
    """The institution unbinds its subject: the ended membership, or None when none was active
    (idempotent)."""
    membership = Membership.objects.filter(
        institution=institution, subject_ref=subject_ref, unlinked_at__isnull=True
    ).first()
    if membership is None or not membership_end(membership=membership, ended_by=EndedBy.INSTITUTION):
        return None
    return membership


@transaction.atomic
def person_link_remove(*, person: Person, institution_code: str) -> Membership:
    """The person unbinds their account at ``institution_code``. Raises :class:`LinkNotFound`."""
    membership = Membership.objects.filter(
        person=person, institution__code=institution_code, unlinked_at__isnull=True
    ).first()
    if membership is None or not membership_end(membership=membership, ended_by=EndedBy.PERSON):
        raise LinkNotFound(f"No active link to {institution_code!r}.")
    return membership


# --- Key rotation -----------------------------------------------------------------------------------


def subjects_reseal(*, batch_size: int = 500, progress: Callable[[int, int], None] | None = None) -> int:
    """Re-encrypt every sealed subject id under the newest ``HUB_ENCRYPTION_KEYS`` key: the memberships'
    and the outbox messages' (a webhook keeps the person's subject id sealed until it is sent).

    Runs in batches, each committed on its own with its rows locked, so an interrupted run can simply
    be started again; ``progress(done, total)`` is called after each batch. Returns how many rows were
    resealed. Raises :class:`~institutions.crypto.MalformedKey` naming the row when a sealed subject
    cannot be decrypted with any configured key (the rows before it stay resealed).
    """
    total = Membership.objects.exclude(subject_sealed="").count() + outbox_subjects_sealed()
    done = 0

    def batch_done(rows: int) -> None:
        nonlocal done
        done += rows
        if progress is not None:
            progress(done, total)

    sealed_subjects_reseal(model=Membership, batch_size=batch_size, on_batch=batch_done)
    outbox_subjects_reseal(batch_size=batch_size, on_batch=batch_done)
    return done


# --- Erasure ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersonErased:
    """What one call of :func:`person_erase` did (all zero when the person was erased before)."""

    forfeited_mg: int
    forfeit_transfers: int
    links_deleted: int
    link_codes_deleted: int
    user_deleted: bool


@transaction.atomic
def person_erase(*, person: Person) -> PersonErased:
    """Erase a person (DESIGN.md, identity and privacy), in one transaction.

    - Every wallet lot of the person with points left is forfeited to ``expired(issuer)``
      (``ledger.services.person_lots_forfeit``: one ``forfeit`` transfer per lot, key
      ``forfeit:<person id>:<account id>``, ``...:after-<last posting id>`` if an earlier erasure used it
      and the lot received points since). Issuer totals therefore still balance (ledger invariant 4).
    - Memberships (links) and link codes are deleted, and so is what the other apps registered with
      :mod:`clearinghouse.privacy` (settlement: the stored answers to the person's redemption requests,
      their Idempotency-Keys); redemptions stay, pseudonymous; link attempts stay for the institutions'
      failure budgets, detached from the person. The subject's later events find no link and are held
      for the subject, as for anyone unlinked. (A link event keeps no subject id once handled.)
    - The Django user is deleted, and with it its API token; the person can no longer sign in or use
      the token. The person row stays as a bare pseudonym with ``erased_at``, so normalized activities,
      cap usage and ledger amounts stay consistent and pseudonymous under it (``person_id`` unchanged).
    - Debts stay on the person's debt accounts: nothing is forgiven or moved by erasure, so issuer
      totals keep showing what was spent and then reversed.

    Idempotent: calling it again forfeits only points that reached the person's lots after the first
    call and changes nothing else.

    Locks, in this order, so that no credit, link or reversal of the person is interleaved with it:
    the person row (``FOR NO KEY UPDATE``: one erasure at a time, and no new link code meanwhile); the
    link codes, by deleting them (a link using one of them commits first); the owner locks of the
    linked subjects, then the person's (the order crediting, consolidation and reversals take them, so a
    batch that found the link either commits first and its credit is forfeited, or waits and then finds
    no link); then the lots and the issuers' ``expired`` accounts in id order. Raises
    :class:`~ledger.exceptions.LedgerError` only if the books are inconsistent.
    """
    # NO KEY: links and activities being written for the person hold KEY SHARE on this row (their
    # foreign keys); FOR UPDATE would wait for them while they wait for the owner locks below.
    person = Person.objects.select_for_update(no_key=True).get(pk=person.pk)
    now = timezone.now()
    codes_deleted, _ = LinkCode.objects.filter(person=person).delete()
    subjects = Membership.objects.filter(person=person, unlinked_at__isnull=True).values_list(
        "institution_id", "subject_ref"
    )
    owners_lock(subject_owner(institution_id, subject_ref) for institution_id, subject_ref in subjects)
    owners_lock([person_owner(person.pk)])
    forfeited = person_lots_forfeit(person_id=person.pk)

    LinkAttempt.objects.filter(person=person).update(person=None)
    # The links, with their sealed subject ids: the only copies once a link event is handled.
    links_deleted, _ = Membership.objects.filter(person=person).delete()
    # What the other apps hold about the person (settlement: the answers kept for their Idempotency-Keys).
    privacy.erase(person.pk)
    user_id = person.user_id
    if person.erased_at is None:
        person.erased_at = now
        person.save(update_fields=["erased_at"])
    if user_id is not None:
        # The token goes with the user (CASCADE); Person.user is set to NULL (SET_NULL), which the
        # person_user_or_erased constraint allows now that erased_at is set.
        get_user_model()._default_manager.filter(pk=user_id).delete()
    logger.info(
        "person %s erased: %d mg forfeited in %d transfers", person.pseudonym, forfeited.milligrams, forfeited.transfers
    )
    return PersonErased(
        forfeited_mg=forfeited.milligrams,
        forfeit_transfers=forfeited.transfers,
        links_deleted=links_deleted,
        link_codes_deleted=codes_deleted,
        user_deleted=user_id is not None,
    )
