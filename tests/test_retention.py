"""Unclaimed content (gateway.retention, the ``blobs`` job): uploads no stored message names
and that were not used for ``[api] unclaimed_upload_days`` are removed; content a message
names never is, and content being named while the job runs is not lost."""
from __future__ import annotations

import json
import os
import time

import pytest

DAY = 86_400


def _age(path: os.PathLike[str] | str, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def _document(body: str, attachments: list[str]) -> dict:
    from tests.plugins.gatewaynode import COUNTY_A, PREFECTURE

    return {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
            "doc_number": "州政办发〔2026〕37号", "title": "关于做好2026年冬季值班工作的通知",
            "written_date": "2026年11月20日", "recipients": [{"unit": COUNTY_A}],
            "body": {"sha256": body, "name": "正文.ofd"},
            "attachments": [{"sha256": a, "name": f"附件{i + 1}.pdf"} for i, a in enumerate(attachments)]}


def test_the_blobs_job_removes_only_old_content_no_message_names(tmp_path, database_url):
    from sqlalchemy import select

    from gateway import audit, migrate, scheduler
    from gateway.models import AuditEntry, Blob, BlobGrant
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url, api={"unclaimed_upload_days": 30})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        body, named = api.upload("正文 ".encode() * 100), api.upload(b"attachment named by a document")
        old, young = api.upload(b"uploaded, never sent on " * 10), api.upload(b"uploaded yesterday")
        r = api.post("/api/v1/documents", json=_document(body, [named]))
        assert r.status_code == 202, r.get_json()
        store = node.blobs
        for sha in (body, named, old):
            _age(store.path(sha), 40)
        _age(store.path(young), 1)
        assert store.known(old)[0] > 0  # the API process remembers it (as an accept's check would)
        leftover, fresh = store.root / "tmp" / "tmpcut", store.root / "tmp" / "tmpbusy"
        leftover.write_bytes(b"x" * 10)
        fresh.write_bytes(b"y")
        _age(leftover, 3)

        worker = Node(cfg)  # the job runs in the worker's process, with a blob store of its own
        result = scheduler.run_job(worker, "blobs", actor="test")
        assert result.outcome == "ok", result.detail
        assert result.detail["removed"] == 1 and result.detail["bytes_freed"] == len(b"uploaded, never sent on " * 10)
        assert result.detail["newly_claimed"] == 2 and result.detail["messages_read"] == 1
        assert result.detail["leftovers_removed"] == 1 and not leftover.exists() and fresh.exists()
        assert not store.exists(old)
        for sha in (body, named, young):  # named by a message (though old), or not old
            assert store.exists(sha), sha
        with node.db.sessions() as s:
            assert s.scalar(select(Blob).where(Blob.sha256 == old)) is None
            assert s.scalar(select(BlobGrant).where(BlobGrant.sha256 == old)) is None
            assert s.scalar(select(Blob).where(Blob.sha256 == young)) is not None
            entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "blob.remove"))
            assert entry is not None and entry.actor == "job:blobs"
            assert json.loads(entry.detail)["sha256"] == [old]
            assert audit.verify(s).ok

        # the API's remembered sizes do not outlive the content: asked, or named, it is gone
        assert api.get(f"/api/v1/blobs/{old}").status_code == 404
        r = api.post("/api/v1/documents", json=_document(body, [old]))
        assert r.status_code == 422 and r.get_json()["type"] == "urn:egov:gateway:problem:unknown-blob"
        assert r.get_json()["errors"][0]["field"] == "attachments.0.sha256"
        assert api.upload(b"uploaded, never sent on " * 10) == old  # stored again, it can be sent
        assert api.post("/api/v1/documents", json=_document(body, [old])).status_code == 202

        again = scheduler.run_job(worker, "blobs", actor="test")  # named now: claimed, and so kept
        assert again.detail["removed"] == 0 and again.detail["newly_claimed"] == 1
        _age(store.path(old), 40)
        third = scheduler.run_job(worker, "blobs", actor="test")
        assert third.detail["removed"] == 0 and third.detail["newly_claimed"] == 0
        assert store.exists(old)
        worker.close()
    finally:
        node.close()


def test_content_a_new_document_names_is_marked_in_use(tmp_path, database_url):
    """Named content older than half the retention gets its time set to now, so that the job
    cannot take it while the document is stored; without a retention nothing is touched."""
    from gateway import migrate
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    for days, touched in ((30, True), (0, False)):
        cfg = node_config(tmp_path / str(days), database_url, api={"unclaimed_upload_days": days})
        migrate.upgrade(cfg.database_url())
        node = Node(cfg)
        try:
            api = Api(node)
            body, recent = api.upload(b"body of an old template"), api.upload(b"recent attachment")
            _age(node.blobs.path(body), 20)  # older than half of 30 days
            _age(node.blobs.path(recent), 10)
            assert api.post("/api/v1/documents", json=_document(body, [recent])).status_code == 202
            age = time.time() - node.blobs.path(body).stat().st_mtime
            assert (age < 60) is touched, (days, age)
            assert 9 * DAY < time.time() - node.blobs.path(recent).stat().st_mtime < 11 * DAY  # young enough
        finally:
            node.close()


def test_content_marked_in_use_while_taken_aside_is_put_back(tmp_path, monkeypatch):
    from gateway import blobs as blobs_mod
    from gateway.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    sha, _ = store.put_bytes(b"content")
    _age(store.path(sha), 40)
    cutoff = time.time() - 30 * DAY
    assert [x[0] for x in store.stored()] == [sha]
    store.touch(sha)  # named by a new message after the job listed it
    assert store.set_aside(sha, cutoff) is None and store.exists(sha)

    # stored again (and so marked in use) in the instant the file was aside: kept, once
    _age(store.path(sha), 40)
    real_rename = os.rename

    def rename_then_store_again(src, dst):  # type: ignore[no-untyped-def]
        real_rename(src, dst)
        os.utime(dst)  # the writer's touch reached the file just before it was taken aside
        store.put_bytes(b"content")

    monkeypatch.setattr(blobs_mod.os, "rename", rename_then_store_again)
    assert store.set_aside(sha, cutoff) is None
    monkeypatch.setattr(blobs_mod.os, "rename", real_rename)
    assert store.exists(sha) and os.listdir(store.root / "trash") == []
    assert store.recover_trash(cutoff) == (0, {})

    # marked in use after it was taken aside: the marker finds it gone
    _age(store.path(sha), 40)
    assert store.set_aside(sha, cutoff) == len(b"content")
    assert not store.touch(sha) and not store.exists(sha)
    with pytest.raises(FileNotFoundError, match=sha):
        store.in_use([sha], 15 * DAY)
    store.discard(sha)
    assert os.listdir(store.root / "trash") == []


def test_a_crash_between_setting_files_aside_and_removing_them_loses_nothing(tmp_path, database_url):
    """What a run killed midway left in trash/ is finished by the next run: put back if used
    since the cut-off (as set_aside would have), otherwise removed, recorded and its rows
    gone like any other."""
    from sqlalchemy import select

    from gateway import migrate, scheduler
    from gateway.models import AuditEntry, Blob
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url, api={"unclaimed_upload_days": 30})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        used, unused = api.upload(b"named meanwhile"), api.upload(b"never named")
        store = node.blobs
        (store.root / "trash").mkdir()
        for sha in (used, unused):
            os.rename(store.path(sha), store.root / "trash" / sha)  # the killed run had set both aside
        _age(store.root / "trash" / unused, 40)
        (store.root / "trash" / "not-a-blob").write_bytes(b"?")
        result = scheduler.run_job(node, "blobs", actor="test")
        assert result.outcome == "ok", result.detail
        assert result.detail["put_back"] == 1 and result.detail["removed"] == 1
        assert store.exists(used) and not store.exists(unused)
        assert os.listdir(store.root / "trash") == []
        with node.db.sessions() as s:
            assert s.scalar(select(Blob).where(Blob.sha256 == unused)) is None
            assert s.scalar(select(Blob).where(Blob.sha256 == used)) is not None
            entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "blob.remove"))
            assert entry is not None and json.loads(entry.detail)["sha256"] == [unused]
    finally:
        node.close()


def test_content_arriving_again_from_another_node_is_marked_in_use(tmp_path):
    from gateway.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    sha, _ = store.put_bytes(b"carried inline by a forward")
    _age(store.path(sha), 40)
    store.put_many([b"carried inline by a forward"])  # stored already: not written, but in use now
    assert time.time() - store.path(sha).stat().st_mtime < 60


def test_without_a_retention_the_job_removes_nothing(tmp_path, database_url):
    from gateway import migrate, scheduler
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        sha = Api(node).upload(b"kept for ever")
        _age(node.blobs.path(sha), 4000)
        result = scheduler.run_job(node, "blobs", actor="test")
        assert result.outcome == "ok" and "unclaimed_upload_days is 0" in result.detail["skipped"]
        assert node.blobs.exists(sha)
    finally:
        node.close()


def test_a_retention_that_is_not_a_count_of_days_is_refused_at_start(tmp_path):
    from gateway.config import ConfigError
    from tests.plugins.gatewaynode import node_config

    for bad in (-1, 5000, "30d"):
        with pytest.raises(ConfigError, match="unclaimed_upload_days"):
            node_config(tmp_path, "", api={"unclaimed_upload_days": bad})


def test_gateway_sync_blobs_runs_it_now_and_prints_what_it_did(tmp_path):
    from click.testing import CliRunner

    from gateway import migrate
    from gateway.cli import main

    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "county-a"\ndata_dir = "{tmp_path / "var"}"\n[api]\nunclaimed_upload_days = 7\n',
                    encoding="utf-8")
    migrate.upgrade(f"sqlite:///{tmp_path / 'var' / 'gateway.db'}")
    (tmp_path / "var" / "blobs" / "ab" / "cd").mkdir(parents=True)
    stray = tmp_path / "var" / "blobs" / "ab" / "cd" / ("abcd" + "0" * 60)  # stored, never named
    stray.write_bytes(b"left behind")
    _age(stray, 8)
    r = CliRunner().invoke(main, ["-c", str(conf), "sync", "blobs"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["job"] == "blobs" and out["outcome"] == "ok"
    assert out["detail"]["removed"] == 1 and out["detail"]["bytes_freed"] == len(b"left behind")
    assert not stray.exists()


def test_gateway_blobs_unclaimed_shows_what_the_job_would_remove_and_removes_nothing(tmp_path):
    from click.testing import CliRunner

    from gateway import migrate
    from gateway.cli import main

    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "county-a"\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    migrate.upgrade(f"sqlite:///{tmp_path / 'var' / 'gateway.db'}")
    folder = tmp_path / "var" / "blobs" / "ab" / "cd"
    folder.mkdir(parents=True)
    old, fresh = folder / ("abcd" + "1" * 60), folder / ("abcd" + "2" * 60)
    old.write_bytes(b"left behind")
    fresh.write_bytes(b"uploaded today")
    _age(old, 10)
    r = CliRunner().invoke(main, ["-c", str(conf), "blobs", "unclaimed"])
    assert r.exit_code == 2 and "unclaimed_upload_days = 0" in r.output and "--days" in r.output
    r = CliRunner().invoke(main, ["-c", str(conf), "blobs", "unclaimed", "--days", "7"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("1 stored contents (11 bytes) are named by no message and unused for 7 days")
    assert old.name in lines[1] and fresh.name not in r.stdout
    assert old.exists() and fresh.exists()  # nothing removed
    r = CliRunner().invoke(main, ["-c", str(conf), "blobs", "unclaimed", "--days", "30"])
    assert r.stdout.startswith("0 stored contents (0 bytes)") and r.stdout.rstrip().endswith("remove them.")


def test_the_claims_scan_reads_every_message_once_however_many_share_an_instant(tmp_path, database_url,
                                                                                  monkeypatch):
    """Pages follow the accepted_at index; the rest of a page's last instant is read with it
    (here 5 messages share one instant and a page holds 3), the next page starts after it."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select

    from gateway import migrate, retention
    from gateway.models import BlobClaim, Message
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    monkeypatch.setattr(retention, "_PAGE", 3)
    cfg = node_config(tmp_path, database_url, api={"unclaimed_upload_days": 30})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        t0 = datetime.now(UTC) - timedelta(hours=1)
        instants = [t0] * 2 + [t0 + timedelta(seconds=1)] * 5 + [t0 + timedelta(seconds=2)] * 2
        with node.db.begin() as s:
            for i, at in enumerate(instants):
                sha = f"{i:064x}"
                s.add(Message(id=f"tie-{i}", subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                              classification="非密", clearance=0, urgency="平件", source="api", summary={},
                              envelope_xml=f'<attachment role="body" name="x" size="1" sha256="{sha}"/>'.encode(),
                              accepted_at=at))
        assert retention.scan_claims(node) == (9, 9)
        with node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(BlobClaim)) == 9
        assert retention.scan_claims(node) == (9, 0)  # a day of overlap: read again, nothing new
    finally:
        node.close()
