"""A county's line to the prefecture down for days, and a node restored from a backup.

* A peer node that does not answer holds its rows: they wait in the queue, untried and not
  counted against ``max_attempts`` (a week-long outage must not dead-letter what should simply
  wait), and one request now and then finds out whether it is back (in process, both
  databases; the peer is a port nobody listens on).
* County A switched off while the prefecture keeps accepting documents for it (some 特急,
  some with 附件, some recalled meanwhile): when it is back, every copy arrives once, the
  特急 ones first, the recalled ones never, and every 签收 comes back (three nodes as
  processes, the county stopped and started again).
* A node restored from a backup hands out outbox ids again: the batch items it sends under a
  ``seq`` its peer has seen are applied, not answered ``duplicate`` and lost (in process, both
  databases).
* The SQLite backup docs/operating.md gives, taken while the node accepts documents, restores
  to a node whose audit log verifies and whose messages' content is all there.
"""
from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from adapters.simulators.cluster import COUNTY_A as CLUSTER_COUNTY_A
from adapters.simulators.cluster import PREFECTURE as CLUSTER_PREFECTURE
from adapters.simulators.cluster import Cluster
from gateway import audit, migrate
from gateway.envelope import Envelope
from gateway.models import AuditEntry, Delivery, Message, OutboxEntry
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import COUNTY_A, Api, RecordingAdapter, node_config
from tests.test_federation import rows, send, statuses
from tests.test_federation_attacks import Prefecture, forward


@pytest.fixture
def pref(tmp_path: Path, database_url: str) -> Iterator[Prefecture]:
    RecordingAdapter.instances.clear()
    # its peers' url: a port nobody listens on; county A is asked again after 5 s, then 10 s …
    p = Prefecture(tmp_path, database_url, retry={"base_delay": 5.0, "max_delay": 60.0})
    yield p
    p.node.close()


def _count(p: Prefecture, outcome: str) -> int:
    with p.node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.outcome == outcome)) or 0


def _outbox(p: Prefecture, kind: str) -> list[OutboxEntry]:
    with p.node.db.sessions() as s:
        return list(s.scalars(select(OutboxEntry).where(OutboxEntry.kind == kind).order_by(OutboxEntry.id)))


def test_rows_for_a_node_that_does_not_answer_wait_untried_instead_of_failing(pref: Prefecture) -> None:
    """Twenty documents for county A while it cannot be reached, with retries that would
    dead-letter a row after three attempts: the first request finds it away, the node is
    held, the other rows are not tried, and none of them uses up its retries or fails,
    however often the worker comes round."""
    api = Api(pref.node)
    mids = []
    for i in range(20):
        r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A,), title=f"断网期间{i}"))
        assert r.status_code == 202, r.get_json()
        mids.append(r.get_json()["id"])
    worker = Worker(pref.node)
    worker.drain(timeout=5)
    # one request (one claim's group of forwards) found the node away; the rest were not tried
    assert 1 <= _count(pref, "waiting") <= worker.threads
    worker.drain(timeout=5)  # held: nothing is tried
    assert 1 <= _count(pref, "waiting") <= worker.threads
    for _ in range(5):  # the link stays down while the worker is restarted again and again:
        Worker(pref.node).drain(timeout=5)  # each new one asks the node once
    forwards = _outbox(pref, "forward")
    assert len(forwards) == 20
    assert {f.state for f in forwards} == {"pending"} and {f.attempts for f in forwards} == {0}
    assert _count(pref, "dead-letter") == 0
    with pref.node.db.sessions() as s:
        assert set(s.scalars(select(Delivery.status).where(Delivery.message_id.in_(mids)))) == {"queued"}
    # the copy says why it waits
    got = api.get(f"/api/v1/documents/{mids[0]}").get_json()["recipients"][0]
    assert got["status"] == "queued" and "county-a" in (got["last_error"] or "")


def test_a_restored_sender_s_items_under_seqs_seen_before_are_applied(pref: Prefecture) -> None:
    """County A sends a batch item with seq 7; then county A is restored from a backup taken
    before, and its outbox hands out id 7 again, for another document. The prefecture applies
    that one too, and still answers the first one, sent again, as a duplicate."""
    before = forward(COUNTY_A, "county-a", ["county-a"], title="备份之前")
    after = forward(COUNTY_A, "county-a", ["county-a"], title="恢复之后")
    r = pref.post("county-a", "/batch", {"items": [{"seq": 7, "kind": "forward", **before}]})
    assert [x["outcome"] for x in r.get_json()["results"]] == ["ok"], r.get_json()
    r = pref.post("county-a", "/batch", {"items": [{"seq": 7, "kind": "forward", **after}]})
    assert [x["outcome"] for x in r.get_json()["results"]] == ["ok"], r.get_json()
    assert set(pref.messages()) == {before["message_id"], after["message_id"]}
    r = pref.post("county-a", "/batch", {"items": [{"seq": 7, "kind": "forward", **before}]})
    assert [x["outcome"] for x in r.get_json()["results"]] == ["duplicate"], r.get_json()
    # a forward sent again with fewer units (one recalled meanwhile) is the same item
    again = {**after, "blobs": {}}
    r = pref.post("county-a", "/batch", {"items": [{"seq": 7, "kind": "forward", **again}]})
    assert [x["outcome"] for x in r.get_json()["results"]] == ["duplicate"], r.get_json()


def _documented_sqlite_backup(target: Path) -> str:
    """The SQL of the SQLite backup command in docs/operating.md, writing to ``target``."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "operating.md").read_text(encoding="utf-8")
    m = re.search(r"""^sqlite3 \S+ "(VACUUM INTO '[^']+')"$""", docs, re.MULTILINE)
    assert m, "docs/operating.md: no sqlite3 … \"VACUUM INTO '…'\" backup command"
    return re.sub(r"'[^']+'", f"'{target}'", m.group(1))


def test_the_documented_sqlite_backup_of_a_busy_node_restores_whole(tmp_path: Path) -> None:
    live = tmp_path / "live"
    cfg = node_config(live, f"sqlite:///{live}/var/gateway.db")
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    api = Api(node)
    stop, accepted = threading.Event(), []

    def busy() -> None:  # callers keep sending while the backup is taken
        while not stop.is_set():
            r = api.post("/api/v1/documents", json=api.document(title=f"备份期间{len(accepted)}"))
            assert r.status_code == 202, r.get_json()
            accepted.append(r.get_json()["id"])

    def until(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(accepted) < count:
            assert sender.is_alive() and time.monotonic() < deadline, "the sender stopped"
            time.sleep(0.05)

    sender = threading.Thread(target=busy)
    sender.start()
    try:
        until(20)
        backup = tmp_path / "backup"
        backup.mkdir()
        with sqlite3.connect(live / "var" / "gateway.db") as conn:
            conn.execute(_documented_sqlite_backup(backup / "gateway.db"))
        taken = len(accepted)
        # then the data folder, as the tar of docs/operating.md does
        shutil.copytree(live / "var", backup / "data", ignore=shutil.ignore_patterns("gateway.db*", "tmp"))
        until(taken + 10)  # accepted after the backup: lost by the restore
    finally:
        stop.set()
        sender.join()
        node.close()
    # restore onto a fresh data folder
    restored = tmp_path / "restored" / "var"
    shutil.copytree(backup / "data", restored)
    shutil.copy(backup / "gateway.db", restored / "gateway.db")
    cfg = node_config(tmp_path / "restored", f"sqlite:///{restored}/gateway.db")
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        with node.db.sessions() as s:
            assert audit.verify(s).ok
            envelopes = list(s.scalars(select(Message.envelope_xml)))
        assert taken - 1 <= len(envelopes) < len(accepted)
        for xml in envelopes:
            for part in Envelope.from_xml(xml, validate=False).attachments:
                assert node.blobs.size(part.sha256) > 0
    finally:
        node.close()


# -- three nodes: county A switched off for "a week" -------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # the shape of the default retries (doubling up to max_delay, max_attempts 10), a thousand
    # times faster: without holding, every forward was dead-lettered within a second or two
    retry = {"max_attempts": 10, "base_delay": 0.02, "max_delay": 0.5}
    c = Cluster(tmp_path_factory.mktemp("outage"),
                overrides={n: {"worker": {"retry": retry, "threads": 4}} for n in ("prefecture", "county-a")})
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_a_county_switched_off_gets_its_backlog_once_urgent_first_when_it_is_back(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    s = pref.session()
    attachment = s.post(f"{pref.url}/api/v1/blobs", data="附件 统计表".encode() * 500,
                        headers={"Content-Type": "application/octet-stream"}).json()["sha256"]
    cluster.stop_node("county-a")
    urgency = {}
    recalled = []
    for i in range(48):
        level = "特急" if i % 8 == 7 else ("加急" if i % 3 == 0 else None)
        extra: dict[str, object] = {"urgency": level} if level else {}
        if i % 5 == 0:
            extra["attachments"] = [{"sha256": attachment, "name": "附件1.pdf", "media_type": "application/pdf"}]
        mid = send(pref, CLUSTER_PREFECTURE, (CLUSTER_COUNTY_A,), title=f"断网积压{i}", **extra)
        urgency[mid] = level
        if i % 10 == 4:  # the sender recalls it while the county is away
            r = s.post(f"{pref.url}/api/v1/documents/{mid}/recall", json={"reason": "内容有误"})
            assert r.status_code == 202, r.text
            recalled.append(mid)
    time.sleep(6)  # "the week": twice the retries' whole budget (~3 s at these settings)
    waiting = rows(pref, select(OutboxEntry.state, func.count()).where(OutboxEntry.kind == "forward")
                   .group_by(OutboxEntry.state))
    assert "dead" not in dict(waiting), waiting
    assert {statuses(pref, m)[CLUSTER_COUNTY_A]["status"] for m in urgency} == {"queued", "recalled"}

    cluster.start_node("county-a")
    deadline = time.monotonic() + 90
    while True:
        got = {m: statuses(pref, m)[CLUSTER_COUNTY_A]["status"] for m in urgency}
        late = {m: st for m, st in got.items() if st != ("recalled" if m in recalled else "signed")}
        if not late:
            break
        if time.monotonic() > deadline:  # say which copies, and what the outbox holds for them
            outbox = rows(pref, select(OutboxEntry.kind, OutboxEntry.state, OutboxEntry.attempts,
                                       OutboxEntry.last_error).where(OutboxEntry.kind != "webhook"))
            pytest.fail(f"{len(late)} copies not final after 90 s: {late}; prefecture outbox: {outbox}")
        time.sleep(0.5)
    # once each: county A stored each message once and its legacy system took each once;
    # the forwards were each sent once, after the requests that found the county away
    arrived = [m for (m,) in rows(a, select(Message.id).order_by(Message.accepted_at))]
    expected = [m for m in urgency if m not in recalled]
    assert sorted(arrived) == sorted(expected)
    assert a.soap.state.send_calls == a.soap.state.documents == len(expected)
    assert {n for (n,) in rows(pref, select(OutboxEntry.attempts).where(OutboxEntry.kind == "forward"))} <= {0, 1}
    # 特急 first: the first claim once the county is back takes the most urgent rows (8 × 4
    # threads), sent at once: every 特急 one is among the first to arrive, not spread through
    # the backlog in the order they were accepted
    urgent = [arrived.index(m) for m in expected if urgency[m] == "特急"]
    assert len(urgent) == 6 and max(urgent) < 32, urgent
