"""``execute_prepared`` keeps the checks Django's own cursors make before a statement."""

from __future__ import annotations

import pytest
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.transaction import TransactionManagementError

from clearinghouse.db import execute_prepared

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="execute_prepared is PostgreSQL only")


@pytest.mark.django_db
def test_a_broken_transaction_is_refused_as_djangos_cursors_refuse_it() -> None:
    with transaction.atomic():
        transaction.set_rollback(True)  # as after an error caught inside the block
        with pytest.raises(TransactionManagementError):
            execute_prepared("SELECT 1", [])


@pytest.mark.django_db(transaction=True)
def test_a_connection_that_fails_its_health_check_is_replaced() -> None:
    db = connections[DEFAULT_DB_ALIAS]
    db.ensure_connection()
    db.health_check_enabled = True  # type: ignore[attr-defined]  # as CONN_HEALTH_CHECKS sets it
    db.health_check_done = False  # type: ignore[attr-defined]  # as at the start of a request
    db.connection.close()  # the server ended the kept connection meanwhile
    try:
        assert execute_prepared("SELECT 1", []).fetchone() == (1,)
    finally:
        db.close()  # the next connection takes its settings afresh (no health checks)
