"""gunicorn settings for a production node:

    GATEWAY_CONFIG=/etc/gateway/prefecture.toml \
        gunicorn -c config/gunicorn.conf.py 'gateway.app:create_app()'

The API is stateless; run the delivery worker next to it with ``gateway worker``
(several of each may share one PostgreSQL).
"""
import multiprocessing
import os

bind = os.environ.get("GATEWAY_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("GATEWAY_WORKERS", min(4, multiprocessing.cpu_count() * 2)))
# gthread, but a new connection goes to the worker with the fewest open ones (kept-alive
# connections otherwise stay wherever the accept race put them, and a worker runs on one core at
# a time), gunicorn's own error answers are problem+json, and a client that sends nothing for
# GATEWAY_READ_TIMEOUT seconds (60) in the middle of a request is cut off: gateway/gunicorn_worker.py
worker_class = "gateway.gunicorn_worker.GatewayThreadWorker"
# the access log's path as UTF-8, with control characters escaped (no forged log lines)
logger_class = "gateway.gunicorn_worker.GatewayLogger"
from gateway.gunicorn_worker import read_timeout  # noqa: E402

read_timeout()  # a bad GATEWAY_READ_TIMEOUT stops the start here, named, not in every worker start
from gateway import logs  # noqa: E402

logs.setup()  # the node's own log lines (gateway.*, adapters.*) on stderr, like errorlog below
threads = int(os.environ.get("GATEWAY_THREADS", 8))
timeout = 120            # a streamed 1 GB attachment upload must not be cut off
graceful_timeout = 30
keepalive = 5
# Recycle workers now and then (state lives in the database), but rarely: a worker's start
# costs about 0.7 s of CPU (imports, schemas, WSDL) and cold caches after it; at 10,000 a
# busy worker restarted every 15-30 s, and throughput dipped by a fifth each time.
max_requests = 100_000
max_requests_jitter = 10_000
accesslog = "-"
# gunicorn's default format, but the request line without its query string: a callback's
# ?token= (the exchange box cannot send headers) must not end up in the log
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s"'
errorlog = "-"
# gunicorn 25+ opens a control socket at ~/.gunicorn/gunicorn.ctl; several instances on one
# host (API instances, nodes) would take it from each other, and nothing here uses it.
control_socket_disable = True
# Never log request bodies or Authorization headers: the default access log format has neither.


# The request threads keep CPython's GIL switch interval (5 ms). A 1 ms interval was set here
# while a thread of its own committed each group of accepts. Since a request thread leads each
# group (gateway.db), it only forced more thread switches: on 2026-11-28, two PostgreSQL nodes
# differing only in it, loaded in alternating 5 s slices (10 and 12 each), accepted 4-5 % fewer
# documents a second with 1 ms, for 4-9 % more CPU a request; SQLite nodes and the bare Flask
# app showed no difference, nor did the accept latencies. (gateway.runtime sets the delivery
# worker's own.)


def post_worker_init(worker):  # noqa: ARG001
    # Everything loaded so far (Flask, SQLAlchemy, lxml, schemas) lives as long as the worker:
    # move it out of the garbage collector's sight, so that collections walk only the objects
    # of requests in flight; and collect the youngest generation every 10,000 allocations
    # instead of 700, since nearly everything a request allocates is freed by reference
    # counting when it ends, before any collection would have looked at it.
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
