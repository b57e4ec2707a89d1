"""A minimal HTTP client of the hub, and the demo institutions as signed senders."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from institutions import crypto

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUEST_TIMEOUT_SECONDS = 30
MAX_RATE_LIMIT_RETRIES = 5
FOLLOW_POLL_SECONDS = 0.2


@dataclass
class Sender:
    """A demo institution as seen from its own side: its code, API token and signing secrets."""

    code: str
    api_token: str
    provider: bool
    hmac_secret: bytes | None = None
    private_key: Ed25519PrivateKey | None = None

    def signature_choices(self) -> list[tuple[str, ...]]:
        if self.hmac_secret and self.private_key:
            return [("v1",), ("v1a",), ("v1", "v1a")]
        return [("v1",)] if self.hmac_secret else [("v1a",)]

    def event(
        self, event_id: str, event_type: str, subject: str, data: dict[str, Any], moment: datetime
    ) -> dict[str, Any]:
        """A CloudEvent from this institution, in the shape CONTRACT section 2 fixes."""
        return {
            "specversion": "1.0",
            "id": event_id,
            "source": f"/{self.code}/app",
            "type": event_type,
            "subject": subject,
            "time": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "datacontenttype": "application/json",
            "data": data,
        }


@dataclass(frozen=True)
class Answer:
    """The hub's answer: HTTP status, the JSON document (None when the body is not JSON) and the raw text."""

    status: int
    document: Any
    text: str

    @property
    def detail(self) -> str:
        """The problem's detail, or the start of the body when it is no problem document."""
        if isinstance(self.document, dict) and self.document.get("detail"):
            return str(self.document["detail"])
        return self.text[:200]


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class Hub:
    """A minimal HTTP client: one connection per request, no redirects (a sender must not follow them)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be an http(s) URL such as http://127.0.0.1:8000; got {url!r}.")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")

    def request(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)``; raises :class:`OSError` when the hub cannot be reached."""
        connection_class = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(self.host, self.port, timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            connection.request(method, self.prefix + path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        except http.client.HTTPException as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        payload: Any = None,
        authorization: str = "",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """A JSON API call (a person's or an institution's back office); raises :class:`OSError`."""
        headers = {"Accept": "application/json", **(headers or {})}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        if authorization:
            headers["Authorization"] = authorization
        status, _, raw = self.request(method, path, body=body, headers=headers)
        return Answer(status, json_or_none(raw), raw.decode(errors="replace"))

    def events_post(
        self, sender: Sender, body: bytes, *, msg_id: str, versions: tuple[str, ...], batch: bool
    ) -> Answer:
        """POST signed events as ``sender``, signing each attempt afresh; waits out ``429`` a few times.

        Raises :class:`OSError` when the hub cannot be reached.
        """
        for _ in range(MAX_RATE_LIMIT_RETRIES + 1):
            headers = crypto.webhook_headers(
                body,
                msg_id=msg_id,
                timestamp=int(time.time()),
                hmac_secrets=[sender.hmac_secret] if "v1" in versions and sender.hmac_secret else [],
                ed25519_keys=[sender.private_key] if "v1a" in versions and sender.private_key else [],
            )
            headers["Content-Type"] = BATCH if batch else SINGLE
            status, response_headers, raw = self.request(
                "POST", f"/api/v1/institutions/{quote(sender.code)}/events", body=body, headers=headers
            )
            if status != 429:
                break
            time.sleep(min(float(response_headers.get("retry-after", "1") or 1), 5.0))
        return Answer(status, json_or_none(raw), raw.decode(errors="replace"))

    def event_get(self, sender: Sender, event_id: str) -> Answer:
        """``GET /api/v1/institutions/{code}/events/{id}`` with the institution's bearer token."""
        path = f"/api/v1/institutions/{quote(sender.code)}/events/{quote(event_id, safe='')}"
        return self.call("GET", path, authorization=f"Bearer {sender.api_token}")

    def event_follow(self, sender: Sender, event_id: str, *, timeout: float) -> Answer:
        """:meth:`event_get` until the hub has handled the event (no longer ``received``) or ``timeout``
        seconds have passed; the last answer either way."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.event_get(sender, event_id)
            document = answer.document if isinstance(answer.document, dict) else {}
            handled = answer.status != 200 or document.get("status") != "received"
            if handled or time.monotonic() >= deadline:
                return answer
            time.sleep(FOLLOW_POLL_SECONDS)
