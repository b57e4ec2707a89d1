"""``docker-compose.yml`` wires the production shape (DESIGN.md, defaults and scale)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from tests.compose_file import (
    ROOT,
    command_of,
    environment_of,
    gunicorn_settings,
    load_services,
    service_environment,
)

HUB_SERVICES = ["web", "worker", "beat"]
CONTRACT_ENVIRONMENT = [
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SECRET_KEY",
    "HUB_ALLOW_PRIVATE_ENDPOINTS",
    "CLEARINGHOUSE_REQUIRE_SERVICES",
]
# What an operator's .env must hold for compose to start at all.
DOTENV = {"DJANGO_SECRET_KEY": "k" * 50, "HUB_ENCRYPTION_KEYS": "fernet-key", "HUB_SUBJECT_KEY": "subject-key"}
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


@pytest.fixture(scope="module")
def services() -> dict:
    return load_services()


def test_the_services_are_there(services):
    assert {"postgres", "redis", "proxy", "web", "worker", "beat"} <= set(services)


@pytest.mark.parametrize("name", ["postgres", "redis", "proxy", "web", "worker", "beat"])
def test_each_service_has_a_healthcheck(services, name):
    healthcheck = services[name].get("healthcheck")
    assert healthcheck and healthcheck.get("test") and not healthcheck.get("disable")


def test_web_is_gunicorn_from_its_configuration_file_and_checks_readiness(services):
    command = command_of(services["web"])
    assert re.search(r"migrate --noinput &&\s+exec gunicorn --config gunicorn\.conf\.py\s*\"", command), command
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


# --- Serving as measured, behind the proxy (issue 11) -------------------------------------------------


def nginx_directives() -> dict[str, list[str]]:
    """deploy/nginx.conf's simple directives (``name value;``), comments left out: name -> values."""
    directives: dict[str, list[str]] = {}
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    for statement in re.findall(r"([^;{}]+);", text):  # block openers end in "{", not ";"
        name, _, value = statement.strip().partition(" ")
        directives.setdefault(name, []).append(value.strip())
    return directives


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


@pytest.mark.parametrize("dotenv", [{}, {"GUNICORN_WORKERS": "3", "GUNICORN_THREADS": "6"}])
def test_web_runs_threaded_workers_as_the_benchmark_measured(dotenv):
    """gthread, so concurrent intake requests of one process share a commit; the benchmark's 2 x 4 unless
    the .env says otherwise; a worker whose loop is silent is replaced, and idle connections close."""
    config = gunicorn_settings(service_environment("web", {**DOTENV, **dotenv}))
    assert config.worker_class_str == "gthread"
    assert config.workers == int(dotenv.get("GUNICORN_WORKERS", 2))
    assert config.threads == int(dotenv.get("GUNICORN_THREADS", 4))
    assert config.wsgi_app == "clearinghouse.wsgi:application"
    assert config.bind == ["0.0.0.0:8000"]
    assert 0 < config.timeout <= 60 and 0 < config.graceful_timeout <= 60
    assert config.keepalive >= 5
    assert config.accesslog is None  # nginx logs requests, and the benchmark ran without it


def test_the_image_runs_gunicorn_from_the_same_configuration():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^CMD \["gunicorn", "--config", "gunicorn\.conf\.py"\]$', dockerfile, re.M)
    assert re.search(r"^ENV GUNICORN_BIND=0\.0\.0\.0:8000$", dockerfile, re.M)
    config = gunicorn_settings({"GUNICORN_BIND": "0.0.0.0:8000"})
    assert (config.worker_class_str, config.workers, config.threads) == ("gthread", 2, 4)


def test_only_the_proxy_is_published_and_it_waits_for_a_healthy_web(services):
    assert "ports" not in services["web"]
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in proxy["volumes"]
    assert proxy["ports"] == ["8000:8000"]
    assert proxy["depends_on"]["web"] == {"condition": "service_healthy", "restart": True}


def test_the_proxy_reads_requests_whole_within_timeouts():
    """Slow clients cost the proxy a connection, never a gunicorn thread (tests/test_serving.py runs it)."""
    directives = nginx_directives()
    assert directives["proxy_pass"] == ["http://hub_web"]
    assert directives["server"] == ["web:8000"]
    assert directives["listen"] == ["8000"]
    assert directives["proxy_request_buffering"] == ["on"]
    assert directives["proxy_buffering"] == ["on"]
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout", "proxy_read_timeout"):
        assert len(directives[name]) == 1 and 0 < seconds(directives[name][0]) <= 60, name
    assert seconds(directives["client_header_timeout"][0]) <= 10
    assert seconds(directives["client_body_timeout"][0]) <= 10
    # Bodies the intake accepts pass; the intake answers what is a little over its limit itself.
    (max_body,) = directives["client_max_body_size"]
    assert int(max_body.removesuffix("m")) * 1024 * 1024 > settings.HUB_INTAKE_MAX_BYTES


def test_the_proxy_closes_idle_upstream_connections_before_gunicorn_does():
    """Else the proxy could send a request down a connection gunicorn is closing (a spurious 502)."""
    (upstream_idle,) = nginx_directives()["keepalive_timeout"][:1]
    config = gunicorn_settings(service_environment("web", DOTENV))
    assert seconds(upstream_idle) < config.keepalive


def test_the_hub_trusts_the_scheme_header_the_proxy_sets():
    directives = nginx_directives()
    assert "X-Forwarded-Proto $scheme" in directives["proxy_set_header"]  # set, never passed through
    assert "Host $host" in directives["proxy_set_header"]
    environment = service_environment("web", DOTENV)
    assert environment["DJANGO_SECURE_PROXY_SSL_HEADER"] == "HTTP_X_FORWARDED_PROTO,https"


@pytest.mark.parametrize("allowed_hosts", [None, "hub.example.org", "hub.example.org,api.example.org"])
@pytest.mark.parametrize("name", ["web", "proxy"])
def test_the_healthchecks_host_is_always_allowed(services, name, allowed_hosts):
    """The healthchecks ask on loopback with Host 127.0.0.1: whatever hosts the .env names, the hub must
    answer that one, over plain HTTP (health paths are exempt from the redirect to HTTPS)."""
    check = " ".join(services[name]["healthcheck"]["test"])
    host, path = re.search(r"http://([^/:']+)(?::\d+)?(/\w+)", check).groups()  # type: ignore[union-attr]
    dotenv = {**DOTENV, **({"DJANGO_ALLOWED_HOSTS": allowed_hosts} if allowed_hosts else {})}
    allowed = service_environment("web", dotenv)["DJANGO_ALLOWED_HOSTS"].split(",")
    assert host in allowed
    assert set((allowed_hosts or "localhost").split(",")) <= set(allowed)
    assert path in ("/healthz", "/readyz")
    assert any(re.search(pattern, path.lstrip("/")) for pattern in settings.SECURE_REDIRECT_EXEMPT)


def celery_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``celery`` as the image runs it, in compose's worker environment, asked for ``--help`` only: the
    app must import, and every option must be one celery knows, or it exits non-zero."""
    environment = {**service_environment("worker", DOTENV), "PATH": os.environ["PATH"]}
    return subprocess.run(  # noqa: S603 (celery of this venv)
        [str(Path(sys.executable).parent / "celery"), *arguments, "--help"],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_celery_commands_are_invocations_of_the_hubs_app(services, name):
    argv = shlex.split(command_of(services[name]))
    assert argv[:4] == ["celery", "-A", "clearinghouse", name], argv
    result = celery_cli(*argv[1:])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["-A", "clearinghouse", "worker", "--concurency", "2"], "No such option"),
        (["-A", "clearinghous", "worker"], "Unable to load celery application"),
    ],
)
def test_a_misspelt_celery_command_does_not_pass_that_check(arguments, complaint):
    result = celery_cli(*arguments)
    assert result.returncode != 0 and complaint in result.stderr


def test_compose_environment_reaches_gunicorn_only_through_its_variables(services):
    """Compose passes the knobs through empty by default, so gunicorn.conf.py stays the one place."""
    environment = environment_of(services["web"])
    assert environment["GUNICORN_WORKERS"] == "${GUNICORN_WORKERS:-}"
    assert environment["GUNICORN_THREADS"] == "${GUNICORN_THREADS:-}"
    assert "GUNICORN_WORKER_CLASS" not in environment
