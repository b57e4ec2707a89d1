"""The ledger's units, and the day its lots are dated in: the one home of both for every app above.

1 carbon point = 1 g CO2e under the standard; the ledger keeps integer milligrams, so small factors
lose nothing. Persons see whole points (rounded down) and grams with three places.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone

MG_PER_GRAM = 1000
MG_PER_POINT = MG_PER_GRAM  # a point is a gram


def grams_text(milligrams: int) -> str:
    """Milligrams as grams with three places, exactly: 144000 -> ``"144.000"``."""
    return format(Decimal(milligrams).scaleb(-3), "f")


def standard_today() -> date:
    """Today in the scheme's time zone (``HUB_STANDARD_TIMEZONE``): lots lapse at the end of a local day."""
    return timezone.localdate(timezone=ZoneInfo(settings.HUB_STANDARD_TIMEZONE))
