"""Django admin for operators: pages load, registration shows secrets once, actions go through services."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from institutions import crypto
from institutions.models import Credential, HubKey, InboxEvent, Institution
from institutions.services import credential_add, hub_signing_key
from tests.conftest import make_sender

pytestmark = pytest.mark.django_db

SECRET = re.compile(r"whsec_[A-Za-z0-9+/=]+")
TOKEN = re.compile(r"chtok_[A-Za-z0-9_-]+")


def found(pattern: re.Pattern[str], html: str) -> str:
    match = pattern.search(html)
    assert match is not None, f"{pattern.pattern} not on the page"
    return match.group(0)


def changelist(model: str) -> str:
    return reverse(f"admin:institutions_{model}_changelist")


def run_action(client, model: str, action: str, ids: list[int], *, follow: bool = True):
    return client.post(
        changelist(model), {"action": action, "_selected_action": [str(pk) for pk in ids]}, follow=follow
    )


def page_messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def inbox_row(institution: Institution, event_id: str, **fields) -> InboxEvent:
    defaults = {
        "type": "carbon.activity.recorded",
        "source": "/bank/app",
        "data": {"action": "transit.metro", "quantity": "1", "unit": "km"},
        "content_hash": "0" * 64,
        "webhook_id": f"msg_{event_id}",
    }
    return InboxEvent.objects.create(institution=institution, event_id=event_id, **{**defaults, **fields})


# --- Pages ------------------------------------------------------------------------------------------


def test_every_institutions_page_loads_for_a_superuser(admin_client, bank):
    hub_signing_key()
    event = inbox_row(bank.institution, "e1")
    credential = bank.institution.credentials.first()
    urls = [
        changelist("institution"),
        reverse("admin:institutions_institution_add"),
        reverse("admin:institutions_institution_change", args=[bank.institution.pk]),
        changelist("credential"),
        reverse("admin:institutions_credential_change", args=[credential.pk]),
        changelist("hubkey"),
        reverse("admin:institutions_hubkey_change", args=[HubKey.objects.get().pk]),
        changelist("inboxevent"),
        reverse("admin:institutions_inboxevent_change", args=[event.pk]),
        changelist("inboxevent") + f"?status=received&type=carbon.activity.recorded&institution__id__exact="
        f"{bank.institution.pk}&awaiting_handler=yes&q=e1",
        changelist("institution") + "?status=active&is_provider__exact=0&q=bank",
    ]
    for url in urls:
        response = admin_client.get(url)
        assert response.status_code == 200, (url, response.status_code)


def test_the_institution_list_counts_active_credentials_without_a_query_per_row(admin_client, bank):
    response = admin_client.get(changelist("institution"))
    row = response.context["cl"].result_list[0]
    assert row.active_credential_count == 3  # HMAC, Ed25519, API token
    with CaptureQueriesContext(connection) as few:
        admin_client.get(changelist("institution"))
    for n in range(5):
        make_sender(f"bank-{n}x")
    with CaptureQueriesContext(connection) as many:
        admin_client.get(changelist("institution"))
    assert len(many) == len(few)


def test_the_inbox_list_does_not_query_per_row(admin_client, bank, other_bank):
    inbox_row(bank.institution, "e1")
    with CaptureQueriesContext(connection) as few:
        admin_client.get(changelist("inboxevent"))
    for n in range(10):
        inbox_row(other_bank.institution if n % 2 else bank.institution, f"e{n + 2}")
    with CaptureQueriesContext(connection) as many:
        admin_client.get(changelist("inboxevent"))
    assert len(many) == len(few)


def test_secret_material_never_appears_on_credential_pages(admin_client, bank):
    pages = [changelist("credential"), changelist("institution")]
    pages += [reverse("admin:institutions_credential_change", args=[c.pk]) for c in Credential.objects.all()]
    pages.append(reverse("admin:institutions_institution_change", args=[bank.institution.pk]))
    hmac_row = Credential.objects.get(kind="hmac")
    token_row = Credential.objects.get(kind="api_token")
    for url in pages:
        html = admin_client.get(url).content.decode()
        assert bank.hmac_secret not in html and bank.api_token not in html
        assert hmac_row.secret_sealed not in html and token_row.token_hash not in html


def test_hub_keys_are_read_only_and_never_show_the_private_half(admin_client):
    key, _ = hub_signing_key()
    html = admin_client.get(reverse("admin:institutions_hubkey_change", args=[key.pk])).content.decode()
    assert key.public_key in html and key.private_key_sealed not in html
    assert admin_client.get(reverse("admin:institutions_hubkey_add")).status_code == 403


# --- Registration -----------------------------------------------------------------------------------


def test_registering_in_admin_shows_the_secrets_once_and_stores_them_only_sealed(admin_client):
    response = admin_client.post(
        reverse("admin:institutions_institution_add"),
        {"code": "green-bank", "name": "Green Bank", "hmac": "on", "endpoint_url": "https://bank.example/hooks"},
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "Shown only once" in html
    assert "no-store" in response["Cache-Control"]
    secret = found(SECRET, html)
    token = found(TOKEN, html)

    institution = Institution.objects.get(code="green-bank")
    assert institution.endpoint_url == "https://bank.example/hooks" and institution.is_active
    hmac_row = institution.credentials.get(kind="hmac")
    assert secret not in hmac_row.secret_sealed and crypto.unseal(hmac_row.secret_sealed) == secret
    assert institution.credentials.get(kind="api_token").token_hash == crypto.hash_token(token)
    # Nowhere else: not in the admin log, the session (messages) or any later page.
    assert LogEntry.objects.filter(object_id=str(institution.pk), action_flag=1).exists()
    for entry in LogEntry.objects.all():
        assert secret not in entry.change_message and token not in entry.change_message
    for session in Session.objects.all():
        decoded = str(session.get_decoded())
        assert secret not in decoded and token not in decoded
    for url in [changelist("institution"), reverse("admin:institutions_institution_change", args=[institution.pk])]:
        later = admin_client.get(url).content.decode()
        assert secret not in later and token not in later


def test_registering_with_an_ed25519_key_only(admin_client):
    _, public = crypto.new_ed25519_keypair()
    response = admin_client.post(
        reverse("admin:institutions_institution_add"),
        {"code": "pay-app", "name": "Pay App", "ed25519_public_key": public, "is_provider": "on"},
    )
    assert response.status_code == 200
    assert SECRET.search(response.content.decode()) is None and TOKEN.search(response.content.decode())
    institution = Institution.objects.get(code="pay-app")
    assert institution.is_provider
    assert sorted(institution.credentials.values_list("kind", flat=True)) == ["api_token", "ed25519"]


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"code": "bank-a", "name": "Again", "hmac": "on"}, "already registered"),
        ({"code": "new-bank", "name": "No Keys"}, "at least one"),
        ({"code": "Bad Code!", "name": "Bad", "hmac": "on"}, "[a-z0-9-]"),
        ({"code": "new-bank", "name": "Bad Key", "ed25519_public_key": "whpk_nope"}, "ed25519"),
        ({"code": "new-bank", "name": "Bad URL", "hmac": "on", "endpoint_url": "ftp://x"}, "endpoint"),
    ],
)
def test_registration_errors_come_back_on_the_form(admin_client, bank, form, message):
    before = (Institution.objects.count(), Credential.objects.count())
    response = admin_client.post(reverse("admin:institutions_institution_add"), form)
    assert response.status_code == 200
    errors = " ".join(str(e) for e in response.context["adminform"].form.non_field_errors())
    assert message.lower() in errors.lower()
    assert (Institution.objects.count(), Credential.objects.count()) == before


def test_editing_an_institution_goes_through_the_service(admin_client, bank):
    url = reverse("admin:institutions_institution_change", args=[bank.institution.pk])
    response = admin_client.post(
        url,
        {
            "name": "Bank A renamed",
            "endpoint_url": "https://a.example/hooks",
            "rate_limit_per_second": "7",
            **_empty_inline(),
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    bank.institution.refresh_from_db()
    assert (bank.institution.name, bank.institution.rate_limit_per_second) == ("Bank A renamed", 7)
    assert bank.institution.status == "active" and bank.institution.code == "bank-a"


def _empty_inline() -> dict[str, str]:
    # The read-only credentials inline still posts its management form.
    return {
        "credentials-TOTAL_FORMS": "0",
        "credentials-INITIAL_FORMS": "0",
        "credentials-MIN_NUM_FORMS": "0",
        "credentials-MAX_NUM_FORMS": "1000",
    }


# --- Actions ----------------------------------------------------------------------------------------


def test_suspend_and_reactivate(admin_client, bank, other_bank):
    ids = [bank.institution.pk, other_bank.institution.pk]
    response = run_action(admin_client, "institution", "suspend", ids)
    assert "Suspended 2 institution(s)." in page_messages(response)
    assert set(Institution.objects.values_list("status", flat=True)) == {"suspended"}

    response = run_action(admin_client, "institution", "reactivate", [bank.institution.pk])
    assert "Reactivated 1 institution(s)." in page_messages(response)
    assert Institution.objects.get(code="bank-a").status == "active"
    assert Institution.objects.get(code="bank-b").status == "suspended"


def test_a_suspended_institution_is_refused_at_the_intake(admin_client, client, bank):
    from tests.conftest import activity, post_events

    run_action(admin_client, "institution", "suspend", [bank.institution.pk])
    assert post_events(client, bank, activity()).status_code == 401


def test_rotate_issues_a_new_hmac_secret_shown_once_beside_the_old(admin_client, bank):
    response = run_action(admin_client, "institution", "issue_hmac_secret", [bank.institution.pk], follow=False)
    assert response.status_code == 200 and "Shown only once" in response.content.decode()
    secret = found(SECRET, response.content.decode())
    assert secret != bank.hmac_secret
    hmac_rows = Credential.objects.filter(institution=bank.institution, kind="hmac", status="active")
    assert sorted(crypto.unseal(c.secret_sealed) for c in hmac_rows) == sorted([secret, bank.hmac_secret])


def test_issue_a_new_api_token(admin_client, bank, client):
    response = run_action(admin_client, "institution", "issue_api_token", [bank.institution.pk], follow=False)
    token = found(TOKEN, response.content.decode())
    assert token != bank.api_token
    assert Credential.objects.filter(institution=bank.institution, kind="api_token", status="active").count() == 2
    answer = client.get(f"{bank.url}/nothing", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 404  # authenticated; there is no such event


def test_retire_a_credential_and_refuse_the_last_signing_one(admin_client):
    sender = make_sender("solo-bank", hmac=True, ed25519=False)
    old = Credential.objects.get(institution=sender.institution, kind="hmac")
    credential_add(institution=sender.institution, hmac=True)
    new = Credential.objects.filter(institution=sender.institution, kind="hmac").exclude(pk=old.pk).get()

    response = run_action(admin_client, "credential", "retire", [old.pk])
    assert "Retired 1 credential(s)." in page_messages(response)
    old.refresh_from_db()
    assert old.status == "retired" and old.retired_at is not None

    response = run_action(admin_client, "credential", "retire", [new.pk])
    assert any("last signing credential" in m for m in page_messages(response))
    new.refresh_from_db()
    assert new.status == "active"


def test_replay_puts_quarantined_and_dead_events_back_and_skips_the_rest(admin_client, bank):
    quarantined = inbox_row(bank.institution, "q1", status="quarantined", attempts=1, last_error="unknown_action")
    dead = inbox_row(bank.institution, "d1", status="dead", attempts=5, last_error="RuntimeError: boom")
    processed = inbox_row(bank.institution, "p1", status="processed", attempts=1)
    response = run_action(admin_client, "inboxevent", "replay", [quarantined.pk, dead.pk, processed.pk])
    assert "Replayed 2 event(s); skipped 1 that were not quarantined or dead." in page_messages(response)
    statuses = dict(InboxEvent.objects.values_list("event_id", "status"))
    assert statuses == {"q1": "received", "d1": "received", "p1": "processed"}
    assert InboxEvent.objects.get(event_id="d1").attempts == 0


def test_received_events_without_a_handler_are_marked_awaiting(admin_client, bank, monkeypatch):
    monkeypatch.setattr("institutions.admin.handled_types", lambda: ["carbon.activity.recorded"])
    inbox_row(bank.institution, "handled")
    inbox_row(bank.institution, "waiting", type="carbon.account.linked", data={"link_code": "ABC"})
    inbox_row(bank.institution, "done", type="carbon.account.linked", status="processed")
    response = admin_client.get(changelist("inboxevent") + "?awaiting_handler=yes")
    assert [e.event_id for e in response.context["cl"].result_list] == ["waiting"]
    admin = response.context["cl"].model_admin
    rows = {e.event_id: admin.awaiting_handler(e) for e in InboxEvent.objects.all()}
    assert rows == {"handled": False, "waiting": True, "done": False}


def test_staff_without_change_permission_get_no_write_actions(client, bank):
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_institution", "view_credential", "view_inboxevent"])
    )
    client.force_login(viewer)
    for model in ("institution", "credential", "inboxevent"):
        response = client.get(changelist(model))
        assert response.status_code == 200
        assert not response.context["action_form"] or not [
            name for name, _ in response.context["action_form"].fields["action"].choices if name
        ]
    assert client.get(reverse("admin:institutions_institution_add")).status_code == 403
