"""Command-line options shared by the settlement commands."""

from __future__ import annotations

from datetime import datetime

from django.core.management.base import CommandError
from django.utils.dateparse import parse_datetime


def instant_option(value: str | None, option: str) -> datetime | None:
    """``option``'s ``value`` as an aware datetime (ISO 8601 with an offset); None when not given.

    Raises :class:`CommandError` naming ``option`` for anything else, a time without an offset included.
    """
    if value is None:
        return None
    moment = parse_datetime(value)
    if moment is None or moment.tzinfo is None:
        raise CommandError(f"{option} must be an ISO 8601 instant with an offset, e.g. 2030-03-01T16:00:00+08:00.")
    return moment
