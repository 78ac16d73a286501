"""Fault tests through the whole path against the SOAP peer over real HTTP: the service down
and back, and the delivery worker killed with SIGKILL mid-batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomllib  # noqa: F401 - the config written below is TOML
from sqlalchemy import func, select

from gateway import migrate
from gateway.models import Delivery, OutboxEntry
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import COUNTY_A, PREFECTURE, Api, node_config

N = 40


def _soap_node(tmp_path, database_url, service, **worker):  # type: ignore[no-untyped-def]
    cfg = node_config(tmp_path, database_url,
                      adapters={"docexchange": {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl",
                                                "address": service.url, "timeout": 5}},
                      routes=[{"units": [COUNTY_A], "adapter": "docexchange"}],
                      worker={"threads": 4, "idle_sleep": 0.05, "lease_seconds": 3,
                              "retry": {"max_attempts": 50, "base_delay": 0.05, "max_delay": 0.3}, **worker})
    migrate.upgrade(cfg.database_url())
    return cfg


def _accept(api: Api, n: int) -> list[str]:
    return [api.post("/api/v1/documents", json=api.document(title=f"测试公文{i}")).get_json()["id"]
            for i in range(n)]


def _statuses(node: Node) -> dict[str, int]:
    with node.db.sessions() as s:
        return dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())


def _wait(pred, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_soap_service_down_then_back_delivers_everything_once(tmp_path, database_url, soap_service):
    cfg = _soap_node(tmp_path, database_url, soap_service)
    node = Node(cfg)
    api = Api(node)
    soap_service.stop()
    ids = _accept(api, N)
    worker = Worker(node)
    worker.start()
    try:
        assert _wait(lambda: _attempted_all(node), 30)
        assert _statuses(node) == {"queued": N}  # nothing lost, nothing given up yet
        soap_service.start()
        assert _wait(lambda: _statuses(node) == {"delivered": N}, 60), _statuses(node)
    finally:
        worker.stop()
        node.close()
    assert soap_service.state.documents == N  # each effect once at the receiver
    got = {d.doc_id for d in soap_service.state.all_documents()}
    assert len(got) == len(ids)


def _attempted_all(node: Node) -> bool:
    with node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.attempts == 0)) == 0


def test_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(tmp_path, database_url, soap_service_factory):
    from adapters.simulators.soap_service import DocExchangeState

    service = soap_service_factory(DocExchangeState(response_delay=0.05))
    cfg = _soap_node(tmp_path, database_url, service)
    node = Node(cfg)
    api = Api(node)
    _accept(api, N)
    conf = tmp_path / "node.toml"
    conf.write_text(_toml(cfg), encoding="utf-8")
    cmd = [sys.executable, "-m", "gateway.cli", "--config", str(conf), "worker"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: service.state.send_calls >= 8, 30), "the worker never started delivering"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        mid = _statuses(node)
        assert mid.get("queued", 0) > 0, f"the kill came too late to be mid-batch: {mid}"
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert _wait(lambda: _statuses(node) == {"delivered": N}, 60), _statuses(node)
    finally:
        proc.kill()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
        node.close()
    assert service.state.documents == N, out[-2000:]  # delivered == accepted, no duplicate effect


def _toml(cfg) -> str:  # type: ignore[no-untyped-def]
    """The test node's configuration as a TOML file for the worker subprocess."""
    a = cfg.adapters["docexchange"]
    w = cfg.worker
    return f'''
[node]
id = "{cfg.node.id}"
units = ["{PREFECTURE}"]
data_dir = "{cfg.data_dir}"
[database]
url = "{cfg.database_url()}"
[worker]
threads = {w.threads}
idle_sleep = {w.idle_sleep}
lease_seconds = {w.lease_seconds}
poll_interval = 600
[worker.retry]
max_attempts = {w.retry.max_attempts}
base_delay = {w.retry.base_delay}
max_delay = {w.retry.max_delay}
[adapters.docexchange]
type = "soap"
wsdl = "{Path(a['wsdl']).resolve() if Path(a['wsdl']).is_absolute() else (Path(__file__).resolve().parent.parent / a['wsdl'])}"
address = "{a['address']}"
timeout = 5
[[routes]]
units = ["{COUNTY_A}"]
adapter = "docexchange"
'''


def test_a_document_with_attachments_is_refused_for_a_soap_unit_unless_the_operator_lets_it_go_without(
        tmp_path, database_url, soap_service):
    """SendDocument carries the body only (legacy README §1): a document with 附件 to a unit
    behind it is refused, naming the units, rather than delivered without them unannounced.
    With attachments = "omit" the operator lets the body go alone; a bad value stops the start."""
    import pytest

    from gateway.config import ConfigError

    cfg = _soap_node(tmp_path, database_url, soap_service)
    node = Node(cfg)
    try:
        api = Api(node)
        att = api.upload("附件一 值班表".encode())
        doc = api.document(attachments=[{"sha256": att, "name": "附件1.pdf", "media_type": "application/pdf"}])
        r = api.post("/api/v1/documents", json=doc)
        assert r.status_code == 422, r.get_json()
        problem = r.get_json()
        assert problem["type"] == "urn:egov:gateway:problem:attachments-not-carried"
        assert COUNTY_A in problem["detail"] and "docexchange" in problem["detail"]
        assert problem["errors"][0]["field"] == "attachments"
        with node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Delivery)) == 0
        # a document without 附件 still goes
        assert api.post("/api/v1/documents", json=api.document()).status_code == 202
    finally:
        node.close()
    cfg = node_config(tmp_path, database_url,
                      adapters={"docexchange": {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl",
                                                "address": soap_service.url, "timeout": 5, "attachments": "omit"}},
                      routes=[{"units": [COUNTY_A], "adapter": "docexchange"}])
    node = Node(cfg)
    try:
        node.check_adapters()
        api = Api(node)
        att = api.upload("附件一 值班表".encode())
        doc = api.document(attachments=[{"sha256": att, "name": "附件1.pdf", "media_type": "application/pdf"}])
        mid = api.post("/api/v1/documents", json=doc).get_json()["id"]
        Worker(node).drain()
        got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
        assert got["status"] == "delivered", got
    finally:
        node.close()
    bad = node_config(tmp_path, database_url,
                      adapters={"docexchange": {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl",
                                                "address": soap_service.url, "attachments": "drop"},
                                "rec": {"type": "recording", "attachments": "omit"}})
    node = Node(bad)
    try:
        with pytest.raises(ConfigError, match=r"adapters.docexchange.attachments: 'drop'; expected \"refuse\""):
            node.check_adapters()
    finally:
        node.close()
