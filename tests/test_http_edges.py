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


def _status(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def _document(key: str) -> bytes:
    return json.dumps({"message_id": "edge-cut-short-0001", "sender_unit": "11522300GDR9YB9550",
                       "issuer": "州人民政府办公室", "doc_type": "通知", "doc_number": "州政办发〔2026〕9号",
                       "title": "截断测试", "written_date": "2026-11-28",
                       "recipients": [{"unit": "1152230107CTPD8U2P"}],
                       "body": {"sha256": "0" * 64, "name": "正文.ofd"}}, ensure_ascii=False).encode()


def test_a_document_that_ends_before_its_content_length_is_refused_not_stored(server):
    """gunicorn hands the application whatever came before the connection ended; a JSON
    document missing only what its Content-Length promised after it would still parse."""
    base, key, _ = server
    body = _document(key)
    answer = _raw(base, f"POST /api/v1/documents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body) + 10}\r\n\r\n", body,
                  half_close=True)
    assert b" 400 " in _status(answer) and b"incomplete-body" in answer, answer[:600]
    assert f"ended after {len(body)} of its {len(body) + 10} bytes".encode() in answer
    r = requests.get(f"{base}/api/v1/documents/edge-cut-short-0001", headers={"Authorization": f"Bearer {key}"},
                     timeout=30)
    assert r.status_code == 404


@pytest.mark.parametrize("chunks", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\nabXX0\r\n\r\n"])
def test_a_malformed_chunked_body_is_a_400_not_a_500(server, chunks):
    base, key, _ = server
    for path, ctype in (("/api/v1/documents", "application/json"), ("/api/v1/blobs", "application/octet-stream"),
                        ("/federation/v1/messages", "application/json")):
        answer = _raw(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                            f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n", chunks,
                      half_close=True)
        assert b" 400 " in _status(answer) and b"malformed-request" in answer, (path, answer[:600])
        assert answer.count(b"HTTP/1.1 ") == 1, answer


@pytest.mark.parametrize(("headers", "status", "kind"), [
    ("Content-Encoding: gzip\r\nContent-Length: 4\r\n", 415, "unsupported-coding"),
    ("Transfer-Encoding: gzip, chunked\r\n", 501, "unsupported-coding"),
])
def test_a_coding_the_gateway_does_not_decode_is_refused_not_stored_as_it_came(server, headers, status, kind):
    """A compressed upload stored undecoded would be hashed and delivered compressed."""
    base, key, blobs = server
    before = _stored_files(blobs)
    body = b"xxxx" if "Content-Length" in headers else b"4\r\nxxxx\r\n0\r\n\r\n"
    answer = _raw(base, f"POST /api/v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                        f"Content-Type: application/octet-stream\r\n{headers}\r\n", body, half_close=True)
    assert f" {status} ".encode() in _status(answer) and kind.encode() in answer, answer[:600]
    assert _stored_files(blobs) == before


def test_the_access_log_cannot_be_forged_through_the_path(server):
    """A %0A in the path would start a line of the attacker's own; %1B would reach a terminal."""
    base, key, blobs = server
    log = blobs.parent.parent / "access.log"
    forged = '127.0.0.1 - - [28/Nov/2026:09:07:00 +0000] "POST /api/v1/documents HTTP/1.1" 202 999'
    r = requests.get(f"{base}/api/v1/documents/x%0A{requests.utils.quote(forged)}%1B%5B2J公文",
                     headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "urn:egov:gateway:problem:validation"
    deadline = time.monotonic() + 10
    while b"%1B" not in log.read_bytes() and b"\\x1b" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text(encoding="utf-8").splitlines()
    assert not any(line.startswith(forged) for line in lines)
    line = next(line for line in lines if "/api/v1/documents/x" in line)
    assert "\\n127.0.0.1" in line and "\\x1b[2J公文" in line and "\x1b" not in line, line
    # the user name of a Basic header is logged too (%(u)s): escaped the same way
    import base64

    basic = base64.b64encode(f"evil\n{forged}:pw".encode()).decode()
    requests.get(f"{base}/healthz?basic", headers={"Authorization": f"Basic {basic}"}, timeout=30)
    deadline = time.monotonic() + 10
    while b"evil" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text(encoding="utf-8").splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("evil\\n127.0.0.1" in line for line in lines), lines[-3:]


def test_an_answer_given_before_a_malformed_body_is_the_only_answer(server):
    """The blobs endpoint refuses a wrong Content-Type without reading the body; the body,
    which gunicorn cannot frame, then ends the connection rather than earning a second answer."""
    base, key, _ = server
    answer = _raw(base, f"POST /api/v1/blobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                        f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                  b"zz\r\n{}\r\n0\r\n\r\n", half_close=True)
    assert b" 415 " in _status(answer) and answer.count(b"HTTP/1.1 ") == 1, answer


def test_a_path_that_is_not_utf8_is_refused(server):
    """gunicorn hands the path's bytes over as they came (werkzeug would make U+FFFD of them)."""
    base, key, _ = server
    r = requests.get(f"{base}/api/v1/documents/%FF%FE", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 400 and "not UTF-8" in r.json()["detail"], r.text
    r = requests.get(f"{base}/api/v1/documents/%E5%85%AC%E6%96%87", headers={"Authorization": f"Bearer {key}"},
                     timeout=30)
    assert r.status_code == 404  # UTF-8 (公文) is a path like any other
