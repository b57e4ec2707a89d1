"""The demo receiver: one small HTTP server playing every demo institution's webhook endpoint.

``demo_setup`` registers ``<receiver>/hooks/<code>`` as each demo institution's endpoint;
``demo_traffic`` runs this server in a thread while it tells the stories. Like an institution's own
receiver it trusts nothing it has not checked: each webhook must carry a ``v1a`` signature by a hub key
published at ``GET /api/v1/hub/keys`` (and a ``v1`` with the institution's HMAC secret when it has one),
with a timestamp within five minutes, and is handled once per ``webhook-id`` (the hub delivers at least
once). It acknowledges at once and answers on its own thread, through the real intake, as the
institution would from its back office:

* ``carbon.redemption.requested`` at a provider: the reward is handed out, ``carbon.redemption.fulfilled``
  with a voucher;
* ``carbon.settlement.instruction``: the money moves, ``carbon.settlement.confirmed`` with a bank
  reference, ``paid`` for a ``pay`` instruction and ``received`` for a ``receive`` one.

Each answer's event id derives from what it answers (``fulfil-<redemption id>``, ``confirm-<instruction
id>``), so an answer sent twice is a duplicate at the hub, never a second effect.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from demo.client import Answer, Hub, Sender
from institutions import crypto

HOOKS_PATH = "/hooks/"
TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 1024 * 1024
REDEMPTION_REQUESTED = "carbon.redemption.requested"
REDEMPTION_FULFILLED = "carbon.redemption.fulfilled"
SETTLEMENT_INSTRUCTION = "carbon.settlement.instruction"
SETTLEMENT_CONFIRMED = "carbon.settlement.confirmed"


def endpoint_url(receiver_url: str, code: str) -> str:
    """The endpoint the demo registers for ``code`` on the receiver at ``receiver_url``."""
    return receiver_url.rstrip("/") + HOOKS_PATH + code


@dataclass(frozen=True)
class Webhook:
    """A webhook the receiver accepted (signature verified, first time its ``webhook-id`` was seen)."""

    institution: str
    webhook_id: str
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """The event an institution sent in answer to a webhook, and the intake's answer to it."""

    institution: str
    event_id: str
    type: str
    data: dict[str, Any]
    answer: Answer | None
    error: str = ""

    @property
    def accepted(self) -> bool:
        results = self.answer.document.get("results") if self.answer and isinstance(self.answer.document, dict) else []
        return bool(self.answer and self.answer.status == 202 and results and results[0].get("status") == "accepted")


class DemoReceiver:
    """The endpoints of ``senders`` at ``url`` (``http://host:port``); start, use, then stop.

    ``hub_keys`` are the raw Ed25519 public keys the hub publishes. Everything the server saw is kept
    for the stories: :attr:`webhooks`, :attr:`duplicates` (deliveries of a ``webhook-id`` seen before),
    :attr:`refused` (why a delivery was answered 4xx) and the :class:`Reply` per answered object.
    """

    def __init__(self, hub: Hub, senders: Sequence[Sender], *, url: str, hub_keys: Sequence[bytes]):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"the demo receiver needs an http://host:port URL, not {url!r}")
        self.url = url.rstrip("/")
        self.hub = hub
        self.senders = {sender.code: sender for sender in senders}
        self.hub_keys = list(hub_keys)
        self.webhooks: list[Webhook] = []
        self.duplicates: list[str] = []
        self.refused: list[str] = []
        self._seen: set[str] = set()
        self._replies: dict[str, Reply] = {}
        self._changed = threading.Condition()
        self._work: queue.Queue[Webhook | None] = queue.Queue()
        self._server = ThreadingHTTPServer((parts.hostname, parts.port), self._handler_class())
        self._server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="demo-receiver", daemon=True),
            threading.Thread(target=self._answer_loop, name="demo-receiver-answers", daemon=True),
        ]

    def start(self) -> DemoReceiver:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._work.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> DemoReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- What the stories wait for ------------------------------------------------------------------

    def reply_to(self, key: str, *, timeout: float) -> Reply | None:
        """The reply to ``redemption:<id>`` or ``instruction:<id>`` once sent, or None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while key not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._replies[key]

    # --- Receiving ------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, MAX_BODY_BYTES))
                status = receiver._receive(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # the demo prints what matters itself
                return

        return Handler

    def _receive(self, path: str, headers: dict[str, str], body: bytes) -> int:
        """Check one delivery and queue its answer; the HTTP status to answer the hub with."""
        code = path.removeprefix(HOOKS_PATH) if path.startswith(HOOKS_PATH) else ""
        sender = self.senders.get(code)
        lowered = {k.lower(): v for k, v in headers.items()}
        msg_id = lowered.get("webhook-id", "")
        if sender is None:
            return self._refuse(404, f"POST {path}: no demo institution there")
        problem = self._verify(sender, msg_id, lowered.get("webhook-timestamp", ""), body, lowered)
        if problem:
            return self._refuse(401, f"{code} {msg_id or '(no webhook-id)'}: {problem}")
        try:
            event = json.loads(body)
            webhook = Webhook(code, msg_id, str(event["type"]), dict(event["data"]))
        except (ValueError, KeyError, TypeError) as exc:
            return self._refuse(400, f"{code} {msg_id}: not a CloudEvent ({exc})")
        with self._changed:
            if msg_id in self._seen:
                self.duplicates.append(msg_id)
                return 200
            self._seen.add(msg_id)
            self.webhooks.append(webhook)
            self._changed.notify_all()
        self._work.put(webhook)
        return 200

    def _verify(self, sender: Sender, msg_id: str, timestamp: str, body: bytes, headers: dict[str, str]) -> str:
        """Why the delivery is not the hub's, or ``""`` when it is."""
        signature = headers.get("webhook-signature", "")
        if not msg_id or not timestamp.isdigit() or not signature:
            return "missing webhook-id, webhook-timestamp or webhook-signature"
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            return f"timestamp {timestamp} is more than {TOLERANCE_SECONDS} s away"
        if not crypto.verify(msg_id, timestamp, body, signature, hmac_secrets=(), ed25519_public_keys=self.hub_keys):
            return "no v1a signature by a key of GET /api/v1/hub/keys"
        if sender.hmac_secret and not crypto.verify(
            msg_id, timestamp, body, signature, hmac_secrets=[sender.hmac_secret], ed25519_public_keys=()
        ):
            return "no v1 signature with the institution's HMAC secret"
        return ""

    def _refuse(self, status: int, why: str) -> int:
        with self._changed:
            self.refused.append(why)
            self._changed.notify_all()
        return status

    # --- Answering ------------------------------------------------------------------------------------

    def _answer_loop(self) -> None:
        while (webhook := self._work.get()) is not None:
            sender = self.senders[webhook.institution]
            if webhook.type == REDEMPTION_REQUESTED and sender.provider:
                redemption_id = str(webhook.data.get("redemption_id"))
                voucher = "DEMO-" + hashlib.sha256(redemption_id.encode()).hexdigest()[:10].upper()
                key, event_id = f"redemption:{redemption_id}", f"fulfil-{redemption_id}"
                data: dict[str, Any] = {"redemption_id": redemption_id, "voucher": voucher}
                answer_type = REDEMPTION_FULFILLED
            elif webhook.type == SETTLEMENT_INSTRUCTION:
                instruction_id = str(webhook.data.get("instruction_id"))
                paid = webhook.data.get("direction") == "pay"
                reference = "DEMO-BANK-" + hashlib.sha256(instruction_id.encode()).hexdigest()[:12].upper()
                key, event_id = f"instruction:{instruction_id}", f"confirm-{instruction_id}"
                status = "paid" if paid else "received"
                data = {"instruction_id": instruction_id, "status": status, "reference": reference}
                answer_type = SETTLEMENT_CONFIRMED
            else:
                continue
            reply = self._send(sender, event_id, answer_type, data)
            with self._changed:
                self._replies[key] = reply
                self._changed.notify_all()

    def _send(self, sender: Sender, event_id: str, event_type: str, data: dict[str, Any]) -> Reply:
        event = {
            "specversion": "1.0",
            "id": event_id,
            "source": f"/{sender.code}/back-office",
            "type": event_type,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "datacontenttype": "application/json",
            "data": data,
        }
        try:
            answer = self.hub.events_post(
                sender,
                json.dumps(event).encode(),
                msg_id=f"msg_{event_id}",
                versions=sender.signature_choices()[-1],
                batch=False,
            )
        except OSError as exc:
            return Reply(sender.code, event_id, event_type, data, None, f"the hub cannot be reached: {exc}")
        return Reply(sender.code, event_id, event_type, data, answer)
