"""Ferry links (网闸): batches carried as signed files, one way or both.

End to end with separate node processes: the link between the prefecture and county B is a
ferry link; the test plays the isolation device, carrying the files from one node's out
folder to the other's in folder, and runs ``gateway sync ferry-out`` / ``ferry-in`` as an
operator would. Faults: a file truncated, changed (items, a blob), signed by another key or
addressed to another node is rejected whole. Over SFTP: the real OpenSSH server of
``tests/plugins/sshd.py``, in-process nodes (the edge under test is SFTP)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from adapters.simulators.cluster import CITY_B, PREFECTURE, Cluster, NodeProc
from gateway import migrate, nodekey, prune
from gateway import config as config_mod
from gateway.federation import ferry
from gateway.federation.keys import public_text
from gateway.models import AuditEntry, Delivery, IngestedItem, Message, OutboxEntry, ReceiptRecord
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import Api, RecordingAdapter
from tests.plugins.sshd import SftpEndpoint
from tests.test_federation import rows, statuses
from tests.test_federation_sync import sync


# -- the cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # no HTTP between the two (nothing may be fetched across the device), and files are
    # judged at once (no settling time: the test copies them whole)
    ferry_side = {"url": "", "ferry_settle": 0}
    c = Cluster(tmp_path_factory.mktemp("ferry"), links={("prefecture", "county-b"): "ferry"},
                peer_settings={("county-b", "prefecture"): ferry_side, ("prefecture", "county-b"): ferry_side})
    try:
        c.start()
        yield c
    finally:
        c.close()


def upload(node: NodeProc, data: bytes) -> str:
    r = node.session().post(f"{node.url}/api/v1/blobs", data=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return str(r.json()["sha256"])


def send_document(node: NodeProc, title: str) -> tuple[str, bytes, bytes]:
    """A document with a body and an attachment for 乙市; returns (id, body, attachment)."""
    body = f"{title} 正文 {uuid.uuid4()}".encode() * 300
    attachment = os.urandom(200_000)
    doc = {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
           "doc_number": "州政办发〔2026〕52号", "title": title, "written_date": "2026-12-01",
           "recipients": [{"unit": CITY_B}],
           "body": {"sha256": upload(node, body), "name": "正文.ofd", "media_type": "application/ofd"},
           "attachments": [{"sha256": upload(node, attachment), "name": "附件1.pdf",
                            "media_type": "application/pdf"}]}
    r = node.session().post(f"{node.url}/api/v1/documents", json=doc)
    assert r.status_code == 202, r.text
    return str(r.json()["id"]), body, attachment


def carry(cluster: Cluster, src: str, dst: str) -> list[str]:
    """The isolation device: move each complete file (its .sig written) from ``src``'s out
    folder to ``dst``'s in folder, the .ferry first and the .sig after it."""
    out, into = cluster.ferry_dir(src, dst, "out"), cluster.ferry_dir(dst, src, "in")
    into.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in out.glob("*.ferry") if (out / (p.name + ".sig")).exists())
    for name in names:
        shutil.copyfile(out / name, into / name)
        shutil.copyfile(out / (name + ".sig"), into / (name + ".sig"))
        (out / name).unlink()
        (out / (name + ".sig")).unlink()
    return names


def count(node: NodeProc, model: Any, *where: Any) -> int:
    return int(rows(node, select(func.count()).select_from(model).where(*where))[0][0])


def blob_path(node: NodeProc, sha: str) -> Path:
    return node.data_dir / "blobs" / sha[:2] / sha[2:4] / sha


# -- end to end -------------------------------------------------------------------------------
def test_a_document_crosses_the_ferry_and_its_sign_for_comes_back_on_the_return_ferry(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    mid, body, attachment = send_document(pref, "摆渡测试")
    time.sleep(0.5)  # the delivery worker leaves ferry peers alone
    assert statuses(pref, mid)[CITY_B]["status"] == "queued"

    out = sync(pref, "ferry-out")
    assert out["outcome"] == "ok", out
    [written] = out["detail"]["county-b"]["files"]
    assert written["items"] == 1 and written["blobs"] == 2
    names = carry(cluster, "prefecture", "county-b")
    assert names == [written["file"]]
    # the rows are done once the file is in place; the copy stays queued until county B reports
    assert count(pref, OutboxEntry, OutboxEntry.target == "county-b", OutboxEntry.state != "done") == 0

    got = sync(b, "ferry-in")
    assert got["outcome"] == "ok", got
    assert [f["file"] for f in got["detail"]["prefecture"]["imported"]] == names
    assert rows(b, select(Message.source).where(Message.id == mid)) == [("node:prefecture",)]
    sha_att = hashlib_hex(attachment)
    assert blob_path(b, sha_att).read_bytes() == attachment  # carried in the file, never fetched
    deadline = time.monotonic() + 30
    while not [d for d in b.soap.state.all_documents() if d.title == "摆渡测试"]:
        assert time.monotonic() < deadline, "the document never reached 乙市's exchange service"
        time.sleep(0.2)
    [doc] = [d for d in b.soap.state.all_documents() if d.title == "摆渡测试"]
    assert doc.body == body and doc.recipient_unit == CITY_B
    archived = cluster.ferry_dir("county-b", "prefecture", "in") / "archive"
    assert (archived / names[0]).exists() and (archived / (names[0] + ".sig")).exists()

    # the return ferry: county B's status reports (delivered, signed) go back the same way
    deadline = time.monotonic() + 60
    while rows(b, select(Delivery.status).where(Delivery.message_id == mid)) != [("signed",)]:
        assert time.monotonic() < deadline, rows(b, select(Delivery.status).where(Delivery.message_id == mid))
        time.sleep(0.2)
    while statuses(pref, mid)[CITY_B]["status"] != "signed":
        assert time.monotonic() < deadline, statuses(pref, mid)
        assert sync(b, "ferry-out")["outcome"] == "ok"
        carry(cluster, "county-b", "prefecture")
        sync(pref, "ferry-in")
    assert statuses(pref, mid)[CITY_B]["signer"] == "乙市人民政府办公室值班员"

    # the same file comes again (the device repeats itself): nothing changes
    before = (count(b, Message), count(b, Delivery), count(b, ReceiptRecord), count(b, OutboxEntry),
              len(b.soap.state.all_documents()))
    inbox = cluster.ferry_dir("county-b", "prefecture", "in")
    shutil.copyfile(archived / names[0], inbox / names[0])
    shutil.copyfile(archived / (names[0] + ".sig"), inbox / (names[0] + ".sig"))
    again = sync(b, "ferry-in")
    assert again["outcome"] == "ok", again
    assert again["detail"]["prefecture"]["imported"] == []
    assert [f["file"] for f in again["detail"]["prefecture"]["duplicate"]] == names
    after = (count(b, Message), count(b, Delivery), count(b, ReceiptRecord), count(b, OutboxEntry),
             len(b.soap.state.all_documents()))
    assert after == before
    assert not (inbox / names[0]).exists()
    assert count(b, IngestedItem, IngestedItem.adapter == "ferry:prefecture") >= 1


def hashlib_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- faults -----------------------------------------------------------------------------------
def _flip(data: bytes, member: str) -> bytes:
    """``data`` with one byte changed in the middle of the tar member ``member``."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        m = tar.getmember(member)
    at = m.offset_data + m.size // 2
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _readdress(data: bytes, to: str, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """The file rebuilt with its manifest addressed to ``to``, properly signed with ``key``."""
    out = io.BytesIO()
    manifest = b""
    with tarfile.open(fileobj=io.BytesIO(data)) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            content = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                content = manifest = json.dumps({**json.loads(content), "to": to}, sort_keys=True,
                                                separators=(",", ":")).encode()
                m.size = len(content)
            dst.addfile(m, io.BytesIO(content))
    return out.getvalue(), ferry.signature_file("prefecture", key, manifest)


def test_a_truncated_changed_foreign_or_misaddressed_file_is_rejected_whole(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    mid, body, attachment = send_document(pref, "摆渡故障")
    assert sync(pref, "ferry-out")["outcome"] == "ok"
    held = cluster.root / "held"
    held.mkdir(exist_ok=True)
    out = cluster.ferry_dir("prefecture", "county-b", "out")
    [name] = [p.name for p in out.glob("*.ferry")]
    for n in (name, name + ".sig"):
        shutil.move(out / n, held / n)  # the device holds it back: the faults go first
    good, good_sig = (held / name).read_bytes(), (held / (name + ".sig")).read_bytes()
    body_sha = hashlib_hex(body)
    pref_key = nodekey.load_or_create(pref.data_dir)
    variants = {
        "truncated": (good[:len(good) // 2], good_sig, "truncated"),
        "items changed": (_flip(good, "items.jsonl"), good_sig, "items.jsonl: its SHA-256 does not match"),
        "blob changed": (_flip(good, f"blobs/{body_sha}"), good_sig, f"blobs/{body_sha}: the content does not"),
        "another key": (good, ferry.signature_file("prefecture", Ed25519PrivateKey.generate(),
                                                   _manifest(good)), "does not verify with the pinned key"),
        "another node": (*_readdress(good, "county-a", pref_key), "addressed to node 'county-a'"),
    }
    inbox = cluster.ferry_dir("county-b", "prefecture", "in")
    failed = inbox / "failed"
    rejects = count(b, AuditEntry, AuditEntry.action == "ferry.reject")
    for what, (data, sig, reason) in variants.items():
        (inbox / name).write_bytes(data)
        (inbox / (name + ".sig")).write_bytes(sig)
        got = sync(b, "ferry-in")
        assert got["outcome"] == "failed", (what, got)
        assert reason in got["detail"]["message"], (what, got)
        # nothing from it is stored: no message, no delivery, no blob
        assert count(b, Message, Message.id == mid) == 0, what
        assert count(b, Delivery, Delivery.message_id == mid) == 0, what
        assert not blob_path(b, body_sha).exists() and not blob_path(b, hashlib_hex(attachment)).exists(), what
        assert not (inbox / name).exists() and (failed / name).exists(), what
        assert reason in (failed / (name + ".error")).read_text(encoding="utf-8"), what
        rejects += 1
        audit = rows(b, select(AuditEntry.object, AuditEntry.outcome, AuditEntry.detail)
                     .where(AuditEntry.action == "ferry.reject").order_by(AuditEntry.seq))
        assert len(audit) == rejects, what
        assert audit[-1][:2] == (f"ferry:prefecture/{name}", "rejected") and reason in json.loads(audit[-1][2])["reason"]
        shutil.rmtree(failed)
    assert [d for d in b.soap.state.all_documents() if d.title == "摆渡故障"] == []

    # the good file afterwards is imported: the rejected ones did not move the cursor
    for n in (name, name + ".sig"):
        shutil.move(held / n, inbox / n)
    got = sync(b, "ferry-in")
    assert got["outcome"] == "ok", got
    assert [f["file"] for f in got["detail"]["prefecture"]["imported"]] == [name]
    assert rows(b, select(Message.source).where(Message.id == mid)) == [("node:prefecture",)]
    assert blob_path(b, body_sha).read_bytes() == body


def _manifest(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile("manifest.json").read()  # type: ignore[union-attr]


# -- in-process nodes (SFTP; a file still arriving) ---------------------------------------------
def _pair(tmp_path: Path, out_b: Any, in_b: Any, out_pref: Any, in_pref: Any, settle: float = 0,
          b_url: str | None = None) -> tuple[Node, Node]:
    """The prefecture and county B as in-process nodes on their own SQLite databases (county
    B's at ``b_url`` if given), linked by a ferry: the prefecture writes to ``out_b`` and reads
    ``in_pref``, county B reads ``in_b`` and writes ``out_pref``."""
    RecordingAdapter.instances.clear()
    ids = {"prefecture": PREFECTURE, "county-b": CITY_B}
    for n in ids:
        (tmp_path / n).mkdir(parents=True, exist_ok=True)
    for folder in (out_b, in_b, out_pref, in_pref):  # the device's folders (the gateway never makes them)
        if isinstance(folder, str):
            Path(folder).mkdir(parents=True, exist_ok=True)
    public = {n: public_text(nodekey.load_or_create(tmp_path / n)) for n in ids}
    nodes = []
    for me, other in (("prefecture", "county-b"), ("county-b", "prefecture")):
        out, into = (out_b, in_pref) if me == "prefecture" else (out_pref, in_b)
        raw = {"node": {"id": me, "units": [ids[me]], "data_dir": str(tmp_path / me)},
               "database": {"url": b_url if b_url and me == "county-b" else f"sqlite:///{tmp_path / me / 'gateway.db'}"},
               "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": 30,
                          "retry": {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.05}},
               "adapters": {f"rec-{me}": {"type": "recording"}},
               "routes": [{"units": [ids[me]], "adapter": f"rec-{me}"}, {"node": other}],
               "peers": {other: {"public_key": public[other], "units": [ids[other]], "link": "ferry",
                                 "ferry_out": out, "ferry_in": into, "ferry_settle": settle}}}
        cfg = config_mod.from_mapping(raw, source=f"test:{me}")
        migrate.upgrade(cfg.database_url())
        nodes.append(Node(cfg))
    return nodes[0], nodes[1]


def _send(pref: Node) -> str:
    api = Api(pref)
    doc = api.document(recipients=(CITY_B,))
    doc["attachments"] = [{"sha256": api.upload(b"\x00attachment " * 5000), "name": "附件.bin"}]
    r = api.post("/api/v1/documents", json=doc)
    assert r.status_code == 202, r.get_json()
    return str(r.get_json()["id"])


@contextmanager
def _two_files(tmp_path: Path, b_url: str | None = None) -> Iterator[SimpleNamespace]:
    """Two in-process nodes on a folder ferry; the prefecture has sent two documents, one
    file each (``one`` and ``two``, their ids ``first`` and ``second``), not yet imported."""
    to_b, to_pref = tmp_path / "to-b", tmp_path / "to-pref"
    pref, b = _pair(tmp_path, out_b=str(to_b), in_b=str(to_b), out_pref=str(to_pref), in_pref=str(to_pref),
                    b_url=b_url)
    try:
        first = _send(pref)
        [one] = ferry.ferry_out(pref)["county-b"]["files"]
        second = _send(pref)
        [two] = ferry.ferry_out(pref)["county-b"]["files"]
        yield SimpleNamespace(pref=pref, b=b, to_b=to_b, first=first, one=one, second=second, two=two)
    finally:
        pref.close()
        b.close()


def test_a_file_that_comes_again_keeps_its_record_past_keep_peer_items_days(tmp_path: Path, database_url: str) -> None:
    """The record of an imported file (and of each of its items) is forgotten by ``prune``
    once the file has not come for [worker] keep_peer_items_days; a file that comes again is
    marked as come now, and its record stays."""
    with _two_files(tmp_path, b_url=database_url) as t:
        got = ferry.ferry_in(t.b)["prefecture"]
        assert [f["file"] for f in got["imported"]] == [t.one["file"], t.two["file"]]
        with t.b.db.begin() as s:
            s.execute(update(IngestedItem).values(at=datetime.now(UTC) - timedelta(days=91)))
            two = s.scalars(select(IngestedItem.key).where(IngestedItem.key.like("ferry:prefecture:2:%"))).one()
        ferry.resend(t.pref, "county-b", 2)
        assert [f["file"] for f in ferry.ferry_in(t.b)["prefecture"]["duplicate"]] == [t.two["file"]]

        assert prune.run(t.b)["peer_items_removed"] == 3  # file 1 and both items
        with t.b.db.sessions() as s:
            assert list(s.scalars(select(IngestedItem.key))) == [two]


def _sftp_spec(ep: SftpEndpoint, sub: str, folder: str) -> dict[str, Any]:
    """A ferry location in ``sub/folder`` on the real OpenSSH server ``ep``."""
    return {"host": ep.host, "port": ep.port, "username": ep.username,
            "private_key_file": str(ep.client_key_path), "host_key": ep.host_key_line,
            "path": posixpath.join(ep.remote_root, sub, folder), "connect_timeout": 5}


def test_round_trip_over_sftp_to_a_real_openssh_server(openssh_server: SftpEndpoint, tmp_path: Path) -> None:
    ep = openssh_server
    sub = f"ferry-{uuid.uuid4().hex[:8]}"

    def spec(folder: str) -> dict[str, Any]:
        return _sftp_spec(ep, sub, folder)

    # one folder per direction on the server: the device's two sides
    pref, b = _pair(tmp_path, out_b=spec("to-county-b"), in_b=spec("to-county-b"),
                    out_pref=spec("to-prefecture"), in_pref=spec("to-prefecture"))
    try:
        mid = _send(pref)
        out = ferry.ferry_out(pref)
        [written] = out["county-b"]["files"]
        remote = ep.data_root / sub / "to-county-b"
        assert sorted(p.name for p in remote.iterdir()) == [written["file"], written["file"] + ".sig"]

        got = ferry.ferry_in(b)
        assert [f["file"] for f in got["prefecture"]["imported"]] == [written["file"]], got
        with b.db.sessions() as s:
            assert s.scalar(select(Message.source).where(Message.id == mid)) == "node:prefecture"
        assert (remote / "archive" / written["file"]).exists() and not (remote / written["file"]).exists()

        # county B delivers; its status report goes back over the other folder
        Worker(b).drain(10)
        assert len(RecordingAdapter.instances["rec-county-b"].delivered) == 1
        back = ferry.ferry_out(b)
        assert back["prefecture"]["items"] >= 1, back
        came = ferry.ferry_in(pref)
        assert len(came["county-b"]["imported"]) == 1, came
        with pref.db.sessions() as s:
            assert s.scalar(select(Delivery.status).where(Delivery.message_id == mid, Delivery.unit == CITY_B)) \
                == "delivered"
        assert ferry.ferry_out(b)["prefecture"]["files"] == []  # nothing left to send
    finally:
        pref.close()
        b.close()


@pytest.mark.parametrize("when", ["left before", "planted after the check"])
def test_a_rejected_file_s_note_over_sftp_is_never_written_through_a_symlink(
    openssh_server: SftpEndpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Whoever may write the ferry folder (the device's side) can leave a link, or a note of a
    move cut short, where a rejected file's .error note goes: the note is created (O_EXCL),
    never written through it. One there before the move is passed by (the file goes to
    failed/ under another name with its note); one planted between the look and the OPEN
    makes the move fail, and the file stays to be judged again."""
    ep = openssh_server
    sub = f"ferry-{uuid.uuid4().hex[:8]}"
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")

    def spec(folder: str) -> dict[str, Any]:
        return _sftp_spec(ep, sub, folder)

    pref, b = _pair(tmp_path, out_b=spec("to-county-b"), in_b=spec("to-county-b"),
                    out_pref=spec("to-prefecture"), in_pref=spec("to-prefecture"))
    try:
        _send(pref)
        [written] = ferry.ferry_out(pref)["county-b"]["files"]
        remote = ep.data_root / sub / "to-county-b"
        path = remote / written["file"]
        path.write_bytes(path.read_bytes()[:100])  # truncated: rejected whole
        note = remote / "failed" / (written["file"] + ".error")
        note.parent.mkdir()
        if when == "left before":
            note.symlink_to(target)
        else:
            real_open = paramiko.SFTPClient.open

            def racing_open(self: paramiko.SFTPClient, filename: str, mode: str = "r", bufsize: int = -1) -> Any:
                if filename.endswith(note.name) and not note.is_symlink():
                    note.symlink_to(target)
                return real_open(self, filename, mode, bufsize)

            monkeypatch.setattr(paramiko.SFTPClient, "open", racing_open)

        with pytest.raises(ferry.FerryFailed):
            ferry.ferry_in(b)

        assert target.read_bytes() == b"keep me" and note.is_symlink()
        if when == "left before":
            [moved] = [p for p in note.parent.iterdir() if p.name.endswith(ferry.EXT)]
            assert moved.name != written["file"] and not path.exists()
            assert "truncated" in moved.with_name(moved.name + ".error").read_text(encoding="utf-8")
        else:
            assert path.exists()
    finally:
        pref.close()
        b.close()


def test_a_wrong_file_that_may_still_be_arriving_waits_before_it_is_judged(tmp_path: Path) -> None:
    to_b, to_pref = tmp_path / "to-b", tmp_path / "to-pref"
    pref, b = _pair(tmp_path, out_b=str(to_b), in_b=str(to_b), out_pref=str(to_pref), in_pref=str(to_pref),
                    settle=3600)
    try:
        mid = _send(pref)
        [written] = ferry.ferry_out(pref)["county-b"]["files"]
        path = to_b / written["file"]
        good = path.read_bytes()
        path.write_bytes(good[:len(good) // 3])  # the device is still copying it
        got = ferry.ferry_in(b)
        assert got["prefecture"]["incomplete"] == written["file"] and got["prefecture"]["rejected"] == []
        assert path.exists() and not (to_b / "failed").exists()
        old = time.time() - 7200  # left alone for two hours: it is judged, and rejected
        os.utime(path, (old, old))
        os.utime(to_b / (written["file"] + ".sig"), (old, old))
        with pytest.raises(ferry.FerryFailed, match="truncated"):
            ferry.ferry_in(b)
        assert (to_b / "failed" / written["file"]).exists()
        path.write_bytes(good)  # copied again, whole
        (to_b / "failed" / (written["file"] + ".sig")).rename(to_b / (written["file"] + ".sig"))
        got = ferry.ferry_in(b)
        assert [f["file"] for f in got["prefecture"]["imported"]] == [written["file"]]
        with b.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Delivery).where(Delivery.message_id == mid)) == 1
    finally:
        pref.close()
        b.close()


def test_files_are_imported_in_sequence_and_a_missing_one_holds_the_later_ones_back(tmp_path: Path) -> None:
    with _two_files(tmp_path) as t:
        assert (t.one["sequence"], t.two["sequence"]) == (1, 2)
        aside = tmp_path / "aside"
        aside.mkdir()
        for n in (t.one["file"], t.one["file"] + ".sig"):
            (t.to_b / n).rename(aside / n)  # the device carries the second file first
        got = ferry.ferry_in(t.b)["prefecture"]
        assert got["imported"] == [] and got["waiting_for"] == t.one["file"]
        assert (t.to_b / t.two["file"]).exists()
        for n in (t.one["file"], t.one["file"] + ".sig"):
            (aside / n).rename(t.to_b / n)
        got = ferry.ferry_in(t.b)["prefecture"]
        assert [f["file"] for f in got["imported"]] == [t.one["file"], t.two["file"]]
        with t.b.db.sessions() as s:
            assert list(s.scalars(select(Message.id).order_by(Message.accepted_at))) == [t.first, t.second]


def _carried_away(folder: Path, name: str) -> None:
    """The device lost this file (and its .sig) for good."""
    (folder / name).unlink()
    (folder / (name + ".sig")).unlink()


def test_a_file_the_device_lost_is_sent_again_from_the_copy_the_sender_kept(tmp_path: Path) -> None:
    with _two_files(tmp_path) as t:
        pref, b, to_b, one, two = t.pref, t.b, t.to_b, t.one, t.two
        assert one["kept"] and two["kept"]
        kept = ferry.kept_folder(pref, "county-b")
        assert (kept / one["file"]).read_bytes() == (to_b / one["file"]).read_bytes()
        _carried_away(to_b, one["file"])
        assert ferry.ferry_in(b)["prefecture"]["waiting_for"] == one["file"]

        assert ferry.resend(pref, "county-b", 1, actor="cli:test") == [one["file"]]
        got = ferry.ferry_in(b)["prefecture"]
        assert [f["file"] for f in got["imported"]] == [one["file"], two["file"]]
        with b.db.sessions() as s:
            assert set(s.scalars(select(Message.id))) == {t.first, t.second}
        # sending files the receiver has already: archived as duplicates, nothing changes
        assert ferry.resend(pref, "county-b", 1, 2) == [one["file"], two["file"]]
        got = ferry.ferry_in(b)["prefecture"]
        assert got["imported"] == [] and [f["file"] for f in got["duplicate"]] == [one["file"], two["file"]]
        with pref.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(AuditEntry)
                            .where(AuditEntry.action == "ferry.resend")) == 3
        with pytest.raises(ferry.FerryFailed, match="written files 1..2"):
            ferry.resend(pref, "county-b", 3)
        # past ferry_keep_days the copies go (the next ferry-out prunes them)
        old = time.time() - 15 * 86400
        for p in kept.iterdir():
            os.utime(p, (old, old))
        ferry.ferry_out(pref)
        assert list(kept.iterdir()) == []
        with pytest.raises(ferry.FerryFailed, match="no longer kept"):
            ferry.resend(pref, "county-b", 1)


def test_a_file_lost_for_good_can_be_skipped_by_the_receiver_and_is_taken_if_it_turns_up(tmp_path: Path) -> None:
    with _two_files(tmp_path) as t:
        b, to_b, one, two = t.b, t.to_b, t.one, t.two
        aside = tmp_path / "aside"
        aside.mkdir()
        for n in (one["file"], one["file"] + ".sig"):
            (to_b / n).rename(aside / n)
        assert ferry.ferry_in(b)["prefecture"]["waiting_for"] == one["file"]
        with pytest.raises(ferry.FerryFailed, match="waiting for file 1, not 2"):
            ferry.skip(b, "prefecture", 2, "网闸故障")
        with pytest.raises(ferry.FerryFailed, match="reason"):
            ferry.skip(b, "prefecture", 1, " ")
        assert ferry.skip(b, "prefecture", 1, "网闸故障，原文件已丢失", actor="cli:test") == one["file"]
        got = ferry.ferry_in(b)["prefecture"]
        assert [f["file"] for f in got["imported"]] == [two["file"]]
        with b.db.sessions() as s:
            assert set(s.scalars(select(Message.id))) == {t.second}
            entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "ferry.skip")).one()
            assert entry.actor == "cli:test" and "网闸故障" in str(entry.detail)
        for n in (one["file"], one["file"] + ".sig"):  # it turns up after all
            (aside / n).rename(to_b / n)
        got = ferry.ferry_in(b)["prefecture"]
        assert [f["file"] for f in got["imported"]] == [one["file"]]
        with b.db.sessions() as s:
            assert set(s.scalars(select(Message.id))) == {t.first, t.second}


def test_a_peer_cannot_lend_a_made_up_origin_node_to_any_unit(tmp_path: Path) -> None:
    """The hop list is the sending peer's word: an origin node that neither [peers] nor the
    directory knows to serve the sender unit is refused, whatever unit the envelope names."""
    from gateway.federation import transfer
    from systems.documents.payload import to_envelope
    from systems.documents.schemas import DocumentIn

    to_b, to_pref = tmp_path / "to-b", tmp_path / "to-pref"
    pref, b = _pair(tmp_path, out_b=str(to_b), in_b=str(to_b), out_pref=str(to_pref), in_pref=str(to_pref))
    try:
        doc = DocumentIn.model_validate({**Api(pref).document(recipients=(CITY_B,)), "sender_unit": PREFECTURE})
        for origin, hops in (("ghost", ["ghost", "prefecture"]), ("county-x", ["county-x", "prefecture"])):
            env = to_envelope(doc, message_id=f"spoof-{origin}", node_id=origin, sizes={doc.body["sha256"]: 10})
            body = {"message_id": env.message_id, "units": [CITY_B], "hops": hops, "envelope": env.to_xml().decode()}
            with pytest.raises(transfer.TransferError) as e:
                transfer.prepare(b, "prefecture", body)
            assert e.value.kind == "forbidden-unit" and origin in e.value.detail
        with b.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Message)) == 0
    finally:
        pref.close()
        b.close()
