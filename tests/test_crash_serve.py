"""``gateway serve`` (gunicorn, its one worker process running the API, the delivery worker
and the collector) killed with SIGKILL while documents are being accepted; gunicorn's master
starts a new worker, as it does in production. Accepted means stored: every document answered
202 is there with its deliveries, outbox rows and audit entry, nothing is stored without its
audit entry, the audit chain verifies, and everything is delivered in the end. A document
whose 202 was lost with the process is the same document when posted again with its
Idempotency-Key."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from adapters.simulators.cluster import to_toml
from adapters.simulators.embedded import free_port
from adapters.simulators.exchange_box import ExchangeBox, ExchangeBoxServer
from gateway import audit, config as config_mod, migrate
from gateway.api.auth import create_key
from gateway.models import AuditEntry, Delivery, IdempotencyRecord, Message, OutboxEntry, ReceiptRecord
from gateway.node import Node
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, PREFECTURE

ROOT = Path(__file__).resolve().parent.parent


class Served:
    """A node run by ``gateway serve`` in its own process group, reached over HTTP."""

    def __init__(self, tmp_path: Path, database_url: str, adapters: dict[str, Any] | None = None,
                 routes: list[dict[str, Any]] | None = None) -> None:
        raw: dict[str, Any] = {
            "node": {"id": "prefecture", "name": "州人民政府办公室", "data_dir": str(tmp_path / "var"),
                     "units": [PREFECTURE]},
            "database": {"url": database_url},
            "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": 2, "poll_interval": 600,
                       "retry": {"max_attempts": 50, "base_delay": 0.01, "max_delay": 0.05}},
            "adapters": {"rec": {"type": "recording"}, **(adapters or {})},
            "routes": [{"units": [COUNTY_A], "adapter": "rec"}, *(routes or [])],
        }
        self.conf = tmp_path / "node.toml"
        self.conf.write_text(to_toml(raw), encoding="utf-8")
        cfg = config_mod.from_mapping(raw, source="test")
        migrate.upgrade(cfg.database_url())
        self.node = Node(cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {create_key(self.node.db, name='测试系统', scopes=['*'], clearance='绝密')}"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp_path / "serve.log"

    def start(self, crash: str | None = None, mark: Path | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GATEWAY_TEST_CRASH", None)
        if crash:
            env["GATEWAY_TEST_CRASH"], env["GATEWAY_TEST_CRASH_MARK"] = crash, str(mark)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.crashpoint", "-c", str(self.conf), "serve",
                                          "--bind", f"127.0.0.1:{self.port}", "--threads", "8"],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError("gateway serve did not become ready:\n" + self.log.read_text(errors="replace")[-3000:])

    def worker_pid(self) -> int:
        """The gunicorn worker: the one child of the master."""
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise AssertionError("gunicorn started no worker")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started: master and worker
            self.proc.wait(10)
        self.node.close()

    def document(self, title: str, unit: str = COUNTY_A) -> dict[str, Any]:
        r = requests.post(f"{self.url}/api/v1/blobs", data=f"{title} 正文".encode(), timeout=10,
                          headers={**self.headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
                "doc_number": "州政办发〔2026〕37号", "title": title, "urgency": "加急",
                "written_date": "2026年11月20日", "recipients": [{"unit": unit}],
                "body": {"sha256": r.json()["sha256"], "name": "正文.ofd", "media_type": "application/ofd"}}


@pytest.fixture
def served(tmp_path, database_url) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    s = Served(tmp_path, database_url)
    try:
        yield s
    finally:
        s.stop()


def test_a_document_posted_again_after_its_202_was_lost_in_a_crash_is_the_same_document(served, tmp_path):  # type: ignore[no-untyped-def]
    served.start(crash="accepted:1", mark=tmp_path / "killed")
    doc = served.document("应答前崩溃的公文")
    key = {**served.headers, "Idempotency-Key": f"crash-{uuid.uuid4()}"}
    with pytest.raises(requests.ConnectionError):  # stored, and the process died before answering
        requests.post(f"{served.url}/api/v1/documents", json=doc, headers=key, timeout=30)
    assert (tmp_path / "killed").exists()
    served.wait_ready()  # gunicorn's new worker
    r = requests.post(f"{served.url}/api/v1/documents", json=doc, headers=key, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers.get("Idempotent-Replayed") == "true"
    with served.node.db.sessions() as s:
        assert s.scalars(select(Message.id)).all() == [r.json()["id"]]
        assert s.scalars(select(IdempotencyRecord.message_id)).all() == [r.json()["id"]]


KILLS = 8
CLIENTS = 6


def test_documents_answered_202_survive_kills_of_the_serving_process_at_random_instants(served):  # type: ignore[no-untyped-def]
    served.start()
    docs = [served.document(f"随机崩溃测试{i}") for i in range(CLIENTS)]
    accepted: list[str] = []
    stop = threading.Event()

    def client(doc: dict[str, Any]) -> None:
        while not stop.is_set():
            try:
                r = requests.post(f"{served.url}/api/v1/documents", json=doc, headers=served.headers, timeout=30)
            except requests.RequestException:
                time.sleep(0.05)  # the process is gone: this one was not answered, so not accepted
                continue
            if r.status_code == 202:
                accepted.append(r.json()["id"])
            elif r.status_code != 503:
                raise AssertionError(r.text)

    threads = [threading.Thread(target=client, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            before = len(accepted)
            deadline = time.monotonic() + 30
            want = random.randint(10, 60)
            while len(accepted) < before + want and time.monotonic() < deadline:
                time.sleep(0.002)
            assert len(accepted) > before, "no document was accepted between two kills"
            time.sleep(random.uniform(0, 0.05))
            os.kill(served.worker_pid(), signal.SIGKILL)  # mid-stream: groups being written and committed
            time.sleep(0.2)
            served.wait_ready()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    ids = set(accepted)
    with served.node.db.sessions() as s:
        assert len(set(s.scalars(select(Message.id).where(Message.id.in_(ids))))) == len(ids), "accepted, then lost"
        stored = s.scalar(select(func.count()).select_from(Message))
        audited = s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "message.accept"))
        deliveries = s.scalar(select(func.count()).select_from(Delivery))
        outbox = s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.kind == "deliver"))
        assert stored == audited == deliveries == outbox >= len(ids)  # nothing stored without the rest
        result = audit.verify(s)
        assert result.ok, result.problem
    deadline = time.monotonic() + 60  # and all of it delivered, rows of a killed worker included
    while True:
        with served.node.db.sessions() as s:
            left = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.status != "delivered"))
        if left == 0:
            break
        assert time.monotonic() < deadline, f"{left} copies not delivered"
        time.sleep(0.2)


BOX_DOCS = 12


def test_exchange_box_receipts_pushed_while_the_serving_process_is_killed_are_applied_once(tmp_path,
                                                                                          database_url):  # type: ignore[no-untyped-def]
    """Documents to the exchange box (HTTP mode, the box in the test's process): the box
    answers ARRIVE, signs each a moment later and POSTs the SIGN receipt to the gateway's
    callback, trying again while it gets no answer. The serving process is killed once right
    after it stored a pushed receipt and before it answered (the box sends it again), and at
    random instants while documents go out and receipts come in. At the end each document is
    at the box once and signed, with one receipt applied each."""
    port = free_port()
    box = ExchangeBoxServer(ExchangeBox(callback_url=f"http://127.0.0.1:{port}/api/v1/callbacks/box", auto_sign=True,
                                        auto_sign_delay=0.2, callback_attempts=12, callback_backoff=0.1)).start()
    served = Served(tmp_path, database_url, adapters={"box": {"type": "xml-exchange", "mode": "http",
                                                              "address": box.url, "timeout": 5}},
                    routes=[{"units": [CITY_B], "adapter": "box"}])
    served.port, served.url = port, f"http://127.0.0.1:{port}"
    try:
        served.start(crash="ingested:1", mark=tmp_path / "killed")
        docs = [served.document(f"交换箱崩溃测试{i}", unit=CITY_B) for i in range(BOX_DOCS)]
        ids = []
        for i, doc in enumerate(docs):
            # the crash point may kill the server while this POST is in flight (a receipt is
            # pushed meanwhile): as a calling system does, send it again with its key
            headers = {**served.headers, "Idempotency-Key": f"box-crash-{i}"}
            for attempt in range(3):
                try:
                    r = requests.post(f"{served.url}/api/v1/documents", json=doc, headers=headers, timeout=30)
                    break
                except requests.ConnectionError:
                    assert attempt < 2 and (tmp_path / "killed").exists(), "the server went away unasked"
                    served.wait_ready()
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            if i in (4, 8):
                time.sleep(random.uniform(0.1, 0.6))
                os.kill(served.worker_pid(), signal.SIGKILL)
                time.sleep(0.2)
                served.wait_ready()
        deadline = time.monotonic() + 90
        while True:
            if (tmp_path / "killed").exists():
                served.wait_ready()
            with served.node.db.sessions() as s:
                left = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.message_id.in_(ids),
                                                                                 Delivery.status != "signed"))
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} copies not signed; box: {box.state.counters}"
            time.sleep(0.2)
        assert (tmp_path / "killed").exists(), "the crash point was not reached"
        assert len(box.state.archives) == BOX_DOCS
        with served.node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == BOX_DOCS
            result = audit.verify(s)
            assert result.ok, result.problem
    finally:
        served.stop()
        box.stop()
