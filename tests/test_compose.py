"""``docker-compose.yml`` wires the production shape (DESIGN.md, defaults and scale)."""

from pathlib import Path

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
HUB_SERVICES = ["web", "worker", "beat"]
CONTRACT_ENVIRONMENT = [
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SECRET_KEY",
    "HUB_ALLOW_PRIVATE_ENDPOINTS",
    "CLEARINGHOUSE_REQUIRE_SERVICES",
]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def command_of(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def environment_of(service: dict) -> dict:
    environment = service.get("environment", {})
    if isinstance(environment, list):  # the KEY=value form
        return dict(item.split("=", 1) for item in environment)
    return environment


def test_the_five_services_are_there(services):
    assert {"postgres", "redis", "web", "worker", "beat"} <= set(services)


@pytest.mark.parametrize("name", ["postgres", "redis", "web", "worker", "beat"])
def test_each_service_has_a_healthcheck(services, name):
    healthcheck = services[name].get("healthcheck")
    assert healthcheck and healthcheck.get("test") and not healthcheck.get("disable")


def test_web_is_gunicorn_and_checks_readiness(services):
    assert "gunicorn clearinghouse.wsgi" in command_of(services["web"])
    assert "/readyz" in " ".join(services["web"]["healthcheck"]["test"])


def test_the_worker_serves_every_queue_and_beat_schedules(services):
    worker = command_of(services["worker"])
    assert worker.startswith("celery -A clearinghouse worker")
    for queue in ["intake", "ledger", "delivery", "settlement"]:
        assert queue in worker
    assert command_of(services["beat"]).startswith("celery -A clearinghouse beat")


@pytest.mark.parametrize("name", HUB_SERVICES)
def test_hub_services_get_the_contract_environment(services, name):
    environment = environment_of(services[name])
    missing = [variable for variable in CONTRACT_ENVIRONMENT if variable not in environment]
    assert not missing
    assert environment["DATABASE_URL"].startswith("postgres://")
    assert environment["DATABASE_URL"].split("@", 1)[1].startswith("postgres:")  # the compose service
    assert environment["REDIS_URL"].startswith("redis://redis:")
    assert str(environment["CLEARINGHOUSE_REQUIRE_SERVICES"]) == "1"


@pytest.mark.parametrize("name", HUB_SERVICES)
def test_hub_services_wait_for_healthy_postgres_and_redis(services, name):
    depends_on = services[name]["depends_on"]
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_the_database_keeps_its_data_in_a_volume(services):
    assert any("/var/lib/postgresql/data" in volume for volume in services["postgres"]["volumes"])
