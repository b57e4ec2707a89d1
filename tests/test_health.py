"""``/healthz`` and ``/readyz`` (CONTRACT.md section 5)."""

import pytest
from django.db import connection
from django.test import override_settings

pytestmark = pytest.mark.django_db

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def test_healthz_answers_while_the_process_is_up(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_with_in_process_tasks(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "in-process"}}


@pytest.mark.redis
def test_readyz_pings_the_broker_when_tasks_go_through_it(client):
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False):
        response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_when_the_broker_is_unreachable(client):
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False, REDIS_URL=UNREACHABLE_REDIS):
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("error")


def test_readyz_is_503_when_tasks_need_a_broker_and_none_is_configured(client):
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False, REDIS_URL=""):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_when_the_database_is_unreachable(client, monkeypatch):
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "PORT", "1")  # the same server, at a port nothing serves
    try:
        response = client.get("/readyz")
    finally:
        connection.close()
    monkeypatch.undo()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("error")
    assert client.get("/readyz").status_code == 200  # and ready again once it is back
