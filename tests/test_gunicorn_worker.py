"""gateway.gunicorn_worker: connections spread over the workers, and gunicorn's own error answers
in problem+json. Run with real gunicorn and config/gunicorn.conf.py (the production settings)."""
from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gateway.gunicorn_worker import Table, problem_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pid_app(environ, start_response):  # type: ignore[no-untyped-def]
    """Answers with the pid of the worker that served the request."""
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gunicorn(workers: int, *extra: str) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "config", "gunicorn.conf.py"),
                             "--bind", f"127.0.0.1:{port}", "--workers", str(workers), *extra,
                             "tests.test_gunicorn_worker:pid_app"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while len(seen) < workers:  # every worker up (each answers with its own pid)
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            try:
                seen.add(_get(port))
            except OSError:
                time.sleep(0.1)
        time.sleep(0.3)  # the workers see those connections closed (their counts back to 0)
        yield port
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1].decode(errors="replace")
        assert "Traceback" not in err, err[-3000:]


def _get(port: int, sock: socket.socket | None = None) -> str:
    """GET / on ``sock`` (kept open) or on a connection of its own; the answer's body."""
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the answer")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += s.recv(4096)
        return body.decode()
    finally:
        if sock is None:
            s.close()


@pytest.fixture(scope="module")
def two_workers() -> Iterator[int]:
    yield from _gunicorn(2)


def test_eight_kept_alive_connections_opened_at_once_go_four_to_each_worker(two_workers):
    # gunicorn's plain gthread leaves this to the accept race: [5, 3], [6, 2], even [8, 0]
    # (with worker_class = "gthread" in the settings file, 3 runs of this test out of 3 failed in
    # their first round: [5, 3], [5, 3], [6, 2])
    for _ in range(5):
        socks = [socket.create_connection(("127.0.0.1", two_workers), timeout=10) for _ in range(8)]
        try:
            pids = collections.Counter(_get(two_workers, s) for s in socks)
            assert sorted(pids.values()) == [4, 4], pids
            # the connections stay where they are: a second request on each goes to the same worker
            assert collections.Counter(_get(two_workers, s) for s in socks) == pids
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)  # the workers see the connections closed


def test_a_slot_of_a_worker_that_is_gone_is_given_out_again_and_never_counted():
    t = Table(slots=3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert t.reserve() == 0
    t.occupy(0, dead.pid)  # a worker that then died without letting go (SIGKILL)
    t.set_count(0, 0)
    assert not t.fewer_elsewhere(1, 5), "a dead worker's count is not a reason to wait"
    assert t.reserve() == 0, "its slot is free again"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t.occupy(0, alive.pid)
        assert t.reserve() == 1
        t.occupy(1, os.getpid())
        t.set_count(0, 2)
        t.set_count(1, 3)
        assert t.fewer_elsewhere(1, 3) and not t.fewer_elsewhere(0, 2)
        # the same pid given to a new process: another start time, so not the worker
        t.cells[Table.WIDTH * 0 + 2] += 1
        assert not t.fewer_elsewhere(1, 3)
        assert t.reserve() == 0
    finally:
        alive.kill()
        alive.wait()
    t.release(1, os.getpid())
    assert t.cells[Table.WIDTH * 1] == 0


def test_a_reservation_whose_worker_never_started_expires():
    t = Table(slots=1)
    assert t.reserve() == 0 and t.reserve() is None  # the master gave it out; the fork is under way
    t.cells[2] -= 121_000  # made 121 s ago (milliseconds)
    assert t.reserve() == 0


def _worker(**settings):  # type: ignore[no-untyped-def]
    """A worker object as gunicorn's master makes it before the fork (nothing is run)."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from gateway.gunicorn_worker import GatewayThreadWorker

    cfg = Config()
    for k, v in {"threads": 2, **settings}.items():
        cfg.set(k, v)
    return GatewayThreadWorker(1, os.getpid(), [], None, 30, cfg, Logger(cfg))


def test_a_worker_that_is_not_accepting_is_never_waited_for(monkeypatch):
    from gateway.gunicorn_worker import NOT_ACCEPTING, GatewayThreadWorker

    monkeypatch.setattr(GatewayThreadWorker, "table", Table(slots=4))
    w = _worker()
    table = GatewayThreadWorker.table
    assert w._slot == 0 and table.cells[1] == NOT_ACCEPTING, "starting: not accepting yet"
    table.occupy(0, os.getpid())
    w.set_accept_enabled(True)  # what ThreadWorker.run does first
    assert table.cells[1] == 0
    w.nr_conns += 3
    assert table.cells[1] == 3
    w.set_accept_enabled(False)  # full (worker_connections), or leaving
    assert table.cells[1] == NOT_ACCEPTING
    w.set_accept_enabled(True)
    w.method_queue.init()
    try:
        w.handle_exit(15, None)  # TERM, HUP's old workers, max_requests: draining from here
    finally:
        w.method_queue.close()
    assert table.cells[1] == NOT_ACCEPTING
    w.nr_conns -= 1  # connections it finishes while draining do not make it look free
    assert table.cells[1] == NOT_ACCEPTING


def test_with_reuse_port_nothing_is_balanced(monkeypatch):
    from gateway.gunicorn_worker import GatewayThreadWorker

    monkeypatch.setattr(GatewayThreadWorker, "table", None)
    w = _worker(reuse_port=True)
    assert w._slot is None and GatewayThreadWorker.table is None


@pytest.fixture(scope="module")
def one_worker() -> Iterator[int]:
    yield from _gunicorn(1)


def _raw(port: int, data: bytes) -> tuple[str, dict[str, str], dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, body = out.split(b"\r\n\r\n", 1)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return status, headers, json.loads(body.decode("utf-8"))


@pytest.mark.parametrize(("request_bytes", "status", "kind"), [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri-too-long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "header-too-large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431, "header-too-large"),
    (b"NOT A REQUEST\r\n\r\n", 400, "malformed-request"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400, "malformed-request"),
])
def test_what_gunicorn_cannot_parse_is_answered_in_problem_json(one_worker, request_bytes, status, kind):
    line, headers, body = _raw(one_worker, request_bytes)
    assert line.startswith(f"HTTP/1.1 {status} ")
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert body["type"] == f"urn:egov:gateway:problem:{kind}" and body["status"] == status
    assert body["title"] and body["detail"], body


def test_the_problem_answer_for_an_internal_error_says_it_was_logged():
    head, body = problem_bytes(500, "").split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    doc = json.loads(body)
    assert doc["type"].endswith(":internal") and "logged" in doc["detail"]


def reading_app():  # type: ignore[no-untyped-def]
    """A Flask app with the gateway's error answers, whose /read reads the request body."""
    from flask import Flask

    from gateway.api import problems

    app = Flask("reading")
    problems.install(app)

    @app.post("/read")
    def read():  # type: ignore[no-untyped-def]
        from flask import request

        return {"bytes": len(request.get_data())}

    @app.get("/")
    def pid():  # type: ignore[no-untyped-def]
        return str(os.getpid())

    return app


def _answer(s: socket.socket) -> tuple[str, dict]:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
        if b"\r\n\r\n" in out:
            head, body = out.split(b"\r\n\r\n", 1)
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(body) >= length:
                return head.decode("latin-1").split("\r\n", 1)[0], json.loads(body)
    raise ConnectionError(f"closed without a whole answer: {out[:200]!r}")


def test_clients_that_stall_mid_request_are_cut_off_and_never_starve_the_others():
    """Two threads, both taken by clients that stop sending half-way (in the headers; in the
    body): with GATEWAY_READ_TIMEOUT=1 both are let go, the next caller is answered, the
    stalled body gets 400 incomplete-body (with and without Content-Length), the stalled
    headers a closed connection and one log line, no traceback."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "config", "gunicorn.conf.py"),
         "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2", "tests.test_gunicorn_worker:reading_app()"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "GATEWAY_READ_TIMEOUT": "1"})
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            try:
                _get(port)
                break
            except OSError:
                time.sleep(0.1)
        headers = socket.create_connection(("127.0.0.1", port), timeout=20)
        headers.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ")
        body = socket.create_connection(("127.0.0.1", port), timeout=20)
        body.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        time.sleep(0.3)  # both threads are now reading from a silent client
        started = time.monotonic()
        assert _get(port).isdigit()  # answered once a thread is let go
        assert time.monotonic() - started < 10
        line, problem = _answer(body)
        assert line.startswith("HTTP/1.1 400 ") and problem["type"].endswith(":incomplete-body"), problem
        assert "nothing was stored" in problem["detail"]
        assert headers.recv(100) == b""  # closed, without an answer
        chunked = socket.create_connection(("127.0.0.1", port), timeout=20)
        chunked.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        line, problem = _answer(chunked)
        assert line.startswith("HTTP/1.1 400 ") and problem["type"].endswith(":incomplete-body"), problem
        moving = socket.create_connection(("127.0.0.1", port), timeout=20)  # slow, but never silent for 1 s
        moving.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for b in b"abcdef":
            time.sleep(0.4)
            moving.sendall(bytes([b]))
        line, answer = _answer(moving)
        assert line.startswith("HTTP/1.1 200 ") and answer == {"bytes": 6}
        for s in (headers, body, chunked, moving):
            s.close()
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    assert "sent or took nothing for 1 s in the middle of a request" in err, err[-3000:]


def test_a_read_timeout_that_is_not_a_number_of_seconds_stops_the_worker_saying_so(monkeypatch):
    from gateway.gunicorn_worker import READ_TIMEOUT, read_timeout

    monkeypatch.delenv("GATEWAY_READ_TIMEOUT", raising=False)
    assert read_timeout() == READ_TIMEOUT
    monkeypatch.setenv("GATEWAY_READ_TIMEOUT", "2.5")
    assert read_timeout() == 2.5
    for bad in ("0", "-1", "1m", "100000"):
        monkeypatch.setenv("GATEWAY_READ_TIMEOUT", bad)
        with pytest.raises(SystemExit, match="GATEWAY_READ_TIMEOUT=.*expected the seconds"):
            read_timeout()
    # gunicorn with the production settings stops at once, saying so, instead of starting
    # workers that each fail
    r = subprocess.run([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "config", "gunicorn.conf.py"),
                        "--bind", f"127.0.0.1:{_free_port()}", "tests.test_gunicorn_worker:pid_app"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GATEWAY_READ_TIMEOUT": "soon"})
    assert r.returncode != 0 and "GATEWAY_READ_TIMEOUT='soon': expected the seconds" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Booting worker" not in r.stderr
