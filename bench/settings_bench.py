"""Settings for benchmark runs only: the production settings plus a bare baseline view.

``bench/intake.py`` starts gunicorn with ``DJANGO_SETTINGS_MODULE=bench.settings_bench`` so the
baseline view is served by the same project, middleware and server configuration as the intake,
while ``clearinghouse.urls`` (what production serves) never contains it.
"""

import os

from clearinghouse.settings import *  # noqa: F403

ROOT_URLCONF = "bench.urls"

# bench/redeem.py --server-side-binding: what PostgreSQL saves when it plans each statement once per
# connection instead of on every execution (Django binds client-side by default). A measurement, not a
# recommendation made here: server-side binding changes how some queries are sent (see Django's docs).
if os.environ.get("BENCH_SERVER_SIDE_BINDING") == "1":
    DATABASES["default"].setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=1)  # noqa: F405
