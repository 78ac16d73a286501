"""Important actions that leave an audit entry (GB/T 22239 audit): the configuration a node
starts with, schema upgrades, refused sends and recalls; and no housekeeping job ever removes
an entry (网络安全法 Art. 21: six months at least). On SQLite and PostgreSQL."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner
from sqlalchemy import select

from gateway import audit, migrate, scheduler
from gateway.app import create_app
from gateway.cli import main
from gateway.db import Database
from gateway.models import AuditEntry
from gateway.node import Node
from tests.plugins.gatewaynode import COUNTY_C, Api, node_config


def _entries(url: str, action: str) -> list[AuditEntry]:
    db = Database(url, 1)
    try:
        with db.sessions() as s:
            return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.seq)))
    finally:
        db.dispose()


def _start(cfg) -> None:  # type: ignore[no-untyped-def]
    """An API process starting (gunicorn's create_app()) and stopping."""
    create_app(cfg).extensions["gateway.node"].close()


def test_a_start_with_a_changed_configuration_is_audited_once_with_what_changed(tmp_path, database_url):
    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    _start(cfg)
    _start(cfg)  # another worker, a restart: the same settings, nothing new
    [first] = _entries(database_url, "config.change")
    assert first.outcome == "first" and first.object == "node:prefecture" and first.actor.startswith("api:")
    assert json.loads(first.detail)["file"] == "test"

    changed = node_config(tmp_path, database_url, worker={"threads": 3},
                          routes=[{"units": [COUNTY_C], "adapter": "rec2"}])
    _start(changed)
    _start(changed)
    _start(cfg)  # and back
    _, second, third = _entries(database_url, "config.change")
    d = json.loads(second.detail)
    assert second.outcome == "changed" and d["changed"] == ["routes", "worker.threads"]
    assert d["previous_sha256"] == json.loads(first.detail)["sha256"] != d["sha256"]
    assert json.loads(third.detail)["sha256"] == json.loads(first.detail)["sha256"]
    db = Database(database_url, 1)
    with db.sessions() as s:
        assert audit.verify(s).ok
    db.dispose()


def test_an_api_and_a_worker_with_files_of_their_own_do_not_record_a_change_at_every_restart(tmp_path, database_url):
    api_cfg = node_config(tmp_path, database_url)
    worker_cfg = node_config(tmp_path, database_url, worker={"threads": 3})
    migrate.upgrade(api_cfg.database_url())
    for _ in range(2):  # both restarted twice, in turn
        _start(api_cfg)
        worker = Node(worker_cfg)
        worker.record_config("worker")
        worker.close()
    entries = _entries(database_url, "config.change")
    assert [(e.actor.split(":")[0], e.outcome) for e in entries] == [("api", "first"), ("worker", "first")]


def test_a_schema_upgrade_is_audited(tmp_path, database_url):
    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "prefecture"\ndata_dir = "{tmp_path / "var"}"\n'
                    f'[database]\nurl = "{database_url}"\n', encoding="utf-8")
    for _ in range(2):  # the second finds nothing to do: no entry
        r = CliRunner().invoke(main, ["-c", str(conf), "db", "upgrade"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    [e] = _entries(database_url, "schema.upgrade")
    assert e.actor.startswith("cli:") and json.loads(e.detail) == {"from": None, "to": migrate.head()}


def test_a_refused_send_or_recall_is_audited_as_a_failed_action(gw_node):
    api = Api(gw_node)
    r = api.post("/api/v1/documents", json=api.document(body={"sha256": "0" * 64, "name": "正文.ofd",
                                                               "media_type": "application/ofd"}))
    assert r.status_code == 422 and r.get_json()["type"].endswith("unknown-blob")
    assert api.post("/api/v1/documents", data="{", content_type="application/json").status_code == 400
    sent = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    assert api.post(f"/api/v1/documents/{sent}/recall").status_code == 202
    assert api.post(f"/api/v1/documents/{sent}/recall").status_code == 409  # nothing left to recall
    assert api.get("/api/v1/documents/no-such-document").status_code == 404  # a read: not an action
    with gw_node.db.sessions() as s:
        refused = list(s.scalars(select(AuditEntry).where(AuditEntry.action == "api.refuse")
                                 .order_by(AuditEntry.seq)))
        assert audit.verify(s).ok
    key = f"key:{api.key.split('_')[1]}(测试系统)"
    assert [(e.actor, e.object, e.outcome, json.loads(e.detail)["status"]) for e in refused] == [
        (key, "POST /api/v1/documents", "unknown-blob", 422),
        (key, "POST /api/v1/documents", "malformed-json", 400),
        (key, f"POST /api/v1/documents/{sent}/recall", "conflict", 409)]
    assert "0" * 64 in json.loads(refused[0].detail)["reason"]


def test_no_housekeeping_job_removes_audit_entries_however_old(tmp_path, database_url):
    cfg = node_config(tmp_path, database_url, api={"unclaimed_upload_days": 1, "idempotency_days": 1},
                      worker={"keep_done_days": 1})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        old = datetime.now(UTC) - timedelta(days=400)
        with node.db.begin() as s:  # a chain begun 400 days ago (a valid one: its times are hashed)
            s.execute(audit._INSERT, audit._chain(0, audit.GENESIS, old, [
                audit.Record("cli:root", "admin.key.create", f"key:{i:04d}") for i in range(3)]))
        api = Api(node)
        api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": "k"})
        for job in ("prune", "blobs"):
            assert scheduler.run_job(node, job, actor="test").outcome == "ok"
        with node.db.sessions() as s:
            kept = list(s.scalars(select(AuditEntry.object).where(AuditEntry.at < old + timedelta(days=1))))
            assert kept == ["key:0000", "key:0001", "key:0002"]
            assert audit.verify(s).ok
    finally:
        node.close()


def _conf(tmp_path, database_url: str):  # type: ignore[no-untyped-def]
    """The file of node_config's node (the same data_dir and database), for the CLI."""
    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "prefecture"\ndata_dir = "{tmp_path / "var"}"\n'
                    f'[database]\nurl = "{database_url}"\n', encoding="utf-8")
    return conf


def test_making_the_node_key_is_audited_and_a_start_finds_a_key_replaced(tmp_path, database_url):
    """Peers pin the node key: a new one cuts them off until they pin it too. Making it
    (`gateway federation key`, or on first use) is an admin.node_key.create entry with the
    public key; a process that starts with another key in the file than the one recorded (the
    file replaced, or restored from another node) records node.key, outcome changed."""
    from gateway import nodekey
    from gateway.federation.keys import public_text

    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    conf = _conf(tmp_path, database_url)
    printed = []
    for _ in range(2):  # the second prints the same key: nothing made, nothing recorded
        r = CliRunner().invoke(main, ["-c", str(conf), "federation", "key"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        printed.append(r.output.strip())
    assert printed[0] == printed[1]
    [made] = _entries(database_url, "admin.node_key.create")
    assert made.actor.startswith("cli:") and made.object == "node:prefecture"
    assert json.loads(made.detail) == {"algorithm": "ed25519", "public_key": printed[0],
                                       "file": str(tmp_path / "var" / nodekey.ED25519_FILE)}
    _start(cfg)
    assert _entries(database_url, "node.key") == []  # the key recorded is the one in place

    (tmp_path / "var" / nodekey.ED25519_FILE).unlink()  # replaced behind the gateway's back
    other = public_text(nodekey.load_or_create(tmp_path / "var"))
    _start(cfg)
    _start(cfg)
    [changed] = _entries(database_url, "node.key")
    assert changed.outcome == "changed" and changed.actor.startswith("api:")
    assert json.loads(changed.detail)["public_key"] == other
    assert json.loads(changed.detail)["previous_public_key"] == printed[0]
    db = Database(database_url, 1)
    with db.sessions() as s:
        assert audit.verify(s).ok
    db.dispose()


def test_a_node_key_made_before_the_database_is_ready_is_recorded_at_the_next_start(tmp_path, database_url, caplog):
    cfg = node_config(tmp_path, database_url)
    r = CliRunner().invoke(main, ["-c", str(_conf(tmp_path, database_url)), "federation", "key"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and r.output.startswith("ed25519:"), r.output  # the key is made all the same
    assert "could not be written to the audit log (admin.node_key.create)" in caplog.text
    migrate.upgrade(cfg.database_url())
    _start(cfg)
    _start(cfg)
    [first] = _entries(database_url, "node.key")
    assert first.outcome == "first" and json.loads(first.detail)["public_key"] == r.output.strip()
    assert _entries(database_url, "admin.node_key.create") == []
