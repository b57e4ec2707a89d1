"""Settings for the clearinghouse, read from the environment.

With no environment at all the hub runs on its embedded default: SQLite in ``var/``, Celery tasks
in process, generated development secrets. Production sets ``DATABASE_URL``, ``REDIS_URL`` and
``DJANGO_SECRET_KEY`` (CONTRACT.md section 7).
"""

from __future__ import annotations

import os
import re
from datetime import time
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from clearinghouse.devsecrets import announce_dev_secrets, dev_secret

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CLEARINGHOUSE_VAR_DIR", BASE_DIR / "var"))


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """``HTTP_X_FORWARDED_PROTO,https`` -> ``("HTTP_X_FORWARDED_PROTO", "https")``; unset -> None."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    header, _, expected = (part.strip() for part in value.partition(","))
    if not re.fullmatch(r"HTTP_[A-Z0-9_]+", header) or not expected:
        raise ImproperlyConfigured(
            f"{name} must read HTTP_<HEADER>,<value> (for example HTTP_X_FORWARDED_PROTO,https), not {value!r}."
        )
    return header, expected


# --- Core -------------------------------------------------------------------------------------------

DEBUG = env_flag("DJANGO_DEBUG", default=True)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off.")
    SECRET_KEY = dev_secret("DJANGO_SECRET_KEY", VAR_DIR)

# The host names this hub answers to. A development hub answers to any; a production one only to those it
# is told, so a forged Host header cannot steer the absolute URLs it builds (the HTTPS redirect among them).
_allowed_hosts = os.environ.get("DJANGO_ALLOWED_HOSTS") or ("*" if DEBUG else "")
ALLOWED_HOSTS = [host.strip() for host in _allowed_hosts.split(",") if host.strip()]
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured(
        "DJANGO_ALLOWED_HOSTS is required when DJANGO_DEBUG is off: the host names this hub answers to, "
        "comma separated (for example hub.example.org,127.0.0.1; 127.0.0.1 for health probes on loopback)."
    )

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # WhiteNoise serves static files under runserver too, as it does under gunicorn (before staticfiles,
    # whose runserver would otherwise serve them its own way).
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "csp",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "ledger",
    "institutions",
    "methodology",
    "wallets",
    "settlement",
    "portal",  # the persons' pages: the top floor, nothing imports it
    "demo",  # the top floor: demo_setup, demo_traffic (development only; nothing imports it)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the app itself (no other server, no CDN): the pages work on an intranet.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "csp.middleware.CSPMiddleware",
    "clearinghouse.policy.AdminPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # Django's, with the API and the admin kept in LANGUAGE_CODE (portal.middleware says why).
    "portal.middleware.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "clearinghouse.urls"
WSGI_APPLICATION = "clearinghouse.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

TIME_ZONE = "UTC"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Languages (the persons' pages) -------------------------------------------------------------------

# The persons' pages speak simplified Chinese and English, chosen from the browser's Accept-Language
# (any zh-* first: zh, zh-CN, zh-Hans, zh-SG; also zh-TW and zh-HK, whose readers read simplified
# characters more easily than English) or from the switcher's cookie. The API and the admin stay English.
USE_I18N = True
LANGUAGE_CODE = "en"
LANGUAGES = [("zh-hans", "简体中文"), ("en", "English")]
# The switcher's choice outlives the browser session, travels only over HTTPS in production and is out
# of scripts' reach, like the session cookie.
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600
LANGUAGE_COOKIE_SECURE = not DEBUG
LANGUAGE_COOKIE_HTTPONLY = True
LANGUAGE_COOKIE_SAMESITE = "Lax"
# Per-locale number formats: simplified Chinese groups by thousands with commas, as Chinese banks' apps
# show amounts (Django's own zh_Hans module groups by ten thousand without a separator).
FORMAT_MODULE_PATH = ["portal.formats"]

# --- Static files -----------------------------------------------------------------------------------------

STATIC_URL = "static/"
# `manage.py collectstatic` gathers them here (the image does at build time); WhiteNoise serves them.
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT", VAR_DIR / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    # Production serves the collected files under names carrying a hash of their content, compressed, and
    # cached by browsers for a year (clearinghouse.staticfiles); a development hub serves them where they
    # lie, as they change.
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "clearinghouse.staticfiles.HashedStaticFilesStorage"
    },
}
# WhiteNoise also serves files not collected (yet) from their apps' folders, under their plain names: a
# hub started without collectstatic still has its styles.
WHITENOISE_USE_FINDERS = True

# --- Persons' sign-in (session) and the pages' security headers ------------------------------------------

LOGIN_URL = "portal:signin"
LOGIN_REDIRECT_URL = "portal:home"
LOGOUT_REDIRECT_URL = "portal:home"
# Clickjacking: no page of the hub may be framed (also frame-ancestors below, for browsers that read it).
X_FRAME_OPTIONS = "DENY"
# django-csp 4: every page's scripts, styles, images and fonts come from the hub itself, never inline (no
# <script> body, no style= attribute: the templates hold none), and nothing may frame a page.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

# --- HTTPS, cookies and the proxy in front (production) ------------------------------------------------

# Production is served over HTTPS only, with TLS ended by the proxy in front (deploy/nginx.conf, or a load
# balancer before it). Django learns the client's scheme from the header that proxy sets, named here as
# "HTTP_<HEADER>,<value>", e.g. HTTP_X_FORWARDED_PROTO,https. Only name a header the proxy always
# overwrites: a client that could set it itself could pass plain HTTP off as HTTPS.
SECURE_PROXY_SSL_HEADER = env_proxy_ssl_header("DJANGO_SECURE_PROXY_SSL_HEADER")
SECURE_SSL_REDIRECT = env_flag("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
# Probes (compose's healthcheck, a cluster's liveness and readiness checks) speak plain HTTP to the
# process itself, inside the network: a redirect to HTTPS would read to them as a failure.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
# Browsers that saw the hub over HTTPS once refuse plain HTTP to it for this long. The header is only
# sent on HTTPS answers, so a development hub on http://127.0.0.1 never pins anything. Preload only says
# the domain consents to browsers' preload lists; getting onto them is a separate request by the operator.
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0 if DEBUG else 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_flag("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env_flag("DJANGO_SECURE_HSTS_PRELOAD", default=True)
# Cookies travel over HTTPS only in production (make run's plain-HTTP hub keeps them usable), are out of
# scripts' reach (no page of the hub reads either from JavaScript: forms carry the CSRF token), and stay
# home on cross-site subrequests.
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"

# --- Database ---------------------------------------------------------------------------------------

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))}
    # A process that stops between statements inside a transaction (hung, paused, or waiting on the
    # network while it should not) would keep its row and advisory locks, and every worker crediting
    # the same owners would queue behind it. PostgreSQL ends such a session after this long instead:
    # its transaction rolls back, the locks go, and the work is retried (the lease and the inbox make
    # that safe). No code path of the hub is idle inside a transaction for anything like a minute.
    idle_ms = env_int("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 60_000)
    if idle_ms > 0:
        db_options = DATABASES["default"].setdefault("OPTIONS", {})
        # Added to what DATABASE_URL's own ?options= says (a search_path, say), not in its place.
        db_options["options"] = (
            f"{db_options.get('options', '')} -c idle_in_transaction_session_timeout={idle_ms}".strip()
        )
    # Prepared statements for the few hot statements the hub sends itself (clearinghouse.db.execute_prepared:
    # the person's token, the redemption hold): PostgreSQL parses and plans them once per connection.
    # Django's own queries bind on the client and are never prepared, whatever this says. Django turns
    # psycopg's preparing off by default for PgBouncer in transaction mode before 1.21; behind such a
    # pooler set DB_PREPARED_STATEMENTS=0 (the statements then run unprepared, as before).
    if env_flag("DB_PREPARED_STATEMENTS", default=True):
        DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = 5
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "clearinghouse.sqlite3"),
            # Writers queue instead of failing at once: the embedded hub runs web and tasks together.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }

# --- Redis, Celery, caches --------------------------------------------------------------------------

REDIS_URL = os.environ.get("REDIS_URL", "")
# Prefix of the hub's own Redis keys (rate limits, wake-ups), so test runs and hubs sharing a
# Redis database do not count each other's requests.
HUB_REDIS_KEY_PREFIX = os.environ.get("HUB_REDIS_KEY_PREFIX", "hub:")

if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    # The test suite uses Redis for rate limits and caches but runs tasks in process unless a test
    # starts a real worker.
    CELERY_TASK_ALWAYS_EAGER = env_flag("CLEARINGHOUSE_TASKS_EAGER")
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    # Embedded default: no broker, every task runs in the process that enqueues it.
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_ALWAYS_EAGER = True
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
# Reliability model (DESIGN.md): at-least-once delivery, exactly-once effect from PostgreSQL.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_TIME_LIMIT = 300
# Redis re-delivers an unacknowledged message after the visibility timeout; it must outlast the
# hard time limit or a long task would run twice while still alive.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 3600,
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
}
# Publishing must not hang an intake request when the broker is down: the event is already
# committed and the sweeper will enqueue it later.
CELERY_TASK_PUBLISH_RETRY = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "intake"
CELERY_TASK_ROUTES = {
    "institutions.tasks.deliveries_*": {"queue": "delivery"},
    "institutions.tasks.*": {"queue": "intake"},
    "ledger.tasks.*": {"queue": "ledger"},
    "settlement.tasks.*": {"queue": "settlement"},
}
CELERY_BEAT_SCHEDULE = {
    "inbox-sweep": {"task": "institutions.tasks.inbox_sweep", "schedule": 30.0},
    # Outbound webhooks: retries are scheduled in the database (next_attempt_at), this sends what is due.
    "deliveries-send-due": {"task": "institutions.tasks.deliveries_send_due", "schedule": 5.0},
    # Seal what was posted into signed Merkle blocks; runs overlapping each other take turns.
    "ledger-blocks-seal": {"task": "ledger.tasks.blocks_seal_recent", "schedule": 5.0},
    # "ledger-lots-expire" (daily, just after local midnight) is added below HUB_STANDARD_TIMEZONE.
    # Holds a provider did not answer within HUB_REDEMPTION_HOLD_HOURS go back to their lots.
    "settlement-redemptions-expire": {"task": "settlement.tasks.redemptions_expire_due", "schedule": 60.0},
}

# --- REST framework and OpenAPI ---------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "wallets.authentication.PersonTokenAuthentication",  # DRF's, with the person in the same query
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # UTF-8 only, each key once, no NaN (clearinghouse.strict_json): the intake's rules for every body.
    "DEFAULT_PARSER_CLASSES": ["clearinghouse.strict_json.StrictJSONParser"],
    "EXCEPTION_HANDLER": "clearinghouse.errors.problem_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Carbon points clearinghouse",
    "DESCRIPTION": "Wire contract v1: signed CloudEvents in, pooled wallets, redemptions and settlement.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    # Every error documented as the problem+json it is (clearinghouse.openapi).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "clearinghouse.openapi.problem_responses",
    ],
}

# --- Hub secrets ------------------------------------------------------------------------------------

# Fernet keys, comma separated, newest first: the first encrypts, all decrypt (rotation).
HUB_ENCRYPTION_KEYS = [
    k.strip()
    for k in (os.environ.get("HUB_ENCRYPTION_KEYS") or dev_secret("HUB_ENCRYPTION_KEYS", VAR_DIR)).split(",")
    if k.strip()
]
# Key of the keyed hash that stands in for institution subject ids (DESIGN.md, privacy).
HUB_SUBJECT_KEY = os.environ.get("HUB_SUBJECT_KEY") or dev_secret("HUB_SUBJECT_KEY", VAR_DIR)

# --- Intake -----------------------------------------------------------------------------------------

HUB_INTAKE_MAX_BYTES = env_int("HUB_INTAKE_MAX_BYTES", 1024 * 1024)
HUB_INTAKE_MAX_EVENTS = 1000
HUB_SIGNATURE_TOLERANCE_SECONDS = 300
# Requests per institution per second; an institution may carry its own limit.
HUB_INTAKE_RATE_LIMIT_PER_SECOND = env_int("HUB_INTAKE_RATE_LIMIT_PER_SECOND", 500)
# How long a worker process trusts its cached copy of an institution's credentials.
HUB_CREDENTIAL_CACHE_SECONDS = env_int("HUB_CREDENTIAL_CACHE_SECONDS", 2)
HUB_INBOX_BATCH_SIZE = env_int("HUB_INBOX_BATCH_SIZE", 500)
HUB_INBOX_MAX_ATTEMPTS = env_int("HUB_INBOX_MAX_ATTEMPTS", 5)
HUB_INBOX_LEASE_SECONDS = env_int("HUB_INBOX_LEASE_SECONDS", 300)
HUB_INBOX_SWEEP_AFTER_SECONDS = env_int("HUB_INBOX_SWEEP_AFTER_SECONDS", 60)
# Concurrent intake requests of one web process share one INSERT and commit (institutions.intake).
HUB_INTAKE_GROUP_COMMIT = env_flag("HUB_INTAKE_GROUP_COMMIT", default=True)
# Intake requests of one web process wake the workers at most once per this many seconds (plus one
# trailing wake-up), instead of one Redis round trip per request; 0 kicks after every commit.
HUB_INBOX_KICK_COALESCE_SECONDS = float(os.environ.get("HUB_INBOX_KICK_COALESCE_SECONDS") or 0.1)
# The same for the wake-ups of the delivery worker after a commit that enqueued webhooks (or made them
# due again): at most once per this many seconds per process, plus one trailing; 0 after every commit.
HUB_DELIVERY_KICK_COALESCE_SECONDS = float(os.environ.get("HUB_DELIVERY_KICK_COALESCE_SECONDS") or 0.1)
# Django refuses bodies above this before our own check can answer 413 as problem+json.
DATA_UPLOAD_MAX_MEMORY_SIZE = HUB_INTAKE_MAX_BYTES + 64 * 1024

HUB_ALLOW_PRIVATE_ENDPOINTS = env_flag("HUB_ALLOW_PRIVATE_ENDPOINTS")
# Outbound delivery (institutions.outbox): messages claimed per batch and concurrent requests per worker.
HUB_DELIVERY_BATCH_SIZE = env_int("HUB_DELIVERY_BATCH_SIZE", 500)
HUB_DELIVERY_CONCURRENCY = env_int("HUB_DELIVERY_CONCURRENCY", 32)

# --- Persons and links ------------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# A link code lives this long, and a person holds at most this many live (unused, unexpired) codes.
HUB_LINK_CODE_TTL_SECONDS = env_int("HUB_LINK_CODE_TTL_SECONDS", 600)
HUB_LINK_CODES_LIVE_MAX = env_int("HUB_LINK_CODES_LIVE_MAX", 5)
# Failed link attempts (wrong, expired or reused codes) an institution may make in a sliding hour;
# beyond it, attempts are refused unchecked. Codes carry 40 bits: at 20 guesses an hour, even a million
# live codes at once take years of guessing to hit one.
HUB_LINK_MAX_FAILURES_PER_HOUR = env_int("HUB_LINK_MAX_FAILURES_PER_HOUR", 20)
# Throttles (clearinghouse.throttle), per sliding window; a limit of 0 turns one off. Sign-in counts failures:
# per account (username, any case) and per client address; a success forgets the account's failures.
HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT = env_int("HUB_SIGNIN_MAX_FAILURES_PER_ACCOUNT", 10)
HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS = env_int("HUB_SIGNIN_MAX_FAILURES_PER_ADDRESS", 50)
HUB_SIGNIN_WINDOW_SECONDS = env_int("HUB_SIGNIN_WINDOW_SECONDS", 15 * 60)
# Sign-up counts every attempt, per username asked for and per client address.
HUB_SIGNUP_MAX_PER_ACCOUNT = env_int("HUB_SIGNUP_MAX_PER_ACCOUNT", 10)
HUB_SIGNUP_MAX_PER_ADDRESS = env_int("HUB_SIGNUP_MAX_PER_ADDRESS", 20)
HUB_SIGNUP_WINDOW_SECONDS = env_int("HUB_SIGNUP_WINDOW_SECONDS", 60 * 60)
# Link codes a person may ask for (every attempt counts), besides HUB_LINK_CODES_LIVE_MAX live at once.
HUB_LINK_CODE_MAX_PER_PERSON = env_int("HUB_LINK_CODE_MAX_PER_PERSON", 20)
HUB_LINK_CODE_WINDOW_SECONDS = env_int("HUB_LINK_CODE_WINDOW_SECONDS", 60 * 60)
# Proxies of the hub's own in front of it: 0 takes the client's address from the connection (REMOTE_ADDR);
# n takes the n-th address from the right of X-Forwarded-For, which those proxies append to. Never set it
# higher than the proxies that really are there: clients write whatever they like into that header.
HUB_TRUSTED_PROXIES = env_int("HUB_TRUSTED_PROXIES", 0)
# The wallet's "expiring soon": lots that lapse within this many days from today.
HUB_EXPIRING_SOON_DAYS = env_int("HUB_EXPIRING_SOON_DAYS", 30)

# --- Logging ----------------------------------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.server": {"level": "WARNING"}},
}

announce_dev_secrets()

# --- The unified standard ---------------------------------------------------------------------------

# Caps count per local day, month and year, and factor versions take effect on local dates.
HUB_STANDARD_TIMEZONE = os.environ.get("HUB_STANDARD_TIMEZONE", "Asia/Shanghai")
# Points lapse at the end of the month this many months after the act; an institution may set its own.
HUB_POINTS_VALIDITY_MONTHS = env_int("HUB_POINTS_VALIDITY_MONTHS", 24)

# Beat's crontab schedules count in the standard's time zone (daylight saving included); the broker and
# the tasks' ETAs stay in UTC.
CELERY_TIMEZONE = HUB_STANDARD_TIMEZONE

# Lapsed lots move to expired(issuer) once a day, five minutes after local midnight. The sweep is
# idempotent: a missed or repeated run does no harm.
CELERY_BEAT_SCHEDULE["ledger-lots-expire"] = {
    "task": "ledger.tasks.lots_expire_daily",
    "schedule": crontab(hour=0, minute=5),
}

# --- Settlement -------------------------------------------------------------------------------------

HUB_SETTLEMENT_MIN_MINOR = env_int("HUB_SETTLEMENT_MIN_MINOR", 100)  # nets under 1 yuan roll to the next cycle
# An instruction's value date: this many business days (Monday to Friday; no holiday calendar) after the
# cut-off's local date in HUB_STANDARD_TIMEZONE. 1 = the next business day.
HUB_SETTLEMENT_VALUE_DAYS = env_int("HUB_SETTLEMENT_VALUE_DAYS", 1)
# The daily cycle is cut, netted and instructed at this local time (HH:MM in HUB_STANDARD_TIMEZONE), after
# the lots expire; the run is idempotent (a second run finds nothing new to cut).
HUB_SETTLEMENT_CUT_OFF_TIME = os.environ.get("HUB_SETTLEMENT_CUT_OFF_TIME", "00:15")
_cut_off = time.fromisoformat(HUB_SETTLEMENT_CUT_OFF_TIME)
CELERY_BEAT_SCHEDULE["settlement-run-daily"] = {
    "task": "settlement.tasks.settlement_run_daily",
    "schedule": crontab(hour=_cut_off.hour, minute=_cut_off.minute),
}
# Instructions whose webhook died undelivered fail their cycle, so the operator sees it and resends.
CELERY_BEAT_SCHEDULE["settlement-cycles-watch"] = {
    "task": "settlement.tasks.cycles_watch",
    "schedule": 600.0,
}

# --- Redemptions ------------------------------------------------------------------------------------

# A held redemption the provider neither fulfils nor rejects within this many hours is voided: its points
# go back to the lots they came from (the beat task above).
HUB_REDEMPTION_HOLD_HOURS = env_int("HUB_REDEMPTION_HOLD_HOURS", 48)
# Units of one reward per request: a bound on what one request may hold, not a business rule.
HUB_REDEMPTION_MAX_QUANTITY = env_int("HUB_REDEMPTION_MAX_QUANTITY", 100)
# On PostgreSQL a hold runs as one database function (settlement/sql/settlement_redemption_hold): one round trip
# instead of many. Off: the portable path SQLite runs, kept equal to it by the tests.
HUB_REDEMPTION_HOLD_IN_DATABASE = env_flag("HUB_REDEMPTION_HOLD_IN_DATABASE", default=True)
