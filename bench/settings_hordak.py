"""Settings of the outside peer in ``bench/books.py``: django-hordak alone, on its own scratch database.

Not part of the project: django-hordak is installed into the virtualenv for the benchmark only
(``.venv/bin/pip install 'django-hordak==2.0.0'``) and never listed in ``pyproject.toml``. The database
is ``bench_hordak`` on the same PostgreSQL server as the project's benchmarks (``BENCH_HORDAK_URL``).
"""

import os

import dj_database_url

SECRET_KEY = "bench-only-hordak-peer-not-a-secret"  # noqa: S105
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "mptt",
    "djmoney",
    "hordak",
]
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("BENCH_HORDAK_URL", "postgres://postgres@127.0.0.1:5432/bench_hordak"),
        conn_max_age=60,
    )
}
CURRENCIES = ["EUR"]
DEFAULT_CURRENCY = "EUR"
HORDAK_DECIMAL_PLACES = 3
