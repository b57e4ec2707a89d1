"""Persons and the accounts they link: the pseudonymous identity side of the hub.

A person is known to the hub by a random pseudonym and a Django user (username and password, no
name, phone or ID number). Institutions know the person by their own subject id, which the hub
never stores in clear: a :class:`Membership` keeps its keyed hash for lookup and an encrypted copy
for the few messages that must name it back to that institution.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def new_pseudonym() -> str:
    return "p_" + secrets.token_hex(10)


class Person(models.Model):
    """A person, or after erasure (``wallets.services.person_erase``) only their pseudonym: the user is
    gone (``user`` is NULL, ``erased_at`` set), while activities and ledger amounts stay under this row."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="person"
    )
    pseudonym = models.CharField(max_length=32, unique=True, default=new_pseudonym)
    created_at = models.DateTimeField(default=timezone.now)
    erased_at = models.DateTimeField(null=True, blank=True, help_text="When the person erased their account.")

    class Meta:
        verbose_name_plural = "persons"
        constraints = [
            # A user vanishes only through erasure: deleting one any other way fails here rather than
            # leaving a person who can neither sign in nor be told apart from an erased one.
            models.CheckConstraint(
                condition=Q(user__isnull=False) | Q(erased_at__isnull=False), name="person_user_or_erased"
            ),
        ]

    def __str__(self) -> str:
        return self.pseudonym


class LinkCode(models.Model):
    """A short single-use code a person hands to an institution to prove consent to a link.

    Only its hash is stored: a database reader cannot replay live codes.
    """

    person = models.ForeignKey(Person, on_delete=models.CASCADE, related_name="link_codes")
    code_hash = models.CharField(max_length=64, unique=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_by = models.ForeignKey(
        "institutions.Institution", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["person", "expires_at"], name="linkcode_person_live")]

    def __str__(self) -> str:
        return f"{self.person} until {self.expires_at:%H:%M}"


class Membership(models.Model):
    """(institution, subject) bound to a person.

    At most one active binding per subject, and per person and institution (a person links one
    account at each institution). Ending a binding keeps the row, with who ended it.
    """

    class EndedBy(models.TextChoices):
        INSTITUTION = "institution", "Institution (carbon.account.unlinked)"
        PERSON = "person", "Person"
        OPERATOR = "operator", "Operator"

    institution = models.ForeignKey("institutions.Institution", on_delete=models.PROTECT, related_name="memberships")
    person = models.ForeignKey(Person, on_delete=models.CASCADE, related_name="memberships")
    subject_ref = models.CharField(max_length=64, help_text="Keyed hash of the institution's subject id.")
    subject_sealed = models.TextField(help_text="The subject id, encrypted; never shown.")
    linked_at = models.DateTimeField(default=timezone.now)
    unlinked_at = models.DateTimeField(null=True, blank=True)
    unlinked_by = models.CharField(max_length=16, choices=EndedBy.choices, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["institution", "subject_ref"],
                condition=Q(unlinked_at__isnull=True),
                name="membership_one_active_link_per_subject",
            ),
            models.UniqueConstraint(
                fields=["institution", "person"],
                condition=Q(unlinked_at__isnull=True),
                name="membership_one_active_link_per_person_and_institution",
            ),
        ]
        indexes = [models.Index(fields=["institution", "subject_ref"], name="membership_lookup")]

    def __str__(self) -> str:
        return f"{self.person} @ {self.institution_id}"

    @property
    def is_active(self) -> bool:
        return self.unlinked_at is None


class LinkAttempt(models.Model):
    """Every attempt to redeem a link code, kept to limit and audit guessing."""

    class Result(models.TextChoices):
        LINKED = "linked", "Linked"
        ALREADY_LINKED = "already_linked", "Already linked to this person"
        WRONG_CODE = "wrong_code", "Wrong code"
        EXPIRED = "expired", "Expired"
        REUSED = "reused", "Already used"
        SUBJECT_TAKEN = "subject_taken", "Subject linked to another person"
        PERSON_HAS_OTHER_ACCOUNT = "person_has_other_account", "Person already linked another account here"
        THROTTLED = "throttled", "Too many failed attempts"

    institution = models.ForeignKey("institutions.Institution", on_delete=models.CASCADE, related_name="+")
    result = models.CharField(max_length=32, choices=Result.choices)
    person = models.ForeignKey(Person, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    event_id = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["institution", "created_at"], name="linkattempt_recent")]

    def __str__(self) -> str:
        return f"{self.institution_id} {self.result}"
