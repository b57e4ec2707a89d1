"""Strict JSON for request bodies: UTF-8 text, each object key once, no ``NaN`` or ``Infinity``.

Python's ``json.loads`` is lenient where a signed, money-like API must not be: given bytes it guesses
UTF-16 or UTF-32 and skips a byte order mark, and it keeps the last of two equal keys, so one body
could mean one thing to the hub and another to the sender's own parser or an auditor's. Every
request body the hub reads as JSON goes through :func:`loads` here (the intake's fast parser, the
persons' API through :class:`StrictJSONParser`, the direct redemption path), so the rules and the
answers are the same everywhere: a body that breaks them is ``400 malformed-json`` with a detail that
says why; a ``charset`` other than UTF-8 declared in ``Content-Type`` is ``415 unsupported-media-type``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from rest_framework.parsers import JSONParser

from clearinghouse.errors import MalformedJson, UnsupportedMediaType

UTF8_NAMES = frozenset({"utf-8", "utf8"})


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object, or :class:`DuplicateKey` naming the first key seen twice.

    The common case costs one ``dict()`` and a length comparison; the key is looked for only when the
    lengths differ.
    """
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return document


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _decoder(parse_float: Callable[[str], Any] | None) -> json.JSONDecoder:
    return json.JSONDecoder(object_pairs_hook=_object, parse_float=parse_float, parse_constant=_not_json)


# Built once: json.loads with keyword arguments builds a decoder on every call.
_DECODERS: dict[Callable[[str], Any] | None, json.JSONDecoder] = {None: _decoder(None), Decimal: _decoder(Decimal)}


def loads(body: bytes, *, parse_float: Callable[[str], Any] | None = None, allow_lone_surrogates: bool = False) -> Any:
    """The JSON document ``body`` holds, or :class:`MalformedJson` saying what is wrong with it.

    ``parse_float`` is None (floats) or ``Decimal``. Refused: bytes that are not UTF-8 (UTF-16 and
    UTF-32 included, with or without a byte order mark), a UTF-8 byte order mark, an object key that
    appears twice in one object (at any depth; the detail names it), ``NaN``, ``Infinity`` and
    anything else that is not JSON; and, unless ``allow_lone_surrogates`` (the intake, whose envelope
    checks name the field instead), a string escaping a lone surrogate (``"\\ud800"``): valid JSON
    syntax, but no Unicode character, so nothing can store or print it as UTF-8.
    """
    decoder = _DECODERS.get(parse_float) or _decoder(parse_float)
    if b"\x00" in body:
        # A NUL byte is never in JSON text (it is escaped inside strings); it is how UTF-16 and
        # UTF-32 encode ASCII. Said plainly rather than as a parser's complaint about a character.
        raise MalformedJson("The body holds NUL bytes: send JSON as UTF-8 (UTF-16 and UTF-32 are refused).")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"The body is not UTF-8: invalid byte at offset {exc.start}.") from exc
    if text.startswith("\ufeff"):
        raise MalformedJson("The body starts with a byte order mark; send UTF-8 without one.")
    try:
        document = decoder.decode(text)
    except DuplicateKey as exc:
        # json.dumps escapes what the key may hold (a lone surrogate, control characters).
        raise MalformedJson(
            f"The key {json.dumps(exc.key)} appears twice in one object; each key may appear once."
        ) from exc
    except RecursionError as exc:  # "[[[[..." nested past the parser's depth
        raise MalformedJson("The body nests too deeply.") from exc
    except ValueError as exc:  # JSONDecodeError, and NaN or Infinity
        raise MalformedJson(f"The body is not JSON: {exc}.") from exc
    if not allow_lone_surrogates and "\\u" in text and _holds_lone_surrogate(document):
        raise MalformedJson("A string escapes a lone surrogate (\\ud800-\\udfff alone is no character).")
    return document


_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds a surrogate: paired escapes
    (``"\\ud83d\\ude00"``) are decoded to one character, so any surrogate left is a lone one."""
    if isinstance(value, str):
        return not value.isascii() and _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(k) or _holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_lone_surrogate(item) for item in value)
    return False


def check_charset(content_type: str) -> None:
    """:class:`UnsupportedMediaType` when ``content_type`` declares a charset other than UTF-8."""
    if ";" not in content_type:
        return
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in UTF8_NAMES:
            raise UnsupportedMediaType(f"JSON is read as UTF-8 only; got charset={value.strip()}.")


class StrictJSONParser(JSONParser):
    """DRF's JSON parser with the hub's rules (:func:`loads`, :func:`check_charset`)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        check_charset(media_type or "")
        # DRF hands a JSON parser request.body (read through Django's DATA_UPLOAD_MAX_MEMORY_SIZE check).
        return loads(stream.read())
