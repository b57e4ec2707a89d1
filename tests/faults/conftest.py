"""The fault campaign's servers: a PostgreSQL cluster and a Redis of the tests' own.

A test here crashes, wipes or restarts servers, so never the shared ones: the session starts a private
PostgreSQL cluster (``initdb`` in a temporary directory, a free port; as the ``postgres`` OS user when
the suite runs as root) with a migrated template database, and each test gets a copy of that database,
a fresh Redis and the hub's processes on them (``bench.campaign.scene``).

Without the server binaries the tests skip, and fail when ``CLEARINGHOUSE_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import campaign

TEMPLATE = "hub_template"


@pytest.fixture(scope="session")
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[campaign.PrivatePostgres]:
    missing = campaign.missing_binaries()
    bindir = campaign.postgres_bindir()
    if missing or bindir is None:
        message = "the fault campaign cannot start its own servers; missing: " + "; ".join(missing)
        if os.environ.get("CLEARINGHOUSE_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    postgres = campaign.PrivatePostgres(bindir)
    try:
        postgres.init()
        postgres.start()
        campaign.template_prepare(postgres, TEMPLATE, tmp_path_factory.mktemp("faults-template"))
        yield postgres
    finally:
        postgres.close()


@pytest.fixture
def scene(
    private_postgres: campaign.PrivatePostgres, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[campaign.Scene]:
    name = request.node.name.removeprefix("test_")[:20].strip("_")
    with campaign.scene(private_postgres, TEMPLATE, tmp_path, name) as ready:
        yield ready
