"""Outbound delivery against a real HTTP receiver on 127.0.0.1 (CONTRACT.md section 3).

Time is driven by moving ``next_attempt_at`` into the past, never by sleeping.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from institutions import crypto, outbox, services
from institutions.models import DeliveryAttempt, Institution, OutboxMessage
from tests.conftest import Receiver, Sender, free_port, make_sender

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _allow_private(settings: Any) -> None:
    settings.HUB_ALLOW_PRIVATE_ENDPOINTS = True


def _provider(url: str, code: str = "shop-a") -> Sender:
    sender = make_sender(code, provider=True)
    Institution.objects.filter(pk=sender.institution.pk).update(endpoint_url=url)
    sender.institution.refresh_from_db()
    return sender


def _enqueue(sender: Sender, n: int = 1) -> list[OutboxMessage]:
    with transaction.atomic():
        return [
            outbox.outbox_enqueue(
                institution=sender.institution,
                type="carbon.redemption.requested",
                data={"redemption_id": f"r-{i}", "reward": "coffee", "points": 100, "quantity": 1, "subject": None},
            )
            for i in range(n)
        ]


def _make_due() -> None:
    OutboxMessage.objects.filter(status__in=["pending", "failed"]).update(next_attempt_at=timezone.now())
    Institution.objects.update(endpoint_paused_until=None)


def test_signatures_verify_and_webhook_id_is_stable_across_retries(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    answers = iter([500, 200])
    receiver.respond = lambda h, b: (next(answers), {})
    (message,) = _enqueue(sender)

    assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 1, "dead": 0}
    message.refresh_from_db()
    assert message.status == "failed" and message.attempts == 1 and message.last_status_code == 500
    wait = (message.next_attempt_at - timezone.now()).total_seconds()
    assert 4.0 <= wait <= 5.6  # 5 s with +-10 % jitter

    assert outbox.deliveries_send(limit=10) == {}  # not due yet
    _make_due()
    assert outbox.deliveries_send(limit=10) == {"delivered": 1, "failed": 0, "dead": 0}
    message.refresh_from_db()
    assert message.status == "delivered" and message.delivered_at is not None and message.attempts == 2

    assert len(receiver.requests) == 2
    ids = {h["webhook-id"] for h, _ in receiver.requests}
    assert ids == {message.message_id}
    hub_key = crypto.public_key_bytes(services.hub_public_keys()[0].public_key)
    secret = crypto.hmac_secret_bytes(sender.hmac_secret or "")
    for headers, body in receiver.requests:
        assert headers["content-type"] == "application/cloudevents+json"
        args = (headers["webhook-id"], headers["webhook-timestamp"], body, headers["webhook-signature"])
        assert crypto.verify(*args, hmac_secrets=[], ed25519_public_keys=[hub_key])  # v1a alone
        assert crypto.verify(*args, hmac_secrets=[secret], ed25519_public_keys=[])  # v1 alone
        assert not crypto.verify(*args, hmac_secrets=[b"x" * 32], ed25519_public_keys=[])
        event = json.loads(body)
        assert event["id"] == message.message_id and event["type"] == "carbon.redemption.requested"
        assert event["data"]["redemption_id"] == "r-0" and event["specversion"] == "1.0"
    assert receiver.requests[0][1] == receiver.requests[1][1]  # the body is built once
    attempts = list(DeliveryAttempt.objects.filter(message=message).values_list("status_code", flat=True))
    assert attempts == [500, 200]


def test_a_sealed_subject_is_sent_in_the_clear_and_the_same_on_every_attempt(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    answers = iter([503, 200])
    receiver.respond = lambda h, b: (next(answers), {})
    with transaction.atomic():
        message = outbox.outbox_enqueue(
            institution=sender.institution,
            type="carbon.redemption.requested",
            data={"redemption_id": "r-1", "reward": "coffee", "points": 10, "quantity": 1, "subject": None},
            subject_sealed=crypto.seal("member-0042"),
        )
    assert "member-0042" not in OutboxMessage.objects.get().body  # not at rest

    outbox.deliveries_send(limit=10)
    _make_due()
    outbox.deliveries_send(limit=10)

    (_, first_body), (second, body) = receiver.requests
    assert first_body == body  # the same text on both attempts
    event = json.loads(body)
    assert event["data"] == {
        "redemption_id": "r-1",
        "reward": "coffee",
        "points": 10,
        "quantity": 1,
        "subject": "member-0042",
    }
    hub_key = crypto.public_key_bytes(services.hub_public_keys()[0].public_key)
    args = (second["webhook-id"], second["webhook-timestamp"], body, second["webhook-signature"])
    assert second["webhook-id"] == message.message_id
    assert crypto.verify(*args, hmac_secrets=[], ed25519_public_keys=[hub_key])  # signed as sent


def test_a_subject_no_key_unseals_fails_that_attempt_only(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    (fine,) = _enqueue(sender)
    with transaction.atomic():
        lost = outbox.outbox_enqueue(
            institution=sender.institution,
            type="carbon.redemption.requested",
            data={"redemption_id": "r-9", "subject": None},
            subject_sealed=Fernet(Fernet.generate_key()).encrypt(b"member-1").decode(),  # a retired key's
        )

    assert outbox.deliveries_send(limit=10) == {"delivered": 1, "failed": 1, "dead": 0}
    lost.refresh_from_db()
    assert lost.status == "failed" and "cannot be unsealed" in lost.last_error
    assert [json.loads(body)["id"] for _, body in receiver.requests] == [fine.message_id]


def test_without_hmac_secret_only_v1a_is_sent(receiver: Receiver) -> None:
    sender = make_sender("shop-b", hmac=False, provider=True)
    Institution.objects.filter(pk=sender.institution.pk).update(endpoint_url=receiver.url)
    _enqueue(sender)
    outbox.deliveries_send(limit=10)
    ((headers, _),) = receiver.requests
    assert [part.split(",")[0] for part in headers["webhook-signature"].split()] == ["v1a"]


def test_flaky_receiver_that_was_down_gets_every_message_exactly_once_in_effect() -> None:
    port = free_port()
    sender = _provider(f"http://127.0.0.1:{port}/hooks")
    messages = _enqueue(sender, 60)

    # Down: nothing listens on the port.
    tally = outbox.deliveries_send(limit=100)
    assert tally == {"delivered": 0, "failed": 60, "dead": 0}
    errors = DeliveryAttempt.objects.values_list("error", flat=True)
    assert all("Connection" in e or "refused" in e.lower() for e in errors)

    # Up, failing 40 % of the time; half of the failures happen after the receiver applied the
    # message (a lost answer), so the hub resends what the receiver already has.
    receiver = Receiver(port)
    rng = random.Random(1234)

    def flaky(headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        roll = rng.random()
        if roll < 0.2:
            return 500, {}
        if roll < 0.4:
            receiver.effects[headers["webhook-id"]] = 1  # applied, but the answer is lost
            return 503, {}
        return 200, {}

    receiver.respond = flaky
    try:
        for _ in range(12):
            _make_due()
            if not outbox.deliveries_send(limit=100):
                break
    finally:
        receiver.close()

    assert OutboxMessage.objects.filter(status="delivered").count() == 60
    assert set(receiver.effects) == {m.message_id for m in messages}
    assert set(receiver.effects.values()) == {1}
    sent_ids = [h["webhook-id"] for h, _ in receiver.requests]
    assert len(sent_ids) > 60  # retries and duplicates did happen...
    assert set(sent_ids) == set(receiver.effects)  # ...always under the message's own webhook-id
    total_attempts = sum(OutboxMessage.objects.values_list("attempts", flat=True))
    assert DeliveryAttempt.objects.count() == total_attempts
    answered = DeliveryAttempt.objects.filter(status_code__isnull=False).count()
    assert answered == len(sent_ids)  # every request the receiver saw is on record


def test_410_disables_the_endpoint_and_holds_the_rest(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    receiver.respond = lambda h, b: (410, {})
    (first,) = _enqueue(sender)
    assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 0, "dead": 1}
    first.refresh_from_db()
    sender.institution.refresh_from_db()
    assert first.status == "dead" and first.last_status_code == 410
    assert sender.institution.endpoint_disabled_at is not None

    (second,) = _enqueue(sender)
    assert outbox.deliveries_send(limit=10) == {}  # held while disabled
    assert len(receiver.requests) == 1

    receiver.respond = lambda h, b: (204, {})
    outbox.institution_endpoint_enable(institution=sender.institution)
    assert outbox.deliveries_send(limit=10) == {"delivered": 1, "failed": 0, "dead": 0}
    assert outbox.outbox_replay(ids=[first.pk, second.pk]) == 1  # only the dead one
    assert outbox.deliveries_send(limit=10) == {"delivered": 1, "failed": 0, "dead": 0}
    first.refresh_from_db()
    assert first.status == "delivered" and first.attempts == 1  # a fresh schedule


def test_redirect_is_not_followed_and_counts_as_failure(receiver: Receiver) -> None:
    elsewhere = Receiver()
    try:
        receiver.respond = lambda h, b: (302, {"Location": elsewhere.url})
        sender = _provider(receiver.url)
        (message,) = _enqueue(sender)
        assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 1, "dead": 0}
        assert elsewhere.requests == []
    finally:
        elsewhere.close()
    message.refresh_from_db()
    assert message.status == "failed" and message.last_status_code == 302
    assert "redirect" in message.last_error and "not followed" in message.last_error


def test_loopback_endpoint_is_refused_without_the_setting(receiver: Receiver, settings: Any) -> None:
    settings.HUB_ALLOW_PRIVATE_ENDPOINTS = False
    sender = _provider(receiver.url)
    (message,) = _enqueue(sender)
    assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 1, "dead": 0}
    assert receiver.requests == []
    message.refresh_from_db()
    assert message.status == "failed" and message.last_status_code is None
    assert "refused" in message.last_error and "127.0.0.1" in message.last_error
    assert DeliveryAttempt.objects.get(message=message).error == message.last_error


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("0.0.0.0", False),  # noqa: S104
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        # IPv6 forms that carry an IPv4 address the traffic ends up at: 6to4 (2002::/16) is global
        # itself, so its IPv4 is checked; Teredo (2001::/32, client address obfuscated) and NAT64's
        # well-known prefix (64:ff9b::/96, inside the reserved ::/8) are refused whatever they carry.
        ("2002:a9fe:a9fe::1", False),  # 169.254.169.254, the cloud metadata service
        ("2002:7f00:1::1", False),  # 127.0.0.1
        ("2002:a01:203::1", False),  # 10.1.2.3
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # 169.254.169.254
        ("64:ff9b::7f00:1", False),  # 127.0.0.1
        ("64:ff9b::5db8:d822", False),  # 93.184.216.34
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("2002:5db8:d822::1", True),  # 6to4 of a public address
    ],
)
def test_ssrf_guard_classifies_addresses(address: str, public: bool) -> None:
    assert outbox._is_public(address) is public


def test_retry_after_on_429_pushes_the_next_attempt_and_pauses_the_endpoint(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    receiver.respond = lambda h, b: (429, {"Retry-After": "600"})
    (message,) = _enqueue(sender)
    before = timezone.now()
    assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 1, "dead": 0}
    message.refresh_from_db()
    sender.institution.refresh_from_db()
    assert message.next_attempt_at >= before + timedelta(seconds=599)
    assert sender.institution.endpoint_paused_until is not None
    assert sender.institution.endpoint_paused_until >= before + timedelta(seconds=599)

    # Another message, due at once, waits for the pause too.
    _enqueue(sender)
    assert outbox.deliveries_send(limit=10) == {}
    assert len(receiver.requests) == 1


def test_502_without_retry_after_slows_down_briefly(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    receiver.respond = lambda h, b: (502, {})
    _enqueue(sender)
    before = timezone.now()
    outbox.deliveries_send(limit=10)
    sender.institution.refresh_from_db()
    assert sender.institution.endpoint_paused_until is not None
    paused = (sender.institution.endpoint_paused_until - before).total_seconds()
    assert 0 < paused <= outbox.SLOW_DOWN_SECONDS + 1


def test_each_paused_endpoint_gets_its_own_pause_and_a_longer_one_stays(receiver: Receiver) -> None:
    a, b, c = (_provider(receiver.url, code).institution for code in ("shop-a", "shop-b", "shop-c"))
    for institution in (a, b, c):
        outbox.outbox_enqueue(institution=institution, type="carbon.redemption.requested", data={})
    messages = list(OutboxMessage.objects.filter(pk__in=outbox._claim(limit=10)).order_by("id"))
    longer = timezone.now() + timedelta(hours=1)
    Institution.objects.filter(pk=c.pk).update(endpoint_paused_until=longer)  # paused meanwhile, for longer
    waits = {a.pk: "600", b.pk: "60", c.pk: "60"}
    results = [outbox.Result(429, "HTTP 429", 1, waits[m.institution_id]) for m in messages]
    now = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        assert outbox._record(messages, results, now, rng=None) == {"delivered": 0, "failed": 3, "dead": 0}
    assert sum(q["sql"].startswith(f'UPDATE "{Institution._meta.db_table}"') for q in queries) == 1
    paused = dict(Institution.objects.filter(pk__in=waits).values_list("pk", "endpoint_paused_until"))
    seconds = {pk: (until - now).total_seconds() for pk, until in paused.items() if until is not None}
    assert 599 <= seconds[a.pk] <= 601 and 59 <= seconds[b.pk] <= 61
    assert paused[c.pk] == longer


def test_retry_after_parsing() -> None:
    now = timezone.now()
    assert outbox.parse_retry_after("120", now=now) == 120
    assert outbox.parse_retry_after("99999999", now=now) == outbox.MAX_RETRY_AFTER_SECONDS
    date = (now + timedelta(seconds=300)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 298 <= (outbox.parse_retry_after(date, now=now) or 0) <= 300
    assert outbox.parse_retry_after("soon", now=now) is None
    assert outbox.parse_retry_after(None) is None


def test_dead_after_the_last_attempt_with_every_attempt_stored(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    receiver.respond = lambda h, b: (500, {})
    (message,) = _enqueue(sender)
    waits = []
    for _ in range(outbox.MAX_ATTEMPTS):
        _make_due()
        sent_at = timezone.now()
        outbox.deliveries_send(limit=10, rng=random.Random(7))
        message.refresh_from_db()
        if message.status == "failed":
            waits.append((message.next_attempt_at - sent_at).total_seconds())
    assert message.status == "dead" and message.attempts == outbox.MAX_ATTEMPTS
    assert DeliveryAttempt.objects.filter(message=message).count() == outbox.MAX_ATTEMPTS
    assert len(receiver.requests) == outbox.MAX_ATTEMPTS
    for wait, base in zip(waits, outbox.RETRY_SCHEDULE[1:], strict=True):
        assert base * 0.9 - 1 <= wait <= base * 1.1 + 1
    _make_due()
    assert outbox.deliveries_send(limit=10) == {}  # dead stays dead until replayed


def test_enqueue_belongs_to_the_callers_transaction(
    receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    sender = _provider(receiver.url)
    with pytest.raises(RuntimeError), transaction.atomic():
        _enqueue(sender)
        raise RuntimeError("the state change failed")
    assert OutboxMessage.objects.count() == 0

    with django_capture_on_commit_callbacks() as callbacks:
        _enqueue(sender)
    assert len(callbacks) == 1  # the kick after the commit
    assert OutboxMessage.objects.filter(status="pending").count() == 1


def test_messages_without_an_endpoint_are_held() -> None:
    sender = make_sender("shop-c", provider=True)
    _enqueue(sender)
    assert outbox.deliveries_send(limit=10) == {}
    assert OutboxMessage.objects.get().status == "pending"


def test_a_lost_worker_still_uses_up_the_attempt(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    (message,) = _enqueue(sender)
    OutboxMessage.objects.filter(pk=message.pk).update(attempts=outbox.MAX_ATTEMPTS - 1)
    assert outbox.deliveries_claim(limit=10) == [message.pk]  # claimed, then the worker dies
    assert outbox.deliveries_claim(limit=10) == []  # leased
    _make_due()  # the lease ran out
    assert outbox.deliveries_claim(limit=10) == []
    message.refresh_from_db()
    assert message.status == "dead" and receiver.requests == []


def test_a_worker_whose_lease_ran_out_leaves_the_message_to_the_worker_that_took_it_over(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A's batch outlives its lease; worker B claims the message again, delivers it and records
    that; A's late write-back (a 500) must not turn the delivered message back into a failed one."""
    sender = _provider(receiver.url)
    answers = iter([500, 200])  # A's request, then B's
    receiver.respond = lambda h, b: (next(answers), {})
    (message,) = _enqueue(sender)
    record = outbox._record

    def record_late(*args: Any, **kwargs: Any) -> dict[str, int]:
        monkeypatch.setattr(outbox, "_record", record)  # B records as usual
        _make_due()  # A's lease ran out while its batch was still running
        assert outbox.deliveries_send(limit=10) == {"delivered": 1, "failed": 0, "dead": 0}  # B
        return record(*args, **kwargs)  # A, late

    monkeypatch.setattr(outbox, "_record", record_late)
    with caplog.at_level("WARNING", logger="institutions.outbox"):
        assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 0, "dead": 0}  # A
    message.refresh_from_db()
    assert message.status == "delivered" and message.last_status_code == 200 and message.attempts == 2
    assert "lease" in caplog.text and message.message_id in caplog.text
    # Both requests went out and both are on record, one per counted attempt.
    codes = DeliveryAttempt.objects.filter(message=message).order_by("id").values_list("status_code", flat=True)
    assert list(codes) == [200, 500]  # B's recorded first


def test_a_message_claimed_again_before_its_worker_loaded_it_is_not_sent_twice(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = _provider(receiver.url)
    (message,) = _enqueue(sender)
    claim = outbox._claim

    def claimed_again_meanwhile(*, limit: int) -> dict[int, int]:
        claimed = claim(limit=limit)
        OutboxMessage.objects.filter(pk__in=claimed).update(attempts=F("attempts") + 1)  # another worker's claim
        return claimed

    monkeypatch.setattr(outbox, "_claim", claimed_again_meanwhile)
    assert outbox.deliveries_send(limit=10) == {"delivered": 0, "failed": 0, "dead": 0}
    assert receiver.requests == []
    message.refresh_from_db()
    assert message.status == "pending" and message.attempts == 2  # left to the other worker


def test_the_lease_allows_for_resolving_the_endpoints_names(receiver: Receiver) -> None:
    sender = _provider(receiver.url)
    (message,) = _enqueue(sender)
    claimed_at = timezone.now()
    assert outbox.deliveries_claim(limit=10) == [message.pk]
    message.refresh_from_db()
    lease = (message.next_attempt_at - claimed_at).total_seconds()
    assert lease >= outbox.RESOLVE_SECONDS + outbox.TIMEOUT_SECONDS  # a slow name, then a request timing out


def test_a_batchs_endpoints_are_resolved_at_once(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    resolve = outbox.resolve_endpoint

    def slow(host: str, port: int, *, allow_private: bool) -> str:
        time.sleep(0.3)
        return resolve(host, port, allow_private=allow_private)

    monkeypatch.setattr(outbox, "resolve_endpoint", slow)
    for code in ("shop-a", "shop-b", "shop-c", "shop-d"):
        _enqueue(_provider(receiver.url, code))
    started = time.monotonic()
    assert outbox.deliveries_send(limit=10) == {"delivered": 4, "failed": 0, "dead": 0}
    assert time.monotonic() - started < 0.9  # not 4 x 0.3 s one after the other


def test_admin_lists_and_acts(receiver: Receiver, admin_client: Any) -> None:
    sender = _provider(receiver.url)
    receiver.respond = lambda h, b: (500, {})
    (message,) = _enqueue(sender)
    outbox.deliveries_send(limit=10)
    response = admin_client.get("/admin/institutions/outboxmessage/?status__exact=failed")
    assert response.status_code == 200 and message.message_id in response.content.decode()
    response = admin_client.get(f"/admin/institutions/outboxmessage/{message.pk}/change/")
    assert response.status_code == 200 and "HTTP 500" in response.content.decode()

    response = admin_client.post(
        "/admin/institutions/outboxmessage/", {"action": "retry_now", "_selected_action": [message.pk]}
    )
    assert response.status_code == 302
    message.refresh_from_db()
    assert message.next_attempt_at <= timezone.now()

    OutboxMessage.objects.filter(pk=message.pk).update(status="dead")
    admin_client.post("/admin/institutions/outboxmessage/", {"action": "replay", "_selected_action": [message.pk]})
    message.refresh_from_db()
    assert message.status == "pending" and message.attempts == 0
