"""Request bodies sent with ``Transfer-Encoding: chunked``: read in full, or refused with 411.

Django reads a request body only as far as ``CONTENT_LENGTH`` says, and a chunked request has none,
so every view saw an empty body: the intake answered a correctly signed chunked request
``invalid-signature`` (the signature did not match zero bytes). What the servers hand to WSGI,
measured (tests/test_chunked_bodies.py does it again on every run):

* gunicorn decodes the chunks itself and says so with ``wsgi.input_terminated``: ``wsgi.input``
  yields the decoded body and ends at its end, ``CONTENT_LENGTH`` is absent;
* Django's development server (``runserver``, wsgiref) does not decode them: ``wsgi.input`` is the
  raw socket limited to zero bytes, and the chunk framing is left on the connection, where the server
  then reads it as the next request.

So :class:`ChunkedBodies`, the outermost layer of the WSGI application, reads a body the server
decoded (up to ``DATA_UPLOAD_MAX_MEMORY_SIZE``, else ``413 payload-too-large``) and hands it on with
its length, as if it had come with ``Content-Length``: from there on it is read and verified like any
other. Where the server did not decode it, the answer is ``411 length-required`` (problem+json), sent
without a length so that the development server closes the connection instead of reading the
chunks as a request.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.conf import settings

from clearinghouse.errors import PROBLEM_CONTENT_TYPE, HubError, LengthRequired, PayloadTooLarge

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_READ_SIZE = 64 * 1024


class ChunkedBodies:
    """WSGI middleware: a chunked request body becomes a body with a length, or the request a 411."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if "HTTP_TRANSFER_ENCODING" not in environ:  # every request but the rare chunked one: one lookup
            return self.app(environ, start_response)
        if not environ.get("wsgi.input_terminated"):
            return _problem(
                LengthRequired("This server cannot read a chunked request body: send the body with Content-Length."),
                start_response,
            )
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = _read_at_most(environ["wsgi.input"], limit + 1 if limit is not None else None)
        if limit is not None and len(body) > limit:
            return _problem(PayloadTooLarge(f"At most {limit} bytes per request body."), start_response)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = io.BytesIO(body)
        del environ["HTTP_TRANSFER_ENCODING"]  # the body is now framed by its length, for everything after
        return self.app(environ, start_response)


def _read_at_most(stream: Any, size: int | None) -> bytes:
    """Up to ``size`` bytes (all, if None) of a stream that ends at the body's end."""
    parts: list[bytes] = []
    total = 0
    while size is None or total < size:
        part = stream.read(_READ_SIZE if size is None else min(_READ_SIZE, size - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def _problem(error: HubError, start_response: StartResponse) -> Iterator[bytes]:
    start_response(f"{error.status} {error.title}", [("Content-Type", PROBLEM_CONTENT_TYPE)])
    # An iterator, not a list: the server cannot learn the length, so the development server closes
    # the connection after the answer (it would otherwise read the unread chunks as a request).
    return iter([json.dumps(error.problem()).encode()])
