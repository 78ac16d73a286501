"""``gateway serve`` on its embedded default, as the README runs it: gunicorn, the simulated
legacy systems, the worker and the collector; a document reaches all three and is signed for."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests

from tests.plugins.gatewaynode import CITY_B, COUNTY_A, EMERGENCY, PREFECTURE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_embedded_default_end_to_end(tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--bind", f"127.0.0.1:{port}"],
                            cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or still starting
                time.sleep(0.3)
        key_file = tmp_path / "var" / "bootstrap-api-key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        # the data folder (database, blobs, node key) is the service user's alone
        assert oct((tmp_path / "var").stat().st_mode & 0o777) == "0o700"
        key = key_file.read_text().strip()
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"
        sha = http.post(f"{base}/api/v1/blobs", data="正文".encode() * 1000,
                        headers={"Content-Type": "application/octet-stream"}).json()["sha256"]
        doc = {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
               "doc_number": "州政办发〔2026〕40号", "title": "测试通知", "written_date": "2026-11-26",
               "recipients": [{"unit": u} for u in (COUNTY_A, CITY_B, EMERGENCY)],
               "body": {"sha256": sha, "name": "正文.ofd"}}
        r = http.post(f"{base}/api/v1/documents", json=doc)
        assert r.status_code == 202, r.text
        mid = r.json()["id"]
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline + 30:
            got = http.get(f"{base}/api/v1/documents/{mid}").json()
            statuses = {x["unit"]: x["status"] for x in got["recipients"]}
            if statuses == {COUNTY_A: "signed", CITY_B: "signed", EMERGENCY: "signed"}:
                break
            time.sleep(0.5)
        assert statuses == {COUNTY_A: "signed", CITY_B: "signed", EMERGENCY: "signed"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert key not in out  # the key is written to its file, never to the console
    assert "Traceback" not in out, out[-3000:]
