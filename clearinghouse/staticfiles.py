"""Static files in production: hashed names when ``collectstatic`` ran, plain names when it did not."""

from __future__ import annotations

import logging

from whitenoise.storage import CompressedManifestStaticFilesStorage

logger = logging.getLogger(__name__)


class HashedStaticFilesStorage(CompressedManifestStaticFilesStorage):
    """WhiteNoise's storage: ``collectstatic`` writes each file under a name carrying a hash of its
    content, compressed, which browsers may cache for a year; ``{% static %}`` names those.

    A file missing from the manifest (``collectstatic`` was not run since it was added) is named as it
    is, with a warning, instead of failing every page that links it: WhiteNoise then serves it from its
    app's folder (``WHITENOISE_USE_FINDERS``), cached for a minute only.
    """

    manifest_strict = False

    def stored_name(self, name: str) -> str:
        try:
            return super().stored_name(name)
        except ValueError:
            logger.warning("static: %s is not collected; serving it unhashed (run manage.py collectstatic)", name)
            return name
