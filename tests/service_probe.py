"""Chooses the services for the test run before Django reads its settings.

PostgreSQL and Redis are used when reachable (``DATABASE_URL`` / ``REDIS_URL``, else the default
local addresses); otherwise the suite runs on SQLite with in-process tasks and says so. With
``CLEARINGHOUSE_REQUIRE_SERVICES=1`` (CI) a missing service fails the run instead.
Loaded with ``-p tests.service_probe`` so it runs before pytest-django configures Django.
"""

from __future__ import annotations

import os

import pytest

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _postgres_ok(url: str) -> str | None:
    try:
        import psycopg

        conninfo = url.replace("postgres://", "postgresql://", 1)
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def _redis_ok(url: str) -> str | None:
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()


def _probe() -> tuple[str, str, list[str]]:
    required = os.environ.get("CLEARINGHOUSE_REQUIRE_SERVICES") == "1"
    problems: list[str] = []
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL

    is_postgres = database_url.startswith(("postgres://", "postgresql://"))
    pg_error = _postgres_ok(database_url) if is_postgres else "not a PostgreSQL URL"
    if pg_error is None:
        os.environ["DATABASE_URL"] = database_url
        database = f"PostgreSQL ({database_url.rsplit('@', 1)[-1]})"
    else:
        problems.append(f"PostgreSQL unreachable at {database_url}: {pg_error}")
        os.environ.pop("DATABASE_URL", None)
        database = "SQLite (PostgreSQL-only tests are skipped)"

    redis_error = _redis_ok(redis_url)
    if redis_error is None:
        os.environ["REDIS_URL"] = redis_url
        broker = f"Redis ({redis_url.rsplit('@', 1)[-1]})"
    else:
        problems.append(f"Redis unreachable at {redis_url}: {redis_error}")
        os.environ.pop("REDIS_URL", None)
        broker = "in-process tasks, local-memory cache (Redis-only tests are skipped)"
    # This run's own Redis keys: concurrent runs against one Redis must not share rate-limit windows.
    os.environ.setdefault("HUB_REDIS_KEY_PREFIX", f"test{os.getpid()}:")
    # Tasks run in process unless a test starts a real worker against the broker.
    os.environ.setdefault("CLEARINGHOUSE_TASKS_EAGER", "1")
    os.environ.setdefault("CLEARINGHOUSE_VAR_DIR", os.path.join(os.getcwd(), "var", "test"))
    if required and problems:
        raise pytest.UsageError(
            "CLEARINGHOUSE_REQUIRE_SERVICES=1 and a service is missing:\n  " + "\n  ".join(problems)
        )
    return database, broker, problems


DATABASE, BROKER, PROBLEMS = _probe()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"clearinghouse services: database {DATABASE}; broker {BROKER}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    terminalreporter.write_line(f"clearinghouse services used: database {DATABASE}; broker {BROKER}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    using_postgres = "DATABASE_URL" in os.environ
    using_redis = "REDIS_URL" in os.environ
    # Markers, not keywords: a keyword also matches a test's name or parameter id ("postgres").
    for item in items:
        if item.get_closest_marker("postgres") and not using_postgres:
            item.add_marker(pytest.mark.skip(reason="needs PostgreSQL; run with it reachable"))
        if item.get_closest_marker("redis") and not using_redis:
            item.add_marker(pytest.mark.skip(reason="needs Redis; run with it reachable"))
