"""What only a real HTTP server shows: bodies that end early or never end, on the production
path (gunicorn with config/gunicorn.conf.py and the app factory)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    d = tmp_path_factory.mktemp("edges")
    conf = d / "node.toml"
    conf.write_text(f'[node]\nid = "prefecture"\nunits = ["11522300GDR9YB9550"]\ndata_dir = "{d / "var"}"\n'
                    f"[api]\nmax_json_bytes = 8192\n", encoding="utf-8")
    env = {**os.environ, "GATEWAY_CONFIG": str(conf)}
    cli = [sys.executable, "-m", "gateway.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60)
    key = subprocess.run([*cli, "keys", "create", "--name", "测试", "--scope", "*", "--clearance", "绝密"],
                         env=env, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    port = _free_port()
    access = (d / "access.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.conf.py"),
                             "--bind", f"127.0.0.1:{port}", "--workers", "1", "gateway.app:create_app()"],
                            cwd=ROOT, env={**env, "GATEWAY_WORKERS": "1"}, stdout=access,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            # refused, or accepted by the listening socket while the worker still boots (a
            # loaded machine: its imports took longer than a read timeout)
            except (requests.ConnectionError, requests.Timeout):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
        yield base, key, d / "var" / "blobs"
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1].decode(errors="replace")
        access.close()
        assert "Traceback" not in err, err[-3000:]


def _raw(base: str, head: str, body: bytes, *, half_close: bool) -> bytes:
    """Send ``head`` and ``body`` on a socket of its own; return whatever the server answers."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode("utf-8") + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _stored_files(blobs: Path) -> set[str]:
    return {p.name for p in blobs.rglob("*") if p.is_file()}


def test_an_upload_that_ends_before_its_content_length_stores_nothing(server):
    base, key, blobs = server
    part = os.urandom(5000)
    before = _stored_files(blobs)
    answer = _raw(base, f"POST /api/v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                        f"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n", part,
                  half_close=True)
    status = answer.split(b"\r\n", 1)[0]
    assert b" 201 " not in status, answer[:500]
    if answer:  # the client went away; if it still reads, it is told why
        assert b" 400 " in status and b"incomplete-body" in answer, answer[:500]
    time.sleep(0.5)
    assert _stored_files(blobs) == before  # no blob, no temporary file left behind
    assert hashlib.sha256(part).hexdigest() not in _stored_files(blobs)
    # a whole upload still works
    r = requests.post(f"{base}/api/v1/blobs", data=part, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 201 and r.json() == {"sha256": hashlib.sha256(part).hexdigest(), "size": 5000}


def test_a_chunked_json_body_past_the_limit_is_refused_not_cut(server):
    base, key, _ = server

    def chunked(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    big = json.dumps({"title": "长" * 10_000}).encode()  # 30 KB against max_json_bytes = 8192
    r = requests.post(f"{base}/api/v1/documents", data=chunked(big), timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["type"] == "urn:egov:gateway:problem:too-large"
    # under the limit, chunked is read whole (and judged on its content)
    r = requests.post(f"{base}/api/v1/documents", data=chunked('{"title": "短"}'.encode()), timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["type"] == "urn:egov:gateway:problem:validation"


def test_the_access_log_never_holds_a_query_string(server):
    """A legacy system's callback carries its token in ?token= (it cannot send headers)."""
    base, _key, blobs = server
    log = blobs.parent.parent / "access.log"
    r = requests.post(f"{base}/api/v1/callbacks/nosuchadapter?token=SECRET-CALLBACK-TOKEN", data=b"<r/>", timeout=30)
    assert r.status_code == 404
    deadline = time.monotonic() + 10
    while b"/api/v1/callbacks/nosuchadapter" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_bytes()
    assert b"POST /api/v1/callbacks/nosuchadapter HTTP/1.1" in text
    assert b"SECRET-CALLBACK-TOKEN" not in text
