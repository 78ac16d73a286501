"""``gateway worker --once`` killed with SIGKILL at chosen instants (tests/crashpoint.py), then
run again, against a real OpenSSH SFTP drop and the exchange box's shared folder: whatever the
instant, every document reaches the legacy inbox once and complete, and every file the legacy
side writes is taken once, with its effect applied once, and ends where its outcome says
(``archive/`` when taken, ``failed/`` beside a note when refused)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from adapters.simulators.cluster import to_toml
from adapters.simulators.exchange_box import FolderClerk
from adapters.simulators.sftp_server import LegacySftpClerk
from gateway import audit, config as config_mod, migrate
from gateway.models import AuditEntry, Delivery, IngestedItem, Message, OutboxEntry, ReceiptRecord
from gateway.node import Node
from tests.plugins.gatewaynode import CITY_B, PREFECTURE, Api

ROOT = Path(__file__).resolve().parent.parent
DUTY = (Path(__file__).parent / "data" / "ZB_1152230107CTPD8U2P_20261126145210.xml").read_bytes()
#: the lease of a claimed outbox row: a killed run's rows are due again after it
LEASE = 1.0


def _node(tmp_path: Path, database_url: str, adapter: dict[str, Any]) -> tuple[Node, Path]:
    """A node whose documents to CITY_B go to ``adapter`` (named ``legacy``), its duty
    reports to PREFECTURE; and its configuration as a file for the command line."""
    raw: dict[str, Any] = {
        "node": {"id": "prefecture", "name": "州人民政府办公室", "data_dir": str(tmp_path / "var"),
                 "units": [PREFECTURE]},
        "database": {"url": database_url},
        "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": LEASE, "poll_interval": 600,
                   "retry": {"max_attempts": 50, "base_delay": 0.01, "max_delay": 0.05}},
        "adapters": {"legacy": adapter, "rec": {"type": "recording"}},
        "routes": [{"units": [CITY_B], "adapter": "legacy"}, {"units": [PREFECTURE], "adapter": "rec"}],
    }
    conf = tmp_path / "node.toml"
    conf.write_text(to_toml(raw), encoding="utf-8")
    cfg = config_mod.from_mapping(raw, source="test")
    migrate.upgrade(cfg.database_url())
    return Node(cfg), conf


def _once(conf: Path, crash: str | None = None) -> int:
    """``gateway --config conf worker --once``, killed at ``crash`` (POINT:N) if it gets there;
    its exit status (-9: killed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GATEWAY_TEST_CRASH", None)
    if crash:
        env["GATEWAY_TEST_CRASH"] = crash
    r = subprocess.run([sys.executable, "-m", "tests.crashpoint", "--config", str(conf), "worker", "--once"],
                       cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert r.returncode in (0, -9), r.stdout.decode(errors="replace")[-3000:] + r.stderr.decode(errors="replace")[-3000:]
    if r.returncode == -9:
        time.sleep(LEASE + 0.2)  # what it had claimed is due again
    return r.returncode


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _drop(endpoint, tmp_path: Path, database_url: str) -> tuple[Node, Path, Path]:  # type: ignore[no-untyped-def]
    sub = f"drop-{uuid.uuid4().hex[:8]}"
    node, conf = _node(tmp_path, database_url, endpoint.adapter_config(sub, units=[CITY_B], duty_report_to=PREFECTURE))
    return node, conf, endpoint.data_root / sub


@pytest.fixture
def drop(openssh_server, tmp_path, database_url):  # type: ignore[no-untyped-def]
    node, conf, root = _drop(openssh_server, tmp_path, database_url)
    yield node, conf, root
    node.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def box_folder(tmp_path, database_url):  # type: ignore[no-untyped-def]
    root = tmp_path / "box"
    root.mkdir()
    node, conf = _node(tmp_path, database_url, {"type": "xml-exchange", "mode": "folder", "folder": str(root)})
    yield node, conf, root
    node.close()


def _refused_again(node: Node, conf: Path, unit_root: Path) -> None:
    """A receipt that matches no copy is refused: recorded as refused, then moved to
    ``failed/`` beside a note. Killed in between, the next run finds it recorded: it must go
    to ``failed/`` all the same, not to ``archive/`` as if it had been taken."""
    stray = str(uuid.uuid4())
    FolderClerk(unit_root).sign(stray, CITY_B)
    name = f"HZ_{stray}_{CITY_B}.xml"
    assert _once(conf, "reject:1") == -9
    assert name in _names(unit_root / "outbox")  # recorded as refused, not moved yet
    assert _once(conf) == 0
    assert _names(unit_root / "outbox") == []
    assert name not in _names(unit_root / "archive")
    assert {name, f"{name}.ok", f"{name}.error"} <= set(_names(unit_root / "failed"))
    with node.db.sessions() as s:
        assert s.scalars(select(IngestedItem.outcome)).all() == ["rejected"]
        assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == 0


def test_a_refused_receipt_on_the_sftp_drop_killed_before_its_move_is_refused_again(drop):  # type: ignore[no-untyped-def]
    node, conf, root = drop
    _refused_again(node, conf, root / CITY_B)


def test_a_refused_receipt_in_the_box_folder_killed_before_its_move_is_refused_again(box_folder):  # type: ignore[no-untyped-def]
    node, conf, root = box_folder
    _refused_again(node, conf, root)


def test_worker_once_killed_mid_delivery_delivers_on_the_next_run(drop):  # type: ignore[no-untyped-def]
    """``gateway worker --once`` (run from cron, say) killed after the adapter calls and before
    their outcomes are recorded: the next run delivers those rows once their lease is over,
    though no long-running worker is there to take them back."""
    node, conf, root = drop
    LegacySftpClerk(root, units=[CITY_B]).clerk(CITY_B)
    api = Api(node)
    ids = [api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,), title=f"测试公文{i}"))
           .get_json()["id"] for i in range(3)]
    assert _once(conf, "record:1") == -9
    assert _once(conf) == 0
    with node.db.sessions() as s:
        statuses = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
    assert statuses == {"delivered": len(ids)}
    inbox = _names(root / CITY_B / "inbox")
    assert len([n for n in inbox if n.endswith(".xml")]) == len(ids) and not [n for n in inbox if n.endswith(".part")]


#: where each run dies, in turn (POINT:N, see tests/crashpoint.py); each run has a new
#: document to deliver and the receipt of the one before to collect, so each point is reached
KILLS = ["record:1", "sftp-upload:1", "sftp-rename:1", "ack:1", "sftp-rename:2", "reject:1", "sftp-rename:3",
         "record:1"]


# The two tortures take 20-30 s each: each runs on one database (the SFTP drop on SQLite, the
# embedded default; the SOAP service on PostgreSQL), where the kill storm of test_crash_serve
# and the short tests above run on both.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sftp_drop_torture_every_document_and_every_legacy_file_once(drop):  # type: ignore[no-untyped-def]
    """Documents out, receipts and duty reports in, over a real OpenSSH server, with the worker
    killed at each instant of KILLS in turn (one run per kill; before each, a new document is
    accepted and the legacy clerk takes its inbox and signs for what it took): at the end every
    document lies in the legacy archive once, complete, and is signed for once; every duty
    report is one message; every file of the legacy outbox was moved out of it, to archive/
    or (a stray receipt) to failed/; the audit chain verifies."""
    node, conf, root = drop
    clerk = LegacySftpClerk(root, units=[CITY_B])
    folder = clerk.clerk(CITY_B)
    api = Api(node)
    docs: list[str] = []
    stray = str(uuid.uuid4())
    reports = killed = 0
    for i, crash in enumerate([*KILLS, None, None]):
        for taken in clerk.take_inbox():
            clerk.sign(taken.ref, taken.unit, signer="周某")
        if crash == "reject:1":
            folder.sign(stray, CITY_B)  # a receipt for nothing this node sent: refused
        if crash is not None:
            docs.append(api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,), title=f"测试公文{i}"))
                        .get_json()["id"])
        if i % 4 == 0:  # a duty report now and then
            name = f"ZB_{CITY_B}_2026112614{i:02d}10.xml"
            (root / CITY_B / "outbox" / name).write_bytes(DUTY.replace(b"1152230107CTPD8U2P", CITY_B.encode()))
            (root / CITY_B / "outbox" / f"{name}.ok").write_bytes(b"")
            reports += 1
        killed += _once(conf, crash) == -9
    assert killed == len(KILLS), f"only {killed} of {len(KILLS)} runs were killed: crash points not reached"
    outbox = root / CITY_B / "outbox"
    assert [n for n in _names(outbox) if not n.endswith(".ok")] == []  # an orphan .ok may stay
    archive = _names(root / CITY_B / "archive")
    assert len([n for n in archive if n.startswith("GW_") and n.endswith(".xml")]) == len(docs)
    assert len(clerk.taken) == len(docs)  # each document reached the legacy side once
    assert not [n for n in _names(root / CITY_B / "inbox") if not n.endswith(".ok")]
    assert len([n for n in archive if n.startswith("HZ_") and n.endswith(".xml")]) == len(docs)
    assert len([n for n in archive if n.startswith("ZB_") and n.endswith(".xml")]) == reports
    assert f"HZ_{stray}_{CITY_B}.xml" in _names(root / CITY_B / "failed")
    with node.db.sessions() as s:
        statuses = dict(s.execute(select(Delivery.status, func.count()).where(Delivery.message_id.in_(docs))
                                  .group_by(Delivery.status)).all())
        assert statuses == {"signed": len(docs)}
        assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == len(docs)
        assert s.scalar(select(func.count()).select_from(Message).where(Message.subsystem == "duty")) == reports
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "receipt.accept")) == len(docs)
        assert s.scalar(select(func.count()).select_from(OutboxEntry).where(
            OutboxEntry.state.in_(("pending", "claimed")), OutboxEntry.kind == "deliver")) == 0
        result = audit.verify(s)
        assert result.ok, result.problem


#: the SOAP service: each run has a new document to send and the receipts of those signed
#: before to fetch (FetchReceipts) and acknowledge (the cursor)
SOAP_KILLS = ["record:1", "ack:1", "ack:2", "record:1", "ack:3"]


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_soap_torture_every_document_sent_once_and_every_receipt_applied_once(soap_service, tmp_path,
                                                                              database_url):  # type: ignore[no-untyped-def]
    """The document exchange service (SOAP over real HTTP, in the test's process): the worker
    killed after its SendDocument calls and before recording them, or after storing a fetched
    receipt and before moving the cursor past it. At the end each document was sent once (the
    service deduplicates by doc_id: one effect), each is signed, and each receipt was applied
    once."""
    node, conf = _node(tmp_path, database_url, {"type": "soap", "wsdl": str(ROOT / "schemas/legacy/docexchange.wsdl"),
                                                "address": soap_service.url, "timeout": 5})
    state = soap_service.state
    try:
        api = Api(node)
        docs: list[str] = []
        killed = 0
        for i, crash in enumerate([*SOAP_KILLS, None, None]):
            for d in state.all_documents():
                if d.status == "RECEIVED":
                    state.sign(d.doc_id, "周某")
            if crash is not None:
                docs.append(api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,), title=f"公文{i}"))
                            .get_json()["id"])
            killed += _once(conf, crash) == -9
        assert killed == len(SOAP_KILLS), f"only {killed} of {len(SOAP_KILLS)} runs were killed"
        assert state.documents == len(docs) and len(state.receipts()) == len(docs)
        with node.db.sessions() as s:
            statuses = dict(s.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            assert statuses == {"signed": len(docs)}
            assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == len(docs)
            assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.action == "receipt.accept")) == len(docs)
            result = audit.verify(s)
            assert result.ok, result.problem
    finally:
        node.close()

