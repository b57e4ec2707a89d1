"""Settings: the Celery reliability model (DESIGN.md) and the environment of CONTRACT.md section 7."""

import runpy
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

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
    loaded = load_settings(DJANGO_DEBUG="0", DJANGO_SECRET_KEY="s3cret-from-the-environment")
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
