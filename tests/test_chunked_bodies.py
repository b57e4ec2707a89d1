"""Chunked request bodies (``Transfer-Encoding: chunked``, no ``Content-Length``) are read in full
and verified like any other, or refused with ``411 length-required``; never read as empty.

Against real servers over a socket, because only they show what a server hands to WSGI: gunicorn
(gthread, as production runs it) decodes the chunks and the hub reads the body; Django's
development server does not, and the hub answers 411 and closes the connection.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pytest
from django.conf import settings

from clearinghouse.bodies import ChunkedBodies
from institutions.models import InboxEvent
from tests.conftest import Sender, activity, make_sender
from tests.servers import chunked, exchange, hub_server
from tests.wallets.conftest import PASSWORD

# --- The middleware, given what each server hands it ----------------------------------------------


def call(environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes, dict[str, Any] | None]:
    """Run ``ChunkedBodies`` around an app that records the environ and the body it reads."""
    seen: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(env, body=env["wsgi.input"].read(int(env.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [])
        return [b"ok"]

    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        answer.update(status=status, headers=dict(headers))

    body = b"".join(ChunkedBodies(app)(environ, start_response))
    return answer["status"], answer["headers"], body, seen or None


def test_a_body_the_server_decoded_is_handed_on_with_its_length():
    environ = {
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input_terminated": True,
        "wsgi.input": io.BytesIO(b"x" * 70_000),
    }
    status, _, _, seen = call(environ)
    assert status == "200 OK" and seen is not None
    assert seen["CONTENT_LENGTH"] == "70000" and seen["body"] == b"x" * 70_000
    assert "HTTP_TRANSFER_ENCODING" not in seen


def test_a_decoded_body_over_the_limit_is_413(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    environ = {
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input_terminated": True,
        "wsgi.input": io.BytesIO(b"x" * 1001),
    }
    status, headers, body, seen = call(environ)
    assert status.startswith("413") and seen is None
    assert headers["Content-Type"] == "application/problem+json"
    assert json.loads(body)["code"] == "payload-too-large"
    environ["wsgi.input"] = io.BytesIO(b"x" * 1000)
    assert call(environ)[0] == "200 OK"


def test_a_body_the_server_did_not_decode_is_411_without_a_length():
    environ = {"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": io.BytesIO(b"5\r\nhello\r\n0\r\n\r\n")}
    status, headers, body, seen = call(environ)
    assert status == "411 Length required" and seen is None
    assert "Content-Length" not in headers  # so the development server closes the connection
    assert json.loads(body)["code"] == "length-required"


def test_a_request_without_transfer_encoding_passes_untouched():
    stream = io.BytesIO(b"hello")
    status, _, _, seen = call({"CONTENT_LENGTH": "5", "wsgi.input": stream})
    assert status == "200 OK" and seen is not None
    assert seen["body"] == b"hello" and seen["wsgi.input"] is stream


# --- Real servers, real sockets ---------------------------------------------------------------------


def signed_chunked_request(sender: Sender, body: bytes, *, signed: bytes | None = None, size: int = 100) -> bytes:
    """A POST of ``body`` to the sender's intake in chunks of ``size``, signed over ``signed`` (``body``
    unless given), with ``Connection: close``."""
    lines = [
        f"POST {sender.url} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/cloudevents+json",
        "Transfer-Encoding: chunked",
        "Connection: close",
        *(f"{name}: {value}" for name, value in sender.headers(body if signed is None else signed).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunked(body, size)


@pytest.fixture
def sender() -> Sender:
    return make_sender(f"bank-{uuid.uuid4().hex[:6]}")


@pytest.mark.django_db(transaction=True)
def test_gunicorn_reads_a_signed_chunked_body_and_verifies_it(sender, tmp_path):
    good = activity("e-chunked")
    tampered = json.dumps(activity("e-tampered")).encode()
    with hub_server("gunicorn", tmp_path) as server:
        status, _, body = exchange(server.port, signed_chunked_request(sender, json.dumps(good).encode()))
        assert status == 202, (body, server.output())
        assert json.loads(body)["results"] == [{"id": "e-chunked", "status": "accepted"}]

        # Verified like any other body: a signature over other bytes does not match.
        request = signed_chunked_request(sender, tampered, signed=tampered.replace(b"e-tampered", b"e-other"))
        status, _, body = exchange(server.port, request)
        assert status == 401 and json.loads(body)["code"] == "invalid-signature"

        # Size limits hold: the intake's own, and the server's for any body.
        large = json.dumps(activity("e-large")).encode() + b" " * settings.HUB_INTAKE_MAX_BYTES
        status, _, body = exchange(server.port, signed_chunked_request(sender, large, size=65536))
        assert status == 413 and json.loads(body)["code"] == "payload-too-large"

        # Past the limit for any body (DATA_UPLOAD_MAX_MEMORY_SIZE), the chunks are not read to their end.
        huge = b'{"username": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}'
        request = (
            b"POST /api/v1/auth/signup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(huge, 65536)
        )
        status, _, body = exchange(server.port, request)
        assert status == 413 and json.loads(body)["code"] == "payload-too-large"

        # The persons' API (DRF) reads a chunked body too.
        signup = json.dumps({"username": "chunky", "password": PASSWORD}).encode()
        request = (
            b"POST /api/v1/auth/signup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(signup, 7)
        )
        status, _, body = exchange(server.port, request)
        assert status == 201, body
    assert list(InboxEvent.objects.values_list("event_id", flat=True)) == ["e-chunked"]


@pytest.mark.django_db(transaction=True)
def test_runserver_refuses_a_chunked_body_with_411_and_closes_the_connection(sender, tmp_path):
    body = json.dumps(activity("e-chunked")).encode()
    with hub_server("runserver", tmp_path) as server:
        # No "Connection: close": the server must close by itself, not read the chunks as a request.
        request = signed_chunked_request(sender, body).replace(b"Connection: close\r\n", b"")
        status, headers, answer = exchange(server.port, request, timeout=10)
        assert status == 411, answer
        assert headers["content-type"] == "application/problem+json"
        assert headers.get("connection") == "close"
        assert json.loads(answer)["code"] == "length-required"
        assert answer.count(b"HTTP/1.1") == 0  # one answer only: no 400 for the chunks read as a request

        # The same body with Content-Length is accepted by the same server.
        headers_ = sender.headers(body)
        lines = [f"POST {sender.url} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/cloudevents+json"]
        lines += [f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in headers_.items())]
        status, _, answer = exchange(server.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        assert status == 202, answer
    assert InboxEvent.objects.count() == 1
