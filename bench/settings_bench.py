"""Settings for benchmark runs only: the production settings plus a bare baseline view.

``bench/intake.py`` starts gunicorn with ``DJANGO_SETTINGS_MODULE=bench.settings_bench`` so the
baseline view is served by the same project, middleware and server configuration as the intake,
while ``clearinghouse.urls`` (what production serves) never contains it.
"""

from clearinghouse.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"
