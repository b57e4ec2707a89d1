"""Settings: the Celery reliability model (DESIGN.md) and the environment of CONTRACT.md section 7."""

import os
import runpy
import secrets
import subprocess
import sys
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from clearinghouse.celery import app as celery_app
from institutions import tasks

SETTINGS_FILE = Path(__file__).resolve().parent.parent / "clearinghouse" / "settings.py"
ENVIRONMENT = [
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SECRET_KEY",
    "DJANGO_DEBUG",
    "HUB_ALLOW_PRIVATE_ENDPOINTS",
    "CLEARINGHOUSE_TASKS_EAGER",
    "HUB_ENCRYPTION_KEYS",
    "HUB_SUBJECT_KEY",
    "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
    "DB_PREPARED_STATEMENTS",
    "DJANGO_ALLOWED_HOSTS",
    "DJANGO_SECURE_PROXY_SSL_HEADER",
    "DJANGO_SECURE_SSL_REDIRECT",
    "DJANGO_SECURE_HSTS_SECONDS",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "DJANGO_SECURE_HSTS_PRELOAD",
]


# --- Celery, as the configured app sees it -----------------------------------------------------------


def test_tasks_are_acknowledged_late_and_requeued_when_a_worker_dies():
    assert celery_app.conf.task_acks_late is True
    assert celery_app.conf.task_reject_on_worker_lost is True
    assert tasks.inbox_drain.acks_late and tasks.inbox_sweep.acks_late


def test_a_worker_reserves_one_message_at_a_time():
    assert celery_app.conf.worker_prefetch_multiplier == 1


def test_only_json_goes_over_the_broker():
    assert celery_app.conf.task_serializer == "json"
    assert list(celery_app.conf.accept_content) == ["json"]


def test_the_redis_visibility_timeout_outlasts_the_hard_time_limit():
    hard_limit = celery_app.conf.task_time_limit
    assert hard_limit and celery_app.conf.task_soft_time_limit < hard_limit
    assert celery_app.conf.broker_transport_options["visibility_timeout"] > hard_limit


def test_the_sweeper_runs_on_beat_and_intake_tasks_have_their_queue():
    schedule = {entry["task"] for entry in celery_app.conf.beat_schedule.values()}
    assert "institutions.tasks.inbox_sweep" in schedule
    assert celery_app.amqp.router.route({}, "institutions.tasks.inbox_drain")["queue"].name == "intake"


def test_publishing_to_a_dead_broker_gives_up_quickly():
    policy = celery_app.conf.task_publish_retry_policy
    assert policy["max_retries"] <= 3
    assert celery_app.conf.broker_connection_timeout <= 5


# --- The environment (CONTRACT.md section 7) ---------------------------------------------------------


@pytest.fixture
def load_settings(monkeypatch, tmp_path):
    """Read ``settings.py`` afresh under a given environment; returns its names as a dict."""

    def load(**environment: str) -> dict:
        for name in ENVIRONMENT:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("CLEARINGHOUSE_VAR_DIR", str(tmp_path))
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(SETTINGS_FILE))

    return load


def test_with_no_environment_the_hub_runs_embedded(load_settings, tmp_path):
    loaded = load_settings()
    assert loaded["DATABASES"]["default"]["ENGINE"] == "django.db.backends.sqlite3"
    assert Path(loaded["DATABASES"]["default"]["NAME"]).parent == tmp_path
    assert loaded["CELERY_TASK_ALWAYS_EAGER"] is True
    assert loaded["CELERY_BROKER_URL"] == "memory://"
    assert loaded["HUB_ALLOW_PRIVATE_ENDPOINTS"] is False
    assert loaded["DEBUG"] is True and loaded["SECRET_KEY"]  # a generated development key


def test_database_url_and_redis_url_select_the_real_services(load_settings):
    loaded = load_settings(
        DATABASE_URL="postgres://hub:pw@db.example:5432/hub", REDIS_URL="redis://cache.example:6379/2"
    )
    database = loaded["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["NAME"], database["USER"]) == ("db.example", "hub", "hub")
    assert loaded["CELERY_BROKER_URL"] == "redis://cache.example:6379/2"
    assert loaded["CELERY_TASK_ALWAYS_EAGER"] is False  # tasks go through the broker
    assert loaded["CACHES"]["default"]["LOCATION"] == "redis://cache.example:6379/2"


@pytest.mark.parametrize(("value", "expected"), [(None, 60_000), ("5000", 5_000), ("0", None)])
def test_postgresql_ends_sessions_left_idle_inside_a_transaction(load_settings, value, expected):
    """A hung worker must not keep its owners' locks: PostgreSQL ends its session (0 turns it off)."""
    environment = {"DATABASE_URL": "postgres://hub@db.example/hub"}
    if value is not None:
        environment["DB_IDLE_IN_TRANSACTION_TIMEOUT_MS"] = value
    options = load_settings(**environment)["DATABASES"]["default"].get("OPTIONS", {})
    if expected is None:
        assert "options" not in options
    else:
        assert options["options"] == f"-c idle_in_transaction_session_timeout={expected}"


def test_the_idle_timeout_keeps_the_options_database_url_gives(load_settings):
    loaded = load_settings(DATABASE_URL="postgres://hub@db.example/hub?options=-c%20search_path%3Dhub")
    options = loaded["DATABASES"]["default"]["OPTIONS"]["options"]
    assert options == "-c search_path=hub -c idle_in_transaction_session_timeout=60000"


@pytest.mark.parametrize(("value", "threshold"), [(None, 5), ("1", 5), ("0", None)])
def test_prepared_statements_are_on_unless_switched_off(load_settings, value, threshold):
    environment = {"DATABASE_URL": "postgres://hub@db.example/hub"}
    if value is not None:
        environment["DB_PREPARED_STATEMENTS"] = value
    options = load_settings(**environment)["DATABASES"]["default"].get("OPTIONS", {})
    assert options.get("prepare_threshold") == threshold


@pytest.mark.postgres
@pytest.mark.django_db
def test_the_hubs_own_connections_carry_the_idle_timeout():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW idle_in_transaction_session_timeout")
        (shown,) = cursor.fetchone()
    assert shown == "1min"


def test_the_secret_key_is_required_when_debug_is_off(load_settings):
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SECRET_KEY"):
        load_settings(DJANGO_DEBUG="0")
    loaded = load_settings(
        DJANGO_DEBUG="0", DJANGO_SECRET_KEY="s3cret-from-the-environment", DJANGO_ALLOWED_HOSTS="hub.example.org"
    )
    assert loaded["DEBUG"] is False and loaded["SECRET_KEY"] == "s3cret-from-the-environment"


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), ("", False)])
def test_private_endpoints_are_allowed_only_on_request(load_settings, value, expected):
    assert load_settings(HUB_ALLOW_PRIVATE_ENDPOINTS=value)["HUB_ALLOW_PRIVATE_ENDPOINTS"] is expected


def test_the_intake_limits_of_the_contract():
    from django.conf import settings

    assert settings.HUB_INTAKE_MAX_BYTES == 1024 * 1024
    assert settings.HUB_INTAKE_MAX_EVENTS == 1000
    assert settings.HUB_SIGNATURE_TOLERANCE_SECONDS == 300
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE > settings.HUB_INTAKE_MAX_BYTES


def test_the_daily_runs_follow_the_standards_local_time_across_daylight_saving(load_settings):
    """Beat counts the lots' sweep (00:05) and the settlement run (cut-off time) in the standard's zone,
    so a zone with daylight saving keeps them at the same local time (they ran off by an hour before)."""
    from celery import Celery

    loaded = load_settings(HUB_STANDARD_TIMEZONE="Europe/Berlin", HUB_SETTLEMENT_CUT_OFF_TIME="00:15")
    app = Celery(set_as_current=False)
    app.conf.update(timezone=loaded["CELERY_TIMEZONE"])
    berlin = ZoneInfo("Europe/Berlin")
    for name, local in (("ledger-lots-expire", time(0, 5)), ("settlement-run-daily", time(0, 15))):
        schedule = loaded["CELERY_BEAT_SCHEDULE"][name]["schedule"]
        for day in (date(2026, 3, 28), date(2026, 3, 29), date(2026, 10, 25)):  # DST starts and ends
            last_run = datetime.combine(day - timedelta(days=1), local, berlin)
            now = datetime.combine(day, time(0, 0), berlin)
            due = crontab(hour=schedule.hour, minute=schedule.minute, app=app, nowfun=lambda now=now: now)
            next_run = (now + due.remaining_estimate(last_run)).astimezone(berlin)
            assert (next_run.date(), next_run.time()) == (day, local), (name, day, next_run)


# --- Production: the hosts it answers to, HTTPS behind the proxy, cookies (issue 11) -------------------

PRODUCTION = {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "s3cret-from-the-environment"}
HTTPS_SETTINGS = [
    "SECURE_SSL_REDIRECT",
    "SECURE_REDIRECT_EXEMPT",
    "SECURE_PROXY_SSL_HEADER",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
]


def test_allowed_hosts_are_required_when_debug_is_off(load_settings):
    """No ``*`` by default in production: a forged Host would steer the URLs the hub builds."""
    for missing in ({}, {"DJANGO_ALLOWED_HOSTS": ""}, {"DJANGO_ALLOWED_HOSTS": " , "}):
        with pytest.raises(ImproperlyConfigured, match="DJANGO_ALLOWED_HOSTS is required when DJANGO_DEBUG is off"):
            load_settings(**PRODUCTION, **missing)
    loaded = load_settings(**PRODUCTION, DJANGO_ALLOWED_HOSTS="hub.example.org, 127.0.0.1")
    assert loaded["ALLOWED_HOSTS"] == ["hub.example.org", "127.0.0.1"]


def test_a_development_hub_answers_any_host_over_plain_http(load_settings):
    loaded = load_settings()
    assert loaded["ALLOWED_HOSTS"] == ["*"]
    assert loaded["SECURE_SSL_REDIRECT"] is False and loaded["SECURE_HSTS_SECONDS"] == 0
    assert loaded["SESSION_COOKIE_SECURE"] is False and loaded["CSRF_COOKIE_SECURE"] is False


def test_production_is_https_only_with_secure_cookies(load_settings):
    loaded = load_settings(**PRODUCTION, DJANGO_ALLOWED_HOSTS="hub.example.org")
    assert loaded["SECURE_SSL_REDIRECT"] is True
    assert loaded["SECURE_HSTS_SECONDS"] == 365 * 24 * 3600
    assert loaded["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True and loaded["SECURE_HSTS_PRELOAD"] is True
    for cookie in ("SESSION", "CSRF"):
        assert loaded[f"{cookie}_COOKIE_SECURE"] is True
        assert loaded[f"{cookie}_COOKIE_HTTPONLY"] is True
        assert loaded[f"{cookie}_COOKIE_SAMESITE"] == "Lax"
    assert loaded["SECURE_PROXY_SSL_HEADER"] is None  # trusted only when named


def test_hsts_and_the_redirect_come_from_the_environment(load_settings):
    loaded = load_settings(
        **PRODUCTION,
        DJANGO_ALLOWED_HOSTS="hub.example.org",
        DJANGO_SECURE_SSL_REDIRECT="0",
        DJANGO_SECURE_HSTS_SECONDS="3600",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="0",
        DJANGO_SECURE_HSTS_PRELOAD="0",
    )
    assert loaded["SECURE_SSL_REDIRECT"] is False and loaded["SECURE_HSTS_SECONDS"] == 3600
    assert loaded["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is False and loaded["SECURE_HSTS_PRELOAD"] is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("HTTP_X_FORWARDED_PROTO,https", ("HTTP_X_FORWARDED_PROTO", "https")),
        (" HTTP_X_FORWARDED_SSL , on ", ("HTTP_X_FORWARDED_SSL", "on")),
    ],
)
def test_the_proxys_scheme_header_is_read_from_the_environment(load_settings, value, expected):
    loaded = load_settings(DJANGO_SECURE_PROXY_SSL_HEADER=value)
    assert loaded["SECURE_PROXY_SSL_HEADER"] == expected


@pytest.mark.parametrize("value", ["X-Forwarded-Proto,https", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_PROTO,"])
def test_a_malformed_proxy_header_stops_the_start(load_settings, value):
    with pytest.raises(ImproperlyConfigured, match="DJANGO_SECURE_PROXY_SSL_HEADER must read HTTP_<HEADER>,<value>"):
        load_settings(DJANGO_SECURE_PROXY_SSL_HEADER=value)


@pytest.mark.django_db
def test_probes_over_plain_http_are_answered_and_the_rest_is_sent_to_https(load_settings, client):
    """Health probes speak plain HTTP inside the cluster: a redirect would read to them as a failure."""
    production = load_settings(
        **PRODUCTION,
        DJANGO_ALLOWED_HOSTS="testserver",
        DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    )
    with override_settings(**{name: production[name] for name in HTTPS_SETTINGS}):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        for path in ("/api/v1/hub/keys", "/healthz/", "/readyzz"):  # exempt are the two paths, exactly
            plain = client.get(path)
            assert plain.status_code == 301, path
            assert plain["Location"] == f"https://testserver{path}"
        proxied = client.get("/api/v1/hub/keys", HTTP_X_FORWARDED_PROTO="https")
        assert proxied.status_code == 200
        assert proxied["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
        assert "Strict-Transport-Security" not in client.get("/healthz")  # never over plain HTTP


# --- check --deploy, in a process of its own, with compose's production environment ------------------


def compose_web_environment(tmp_path: Path, **dotenv: str) -> dict[str, str]:
    """What compose's web process gets, given a .env with the secrets (and ``dotenv``), plus PATH."""
    from cryptography.fernet import Fernet

    from tests.compose_file import service_environment

    secrets_of_dotenv = {
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "HUB_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "HUB_SUBJECT_KEY": secrets.token_urlsafe(32),
    }
    environment = service_environment("web", {**secrets_of_dotenv, **dotenv})
    return {
        **environment,
        "PATH": os.environ["PATH"],
        "CLEARINGHOUSE_VAR_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
    }


def manage(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (our own manage.py)
        [sys.executable, "manage.py", *arguments],
        env=environment,
        cwd=SETTINGS_FILE.parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_deploy_passes_with_no_warning_under_production_settings(tmp_path):
    environment = compose_web_environment(tmp_path)
    assert environment["DJANGO_DEBUG"] == "0"
    result = manage(environment, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_fails_the_run_on_a_warning(tmp_path):
    """The check above can fail: plain HTTP allowed in production is a warning, and a warning fails it."""
    result = manage(
        compose_web_environment(tmp_path, DJANGO_SECURE_SSL_REDIRECT="0"),
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert result.returncode != 0
    assert "security.W008" in result.stderr


def test_without_allowed_hosts_production_refuses_to_start_and_says_why(tmp_path):
    environment = compose_web_environment(tmp_path)
    del environment["DJANGO_ALLOWED_HOSTS"]
    result = manage(environment, "check")
    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_ALLOWED_HOSTS is required when DJANGO_DEBUG is off" in result.stderr
