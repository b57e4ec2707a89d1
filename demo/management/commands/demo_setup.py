"""``manage.py demo_setup``: demo institutions, the provider's rewards and an admin, with their secrets saved
for the demo sender and each institution's endpoint on the demo receiver."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from clearinghouse.errors import HubError
from demo.receiver import endpoint_url
from institutions import crypto
from institutions.models import Credential, Institution
from institutions.outbox import institution_endpoint_enable
from institutions.services import credential_add, hub_public_keys, institution_register, institution_update
from settlement.models import Reward
from settlement.services import reward_create

CREDENTIALS_FILENAME = "demo-credentials.json"
ADMIN_USERNAME = "admin"
# Where demo_traffic runs the demo receiver, every demo institution's webhook endpoint (loopback: the
# hub delivers there only with HUB_ALLOW_PRIVATE_ENDPOINTS=1, which `make run` sets for the demo).
DEFAULT_RECEIVER_URL = "http://127.0.0.1:8001"


@dataclass(frozen=True)
class DemoInstitution:
    code: str
    name: str
    hmac: bool
    ed25519: bool
    provider: bool = False


# Three issuers covering every signing set-up (HMAC only, Ed25519 only, both) and one provider.
DEMO_INSTITUTIONS = (
    DemoInstitution("demo-bank-east", "East Harbour Bank (demo)", hmac=True, ed25519=False),
    DemoInstitution("demo-pay-west", "WestPay wallet (demo)", hmac=False, ed25519=True),
    DemoInstitution("demo-metro-card", "Metro Transit Card (demo)", hmac=True, ed25519=True),
    DemoInstitution("demo-rewards", "Green Rewards Mall (demo)", hmac=True, ed25519=True, provider=True),
)
PROVIDER = "demo-rewards"


@dataclass(frozen=True)
class DemoReward:
    code: str
    title: str
    points: int


# The provider's catalogue. The demo person's stories leave about 990 points spread 491 / 419 / 80 over
# the three issuers: the tote bag costs more than any issuer's share and than any two together, so only
# the pooled balance reaches it and all three pay for it; the bike year is out of reach.
DEMO_REWARDS = (
    DemoReward("demo-coffee-cup", "A coffee in your own cup", 150),
    DemoReward("demo-tote-bag", "Recycled-canvas tote bag", 950),
    DemoReward("demo-bike-year", "A year of shared bikes", 20000),
)


def default_credentials_path() -> Path:
    return Path(settings.VAR_DIR) / CREDENTIALS_FILENAME


def read_credentials(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise CommandError(f"{path} is not valid JSON ({exc}); move it away and run demo_setup again.") from exc
    return document if isinstance(document, dict) else {}


def write_credentials(path: Path, document: dict[str, Any]) -> None:
    """Write atomically, readable by the owner only (it holds live secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _entry_still_valid(institution: Institution, entry: dict[str, Any], spec: DemoInstitution) -> bool:
    """True when the saved secrets still match active credentials of ``institution``.

    A fresh database with an old file (or the reverse) must not leave the demo sender with secrets
    the hub no longer knows.
    """
    active = list(Credential.objects.filter(institution=institution, status=Credential.Status.ACTIVE))
    token = entry.get("api_token")
    if not token or not any(
        c.kind == Credential.Kind.API_TOKEN and c.token_hash == crypto.hash_token(token) for c in active
    ):
        return False
    if spec.hmac:
        secret = entry.get("hmac_secret")
        sealed = [c.secret_sealed for c in active if c.kind == Credential.Kind.HMAC]
        try:
            if not secret or secret not in {crypto.unseal(s) for s in sealed}:
                return False
        except crypto.MalformedKey:  # sealed under keys this process does not have
            return False
    if spec.ed25519:
        public = entry.get("ed25519_public_key") or ""
        keys = {c.public_key for c in active if c.kind == Credential.Kind.ED25519}
        if not entry.get("ed25519_private_key") or public.removeprefix(crypto.PUBLIC_KEY_PREFIX) not in keys:
            return False
    return True


class Command(BaseCommand):
    help = (
        "Register the demo institutions (three issuers and one reward provider, covering HMAC, Ed25519 "
        "and both) and an 'admin' superuser, through the same services as institution_register; give the "
        "provider its rewards (through reward_create) and every demo institution an endpoint on the demo "
        "receiver that demo_traffic runs (--receiver-url). "
        "Because the hub shows secrets only once, what the demo sender needs is saved to "
        f"VAR_DIR/{CREDENTIALS_FILENAME} (mode 600). Idempotent: existing institutions and the file are "
        "kept; institutions whose saved secrets are missing or stale get fresh credentials rotated in."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--credentials-file",
            type=Path,
            default=None,
            help=f"Where to save the demo secrets (default: VAR_DIR/{CREDENTIALS_FILENAME}).",
        )
        parser.add_argument(
            "--receiver-url",
            default=DEFAULT_RECEIVER_URL,
            help="Where demo_traffic runs the demo receiver; each demo institution's endpoint is "
            "<url>/hooks/<code> (default: %(default)s).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["credentials_file"] or default_credentials_path()
        document = read_credentials(path)
        saved: dict[str, Any] = document.get("institutions") or {}
        receiver_url: str = options["receiver_url"].rstrip("/")
        lines: list[str] = []
        changed = document.get("receiver_url") != receiver_url

        for spec in DEMO_INSTITUTIONS:
            try:
                with transaction.atomic():
                    outcome, entry = self._ensure_institution(spec, saved.get(spec.code))
                    endpoint = self._ensure_endpoint(spec, endpoint_url(receiver_url, spec.code))
            except HubError as exc:
                raise CommandError(f"{spec.code}: {exc.message}") from exc
            if outcome != "kept":
                saved[spec.code] = entry
                changed = True
            lines.append(f"  {outcome:<10} {spec.code:<16} {self._describe(spec)}; endpoint {endpoint}")
        for reward in DEMO_REWARDS:
            try:
                outcome = self._ensure_reward(reward)
            except HubError as exc:
                raise CommandError(f"reward {reward.code}: {exc.message}") from exc
            lines.append(
                f"  {outcome:<10} reward {reward.code} of {PROVIDER}: {reward.title!r}, {reward.points} points"
            )

        admin_outcome, admin_password = self._ensure_admin((document.get("admin") or {}).get("password"))
        if admin_outcome in ("created", "reset"):
            changed = True

        if changed or not path.exists():
            document = {
                "about": "Written by manage.py demo_setup for manage.py demo_traffic. Demo secrets: never use in "
                "production. The hub shows secrets only once; this file is the demo's copy.",
                "admin": {"username": ADMIN_USERNAME, "password": admin_password},
                "hub_public_keys": [key.public_key for key in hub_public_keys()],
                "receiver_url": receiver_url,
                "institutions": saved,
            }
            write_credentials(path, document)
        else:
            os.chmod(path, 0o600)

        self.stdout.write("demo_setup: institutions and rewards")
        for line in lines:
            self.stdout.write(line)
        if admin_outcome == "kept":
            self.stdout.write(f"  {'kept':<10} superuser {ADMIN_USERNAME!r} (password in {path})")
        elif admin_outcome == "untouched":
            self.stdout.write(
                f"  {'untouched':<10} superuser {ADMIN_USERNAME!r}: its password was changed by hand, not the saved one"
            )
        else:
            self.stdout.write(f"  {admin_outcome:<10} superuser {ADMIN_USERNAME!r}, password {admin_password}")
        self.stdout.write(f"demo_setup: secrets {'saved to' if changed else 'unchanged in'} {path} (mode 600)")

    @staticmethod
    def _describe(spec: DemoInstitution) -> str:
        signing = " + ".join(name for name, on in (("HMAC v1", spec.hmac), ("Ed25519 v1a", spec.ed25519)) if on)
        return f"{signing}{', provider' if spec.provider else ''}"

    @staticmethod
    def _ensure_endpoint(spec: DemoInstitution, url: str) -> str:
        """Point the institution's endpoint at the demo receiver, re-enabled if a 410 or 429 had stopped it."""
        institution = Institution.objects.get(code=spec.code)
        if institution.endpoint_url != url:
            institution_update(
                institution=institution,
                name=institution.name,
                endpoint_url=url,
                is_provider=institution.is_provider,
                rate_limit_per_second=institution.rate_limit_per_second,
            )
        if institution.endpoint_disabled_at is not None or institution.endpoint_paused_until is not None:
            institution_endpoint_enable(institution=institution)
        return url

    @staticmethod
    def _ensure_reward(reward: DemoReward) -> str:
        """Add the reward through ``reward_create``; one that exists is kept as the operator may have edited it."""
        if Reward.objects.filter(code=reward.code).exists():
            return "kept"
        reward_create(
            provider=Institution.objects.get(code=PROVIDER), code=reward.code, title=reward.title, points=reward.points
        )
        return "created"

    def _ensure_institution(self, spec: DemoInstitution, entry: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """Register ``spec`` or, when it exists without usable saved secrets, rotate fresh ones in."""
        private_key = public_key = None
        if spec.ed25519:
            private_key, public_key = crypto.new_ed25519_keypair()
        institution = Institution.objects.filter(code=spec.code).first()
        if institution is None:
            issued = institution_register(
                code=spec.code,
                name=spec.name,
                hmac=spec.hmac,
                ed25519_public_key=public_key,
                is_provider=spec.provider,
            )
            outcome = "registered"
        elif entry and _entry_still_valid(institution, entry, spec):
            return "kept", entry
        else:
            # The old credentials stay active (nothing is retired): someone may still hold them.
            issued = credential_add(
                institution=institution, hmac=spec.hmac, ed25519_public_key=public_key, api_token=True
            )
            outcome = "rotated"
        return outcome, {
            "name": spec.name,
            "provider": spec.provider,
            "hmac_secret": issued.hmac_secret,
            "ed25519_private_key": private_key,
            "ed25519_public_key": public_key,
            "api_token": issued.api_token,
        }

    @staticmethod
    def _ensure_admin(saved_password: str | None) -> tuple[str, str | None]:
        """Create the superuser, or give it a password when the file has none for it.

        An existing admin whose password differs from the saved one was changed by hand: left alone.
        """
        user_model = get_user_model()
        user = user_model.objects.filter(username=ADMIN_USERNAME).first()
        if user is not None and saved_password:
            return ("kept" if user.check_password(saved_password) else "untouched"), saved_password
        password = secrets.token_urlsafe(12)
        if user is None:
            user_model.objects.create_superuser(ADMIN_USERNAME, "", password)
            return "created", password
        user.set_password(password)
        user.is_staff = user.is_superuser = user.is_active = True
        user.save(update_fields=["password", "is_staff", "is_superuser", "is_active"])
        return "reset", password
