"""Static files come from the hub itself (WhiteNoise), under gunicorn with production settings as under
``make run``'s runserver: no other server, no CDN."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.servers import ROOT, exchange, hub_server, server_environment


def get(port: int, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


def stylesheet(page: bytes) -> str:
    match = re.search(rb'<link rel="stylesheet" href="([^"]+)"', page)
    assert match is not None
    return match.group(1).decode()


@pytest.mark.django_db
def test_the_app_serves_its_static_files_in_process(client):
    response = client.get("/static/portal/portal.css")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    assert b"--green-700" in b"".join(response.streaming_content)


@pytest.mark.django_db(transaction=True)
def test_gunicorn_in_production_serves_collected_files_hashed_compressed_and_cached_for_a_year(tmp_path):
    static_root = tmp_path / "static"
    environment = {"DJANGO_STATIC_ROOT": str(static_root)}
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        env=server_environment(**environment),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with hub_server("gunicorn", tmp_path, **environment) as server:
        status, headers, page = get(server.port, "/standard/")
        assert status == 200, page[:500]
        css = stylesheet(page)
        assert re.fullmatch(r"/static/portal/portal\.[0-9a-f]{12}\.css", css), css
        status, headers, _body = get(server.port, css, "Accept-Encoding: gzip")
        assert status == 200 and headers["content-type"].startswith("text/css")
        assert headers.get("content-encoding") == "gzip"
        assert "immutable" in headers["cache-control"] and "max-age=315360000" in headers["cache-control"]
        assert "'unsafe-inline'" not in headers.get("content-security-policy", "")


@pytest.mark.django_db(transaction=True)
def test_without_collectstatic_production_still_serves_the_files_unhashed(tmp_path):
    with hub_server("gunicorn", tmp_path, DJANGO_STATIC_ROOT=str(tmp_path / "never-collected")) as server:
        status, _, page = get(server.port, "/signin/")
        assert status == 200, page[:500]
        css = stylesheet(page)
        assert css == "/static/portal/portal.css"
        status, headers, _ = get(server.port, css)
        assert status == 200 and headers["content-type"].startswith("text/css")
    assert "not collected" in server.output()


@pytest.mark.django_db(transaction=True)
def test_make_runs_development_server_serves_static_files(tmp_path):
    with hub_server("runserver", tmp_path, DJANGO_DEBUG="1") as server:
        status, _, page = get(server.port, "/signin/")
        assert status == 200, page[:500]
        assert stylesheet(page) == "/static/portal/portal.css"
        status, headers, _ = get(server.port, "/static/portal/portal.css")
        assert status == 200 and headers["content-type"].startswith("text/css")
