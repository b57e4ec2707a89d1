"""gunicorn's configuration, the one place it is set: the image's CMD and compose's web service use it.

The defaults are the configuration the intake benchmark measured (docs/performance.md, "Server
configuration"): threaded workers, two processes of four threads. Threads are what let concurrent intake
requests of one process share a commit (group commit, institutions.intake); ``sync`` workers serve one
request per process and would never group. Each value can be changed from the environment.

gunicorn does not protect itself from slow clients: once a connection's first bytes are in, a ``gthread``
worker's thread reads its headers and body with blocking reads that have no time limit (``timeout`` only
watches the worker process's heartbeat, which its main loop keeps beating meanwhile). A handful of
connections trickling bytes would hold every thread. So the hub is served behind nginx
(deploy/nginx.conf), which reads each request whole, within its own header and body timeouts, before
passing it on: the threads here only ever see complete requests. tests/test_serving.py shows both.
"""

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


wsgi_app = "clearinghouse.wsgi:application"
# gunicorn's own default; the image sets 0.0.0.0:8000 (inside a container the proxy reaches it from outside).
bind = [os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")]

worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gthread")
# One process per core: each runs its Python under its own GIL.
workers = _int("GUNICORN_WORKERS", 2)
# A one-event intake request waits on PostgreSQL about as long as it computes: a few threads keep the core
# busy meanwhile, and the requests waiting together share one commit.
threads = _int("GUNICORN_THREADS", 4)

# A worker process whose main loop is silent this long is killed and replaced (a hung process, not a slow
# request: under gthread the loop keeps beating while its threads work or wait).
timeout = _int("GUNICORN_TIMEOUT", 30)
# On SIGTERM (a deploy, docker stop) requests in flight get this long to finish.
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
# Idle persistent connections (the proxy's pool of upstream connections) stay open this long. It must
# outlast the proxy's own keepalive_timeout for them (deploy/nginx.conf), so the proxy always closes an
# idle connection first and never sends a request down one that gunicorn is closing.
keepalive = _int("GUNICORN_KEEPALIVE", 30)

# The heartbeat file is touched every second: on tmpfs, not the container's overlay filesystem, where a
# write can stall long enough to get a healthy worker killed.
if os.path.isdir("/dev/shm"):  # noqa: S108 (gunicorn's own files, created by it with private names)
    worker_tmp_dir = "/dev/shm"  # noqa: S108

# The proxy logs every request; gunicorn's access log would repeat it (and it was off when measured).
# GUNICORN_ACCESS_LOG=- prints it on stdout.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
