"""The xml-exchange adapter against the simulated exchange box, over real HTTP and folders."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from adapters.archive import read_archive, write_archive, write_receipt
from adapters.base import (
    AdapterContext,
    ConfigError,
    Delivery,
    PermanentError,
    RetryableError,
    create,
)
from adapters.simulators.exchange_box import ExchangeBoxServer, FolderClerk
from adapters.xmlexchange import XmlExchangeAdapter, ack_body
from gateway import xmlsafe
from gateway.blobs import BlobStore
from gateway.envelope import Envelope, Receipt

DATA = Path(__file__).parent / "data"
PREF_OFFICE = "11522300GDR9YB9550"
COUNTY_A = "1152230107CTPD8U2P"
CITY_B = "11522302GRALUMYP76"
APPIDS = {PREF_OFFICE: "ZZF-OA", COUNTY_A: "JXF-OA", CITY_B: "YSF-OA"}


class DictState(dict):
    def set(self, key: str, value: str) -> None:
        self[key] = value

    def advance(self, key: str, value: int) -> None:
        if value > int(self.get(key) or "0"):
            self.set(key, str(value))


@pytest.fixture
def ctx(tmp_path: Path) -> AdapterContext:
    return AdapterContext(blobs=BlobStore(tmp_path / "blobs"), state=DictState(), base_dir=tmp_path)


@pytest.fixture
def envelope(ctx: AdapterContext) -> Envelope:
    """The sample envelope, its files (from the sample archive) in the blob store."""
    env = Envelope.from_xml((DATA / "envelope-document.xml").read_bytes())
    _, files = read_archive((DATA / "archive-send.xml").read_bytes())
    for _, content in files:
        ctx.blobs.put_bytes(content)  # type: ignore[attr-defined]
    return env


def http_adapter(ctx: AdapterContext, url: str, **extra: Any) -> XmlExchangeAdapter:
    cfg = {"type": "xml-exchange", "mode": "http", "address": url, "timeout": 5,
           "appids": APPIDS, "sender_appid": "ZZF-OA", **extra}
    adapter = create("box", cfg, ctx)
    assert isinstance(adapter, XmlExchangeAdapter)
    return adapter


def folder_adapter(ctx: AdapterContext, folder: Path, **extra: Any) -> XmlExchangeAdapter:
    adapter = create("box", {"type": "xml-exchange", "mode": "folder", "folder": str(folder), **extra}, ctx)
    assert isinstance(adapter, XmlExchangeAdapter)
    return adapter


def delivery(env: Envelope, i: int = 0) -> Delivery:
    return Delivery(message_id=env.message_id, recipient=env.recipients[i], envelope=env)


# -- http: delivery ------------------------------------------------------------------------
def test_deliver_over_http_body_intact_and_gb18030(exchange_box: ExchangeBoxServer, ctx, envelope) -> None:
    d = delivery(envelope)
    with http_adapter(ctx, exchange_box.url) as adapter:
        result = adapter.deliver(d)
    assert result.remote_id == d.remote_ref
    rec = exchange_box.state.archives[(d.remote_ref, COUNTY_A)]
    assert result.detail == f"ARRIVED {rec.receipt_no}"

    expected = io.BytesIO()
    write_archive(envelope, d.recipient, ctx.blobs, expected, archive_id=d.remote_ref,
                  appids=APPIDS, sender_appid="ZZF-OA")
    assert rec.body == expected.getvalue()  # byte for byte as written
    assert rec.content_type == "application/xml; charset=GB18030"
    assert rec.content_length == str(len(rec.body))  # a plain Content-Length body, not chunked
    assert rec.body.startswith(b'<?xml version="1.0" encoding="GB18030"?>')
    assert "冬季值班".encode("gb18030") in rec.body and "冬季值班".encode() not in rec.body
    assert rec.title == "关于做好2026年冬季值班和突发事件信息报送工作的通知"
    assert rec.receiver.appid == "JXF-OA"
    _, files = read_archive(rec.body)
    for att, content in files:
        with ctx.blobs.open(att.sha256) as fh:
            assert fh.read() == content


def test_redelivery_has_one_effect(exchange_box: ExchangeBoxServer, ctx, envelope) -> None:
    d = delivery(envelope)
    first = http_adapter(ctx, exchange_box.url).deliver(d)
    again = http_adapter(ctx, exchange_box.url).deliver(d)  # e.g. after a worker crash
    assert again.remote_id == first.remote_id and again.detail == first.detail
    counters = exchange_box.state.counters
    assert (counters["accepted"], counters["duplicates"]) == (1, 1)
    # a second recipient of the same message is a second document at the box
    other = http_adapter(ctx, exchange_box.url).deliver(delivery(envelope, 1))
    assert other.remote_id != first.remote_id
    assert counters["accepted"] == 2
    assert sorted(exchange_box.state.archives) == sorted(
        [(d.remote_ref, COUNTY_A), (delivery(envelope, 1).remote_ref, CITY_B)]
    )


def test_box_down_is_retryable_then_delivers(exchange_box: ExchangeBoxServer, ctx, envelope) -> None:
    adapter = http_adapter(ctx, exchange_box.url)
    exchange_box.stop()
    with pytest.raises(RetryableError) as ei:
        adapter.deliver(delivery(envelope))
    assert ei.value.code == "unreachable" and exchange_box.url in str(ei.value)
    assert adapter.check().ok is False

    exchange_box.start()  # same port
    exchange_box.box.available = False  # up but overloaded: 503
    with pytest.raises(RetryableError, match="HTTP 503"):
        adapter.deliver(delivery(envelope))
    exchange_box.box.available = True
    assert adapter.deliver(delivery(envelope)).detail.startswith("ARRIVED ")
    assert exchange_box.state.counters["accepted"] == 1
    health = adapter.check()
    assert health.ok and health.latency_ms is not None


def test_4xx_is_permanent(exchange_box: ExchangeBoxServer, ctx, envelope) -> None:
    exchange_box.box.known_units = {CITY_B}
    with pytest.raises(PermanentError) as ei:
        http_adapter(ctx, exchange_box.url).deliver(delivery(envelope))
    assert ei.value.code == "http-400"
    assert f"receiver {COUNTY_A} has no account at the box" in str(ei.value)
    exchange_box.box.known_units = None
    exchange_box.box.max_bytes = 500
    with pytest.raises(PermanentError, match="HTTP 413"):
        http_adapter(ctx, exchange_box.url).deliver(delivery(envelope))
    assert exchange_box.state.counters["accepted"] == 0


@pytest.mark.parametrize(
    "answer, match",
    [
        (b"<html>busy</html>", "not a valid ARRIVE receipt: receipt: root element is <html>"),
        (b"", "not a valid ARRIVE receipt"),
        ((DATA / "receipt-arrive.xml").read_bytes(), "answered a receipt for"),  # another archive
        (write_receipt(Receipt(COUNTY_A, "SIGNED", remote_ref="x", receipt_no="1", signer="某")), "answered a receipt for"),
    ],
)
def test_answer_that_is_not_our_arrive_receipt_is_retryable(http_endpoint, ctx, envelope, answer, match) -> None:
    http_endpoint.handler = lambda body, ct: (200, answer, "application/xml")
    with pytest.raises(RetryableError, match=match):
        http_adapter(ctx, http_endpoint.url).deliver(delivery(envelope))
    (method, path, ct, body), = http_endpoint.requests
    assert (method, path, ct) == ("POST", "/ArchiveHandleServlet", "application/xml; charset=GB18030")
    assert body.startswith(b'<?xml version="1.0" encoding="GB18030"?>')


def test_envelope_that_cannot_be_an_archive_is_permanent(http_endpoint, ctx, envelope) -> None:
    envelope.attachments[0].sha256 = "0" * 64  # no such blob
    with pytest.raises(PermanentError, match="not available"):
        http_adapter(ctx, http_endpoint.url).deliver(delivery(envelope))
    assert http_endpoint.requests == []  # nothing half-sent


# -- http: callbacks -----------------------------------------------------------------------
def gateway_route(adapter: XmlExchangeAdapter, ingested: list) -> Any:
    """What the gateway's callback route does: hand over, record items, answer."""

    def handler(body: bytes, ct: str) -> tuple[int, bytes, str]:
        try:
            items, out, out_ct = adapter.handle_callback(body, ct)
        except PermanentError as exc:
            return 400, ack_body(1, str(exc)), "application/xml; charset=GB18030"
        ingested.extend(items)
        return 200, out, out_ct

    return handler


def test_clerk_sign_and_return_reach_handle_callback(exchange_box, http_endpoint, ctx, envelope) -> None:
    adapter = http_adapter(ctx, exchange_box.url)
    ingested: list = []
    http_endpoint.handler = gateway_route(adapter, ingested)
    exchange_box.box.callback_url = http_endpoint.url + "/callbacks/box"
    d1, d2 = delivery(envelope, 0), delivery(envelope, 1)
    adapter.deliver(d1)
    adapter.deliver(d2)

    assert exchange_box.box.sign(d1.remote_ref, COUNTY_A, "李某").wait(5)
    assert exchange_box.box.return_archive(d2.remote_ref, CITY_B, "主送机关有误", "赵某").wait(5)

    signed, returned = ingested
    assert signed.receipt.remote_ref == d1.remote_ref
    assert (signed.receipt.action, signed.receipt.unit, signed.receipt.signer) == ("SIGNED", COUNTY_A, "李某")
    assert returned.receipt.remote_ref == d2.remote_ref
    assert (returned.receipt.action, returned.receipt.reason) == ("RETURNED", "主送机关有误")
    assert signed.key == f"box:{d1.remote_ref}:{COUNTY_A}:SIGN:{signed.receipt.receipt_no}"
    assert signed.receipt.time is not None and signed.receipt.time.tzinfo is not None
    (_, path, ct, body) = http_endpoint.requests[1]
    assert path == "/callbacks/box" and ct == "application/xml; charset=GB18030"
    assert "主送机关有误".encode("gb18030") in body
    assert exchange_box.state.counters["callbacks_sent"] == 2


def test_callback_is_retried_with_a_stable_key(exchange_box, http_endpoint, ctx, envelope) -> None:
    adapter = http_adapter(ctx, exchange_box.url)
    seen: list = []
    route = gateway_route(adapter, seen)
    calls = {"n": 0}

    def flaky(body: bytes, ct: str) -> tuple[int, bytes, str]:
        calls["n"] += 1
        status, out, out_ct = route(body, ct)
        # The first time the gateway "fails to commit" and answers 503: the box resends.
        return (503, b"", "text/plain") if calls["n"] == 1 else (status, out, out_ct)

    http_endpoint.handler = flaky
    exchange_box.box.callback_url = http_endpoint.url
    d = delivery(envelope)
    adapter.deliver(d)
    job = exchange_box.box.sign(d.remote_ref, COUNTY_A, "李某")
    assert job.wait(5) and job.attempts == 2
    assert len(seen) == 2 and seen[0].key == seen[1].key  # the gateway dedups by key
    assert exchange_box.state.counters["callback_failures"] == 1


def test_malformed_callback_is_a_clear_permanent_error(http_endpoint, ctx) -> None:
    adapter = http_adapter(ctx, "http://127.0.0.1:9")
    with pytest.raises(PermanentError, match=r"malformed receipt callback: receipt/@archiveid: missing"):
        adapter.handle_callback(b'<receipt action="SIGN"><unit trustorgno="1152230107CTPD8U2P"/></receipt>',
                                "application/xml")
    with pytest.raises(PermanentError, match="not well-formed"):
        adapter.handle_callback(b"<receipt", "application/xml")
    with pytest.raises(PermanentError, match="receipt/@action"):
        adapter.handle_callback((DATA / "receipt-sign.xml").read_bytes().replace(b'"SIGN"', b'"LOST"'),
                                "application/xml")
    # over real HTTP, the route answers 400 with a readable GB18030 reason
    ingested: list = []
    http_endpoint.handler = gateway_route(adapter, ingested)
    resp = requests.post(http_endpoint.url, data="<receipt/>".encode("gb18030"),
                         headers={"Content-Type": "application/xml; charset=GB18030"}, timeout=5)
    assert resp.status_code == 400 and ingested == []
    assert b"receipt/@action" in resp.content


def test_callback_without_declaration_uses_the_content_type_charset(ctx) -> None:
    adapter = http_adapter(ctx, "http://127.0.0.1:9")
    text = (DATA / "receipt-return.xml").read_bytes().decode("gb18030").split("?>", 1)[1]
    items, out, ct = adapter.handle_callback(text.encode("gb18030"), "text/xml; charset=GBK")
    assert items[0].receipt.reason == "主送机关有误，请核实后重发"
    assert out == '<?xml version="1.0" encoding="GB18030"?>\n<result code="0">OK</result>'.encode("gb18030")
    assert ct == "application/xml; charset=GB18030"
    assert list(adapter.poll()) == []  # http mode: receipts come by callback only


# -- folder mode ---------------------------------------------------------------------------
def snapshot(root: Path, skip: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip in p.parents or p == skip or p.is_dir():
            continue
        out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def test_folder_mode_end_to_end(tmp_path: Path, ctx, envelope) -> None:
    root = tmp_path / "box"
    root.mkdir()
    clerk = FolderClerk(root)
    adapter = folder_adapter(ctx, root)
    d = delivery(envelope)
    result = adapter.deliver(d)
    name = f"GW_{d.remote_ref}.xml"
    assert result.remote_id == d.remote_ref
    assert sorted(os.listdir(root / "inbox")) == [name, name + ".ok"]
    data = (root / "inbox" / name).read_bytes()
    assert "冬季值班".encode("gb18030") in data
    assert adapter.deliver(d).detail == f"already in inbox/{name}"  # retry: no second file

    written = clerk.process("SIGNED", signer="李某")
    assert [p.name for p in written] == [f"HZ_{d.remote_ref}_{COUNTY_A}.xml"]
    assert os.listdir(root / "inbox") == []
    assert (root / "archive" / name).read_bytes() == data
    assert "already taken" in adapter.deliver(d).detail  # still one effect
    assert os.listdir(root / "inbox") == []

    items = list(adapter.poll())
    assert len(items) == 1
    r = items[0].receipt
    assert (r.action, r.remote_ref, r.unit, r.signer) == ("SIGNED", d.remote_ref, COUNTY_A, "李某")
    items[0].ack()
    assert os.listdir(root / "outbox") == []
    assert (root / "archive" / written[0].name).exists() and (root / "archive" / (written[0].name + ".ok")).exists()
    assert list(adapter.poll()) == []
    items[0].ack()  # idempotent


def test_folder_crash_between_rename_and_ok(tmp_path: Path, ctx, envelope) -> None:
    root = tmp_path / "box"
    FolderClerk(root)
    adapter = folder_adapter(ctx, root)
    d = delivery(envelope)
    adapter.deliver(d)
    final = root / "inbox" / f"GW_{d.remote_ref}.xml"
    (root / "inbox" / (final.name + ".ok")).unlink()
    before = (final.read_bytes(), final.stat().st_mtime_ns)
    adapter.deliver(d)
    assert (final.read_bytes(), final.stat().st_mtime_ns) == before
    assert (root / "inbox" / (final.name + ".ok")).exists()


def test_folder_missing_is_retryable_and_nothing_is_created(tmp_path: Path, ctx, envelope) -> None:
    adapter = folder_adapter(ctx, tmp_path / "not-mounted")
    with pytest.raises(RetryableError, match="not mounted"):
        adapter.deliver(delivery(envelope))
    assert not (tmp_path / "not-mounted").exists()
    assert adapter.check().ok is False
    (tmp_path / "not-mounted").mkdir()
    assert adapter.check().ok is True


def test_hostile_outbox_names_are_rejected_and_nothing_outside_is_touched(
    tmp_path: Path, ctx, envelope, monkeypatch
) -> None:
    root = tmp_path / "box"
    clerk = FolderClerk(root)
    outbox = root / "outbox"
    # Files a '../' name would reach: one beside outbox/, one outside the folder.
    (root / "evil.xml").write_bytes(b"inside root")
    (root / "evil.xml.ok").touch()
    (tmp_path / "evil.xml").write_bytes(b"outside")
    (tmp_path / "evil.xml.ok").touch()
    outside = tmp_path / "secret.xml"
    outside.write_bytes(write_receipt(Receipt(COUNTY_A, "SIGNED", remote_ref="abc", receipt_no="1")))
    # Names that exist on disk but are not receipts of ours
    for bad in ("..evil.xml", "notes.xml"):
        (outbox / bad).write_bytes(b"<x/>")
        (outbox / (bad + ".ok")).touch()
    link = outbox / f"HZ_abc_{COUNTY_A}.xml"
    link.symlink_to(outside)
    (outbox / (link.name + ".ok")).touch()
    good = clerk.sign("ref-1", COUNTY_A, "李某")
    # a receipt whose content names another archive than its file name
    (outbox / f"HZ_ref-2_{COUNTY_A}.xml").write_bytes(good.read_bytes())
    (outbox / f"HZ_ref-2_{COUNTY_A}.xml.ok").touch()
    before_outside = snapshot(tmp_path, root)
    before_root_files = {p: p.read_bytes() for p in (root / "evil.xml", root / "evil.xml.ok")}

    adapter = folder_adapter(ctx, root)
    real_list = adapter._list_outbox
    # A hostile server/share can list names no local directory holds.
    monkeypatch.setattr(adapter, "_list_outbox",
                        lambda p: real_list(p) + ["../evil.xml", "../../evil.xml", "../evil.xml.ok",
                                                  "../../evil.xml.ok", "sub/x.xml"])
    items = list(adapter.poll())

    assert [i.receipt.remote_ref for i in items] == ["ref-1"]
    assert snapshot(tmp_path, root) == before_outside
    assert {p: p.read_bytes() for p in before_root_files} == before_root_files
    failed = sorted(os.listdir(root / "failed"))
    for bad in ("..evil.xml", "notes.xml", link.name, f"HZ_ref-2_{COUNTY_A}.xml"):
        assert {bad, bad + ".ok", bad + ".error"} <= set(failed), bad
    assert (root / "failed" / link.name).is_symlink()  # moved as a link, target untouched
    note = (root / "failed" / f"HZ_ref-2_{COUNTY_A}.xml.error").read_bytes().decode("gb18030")
    assert "not those of the file name" in note
    assert sorted(os.listdir(outbox)) == sorted([good.name, good.name + ".ok"])


def test_folder_keys_stable_across_instances_no_double_ingest(tmp_path: Path, ctx) -> None:
    root = tmp_path / "box"
    clerk = FolderClerk(root)
    clerk.sign("ref-1", COUNTY_A, "李某")
    clerk.return_archive("ref-2", CITY_B, "请核实", "赵某")
    a, b = folder_adapter(ctx, root), folder_adapter(ctx, root)

    ingested: dict[str, Receipt] = {}  # the gateway's key table

    def gateway_poll(adapter: XmlExchangeAdapter, crash_before_ack: bool = False) -> int:
        new = 0
        for item in adapter.poll():
            if item.key not in ingested:
                ingested[item.key] = item.receipt
                new += 1
            if not crash_before_ack:
                item.ack()
        return new

    assert [i.key for i in a.poll()] == [i.key for i in b.poll()]
    assert gateway_poll(a, crash_before_ack=True) == 2  # committed, then the process died
    assert gateway_poll(b) == 0  # the other instance sees the same keys: nothing new
    assert gateway_poll(a) == 0 and list(a.poll()) == []
    assert sorted(r.remote_ref for r in ingested.values()) == ["ref-1", "ref-2"]

    # the same file name with new content later (a new receipt) is a new key
    clerk.return_archive("ref-1", COUNTY_A, "重发有误", "李某")
    (item,) = a.poll()
    assert item.key not in ingested and item.key.startswith(f"box:file:HZ_ref-1_{COUNTY_A}.xml:")
    item.ack()
    assert len([n for n in os.listdir(root / "archive") if n.endswith(".xml")]) == 3  # none overwritten
    # and once more within the same second: the second kept copy does not replace the first
    clerk.return_archive("ref-1", COUNTY_A, "再次重发", "李某")
    (item,) = a.poll()
    item.ack()
    assert len([n for n in os.listdir(root / "archive") if n.endswith(".xml")]) == 4


def test_folder_reject_and_max_per_poll(tmp_path: Path, ctx) -> None:
    root = tmp_path / "box"
    clerk = FolderClerk(root)
    for i in range(3):
        clerk.sign(f"ref-{i}", COUNTY_A)
    adapter = folder_adapter(ctx, root, max_per_poll=2)
    first = list(adapter.poll())
    assert len(first) == 2
    first[0].reject("未知公文 unknown archive")
    first[1].ack()
    (last,) = adapter.poll()
    assert last.receipt.remote_ref == "ref-2"
    name = f"HZ_ref-0_{COUNTY_A}.xml"
    assert (root / "failed" / name).exists() and (root / "failed" / (name + ".ok")).exists()
    assert (root / "failed" / (name + ".error")).read_bytes().decode("gb18030") == "未知公文 unknown archive"


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"mode": "ftp"}, "mode"),
        ({"mode": "http"}, "address: missing"),
        ({"mode": "http", "address": "box.local"}, "not an http"),
        ({"mode": "http", "address": "http://b", "timeout": 0}, "timeout"),
        ({"mode": "http", "address": "http://b", "appids": {"x": 1}}, "appids"),
        ({"mode": "http", "address": "http://b", "ca_file": "nope.pem"}, "ca_file"),
        ({"mode": "folder"}, "folder: missing"),
        ({"mode": "folder", "folder": "x", "max_per_poll": 0}, "max_per_poll"),
    ],
)
def test_config_errors_name_the_key(ctx, cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as ei:
        create("box", {"type": "xml-exchange", **cfg}, ctx)
    assert str(ei.value).startswith("adapters.box.")


# -- the simulators themselves -------------------------------------------------------------
@pytest.mark.parametrize(
    "body, status, match",
    [
        (b"<archive", 400, "invalid XML"),
        (b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><archive/>', 400, "DOCTYPE"),
        (b'<archive action="sendArchive"/>', 400, "archiveid"),
    ],
)
def test_box_answers_400_with_a_receipt_like_error(exchange_box, body: bytes, status: int, match: str) -> None:
    resp = requests.post(exchange_box.url + "/ArchiveHandleServlet", data=body,
                         headers={"Content-Type": "application/xml; charset=GB18030"}, timeout=5)
    assert resp.status_code == status
    assert resp.headers["Content-Type"] == "application/xml; charset=GB18030"
    root = xmlsafe.parse(resp.content)
    assert (root.tag, root.get("action"), root.find("error").get("code")) == ("receipt", "ERROR", str(status))
    assert match in root.findtext("error")
    assert exchange_box.state.counters["rejected"] == 1 and exchange_box.state.archives == {}


def test_box_auto_sign_pushes_a_sign_receipt(exchange_box, http_endpoint, ctx, envelope) -> None:
    adapter = http_adapter(ctx, exchange_box.url)
    ingested: list = []
    http_endpoint.handler = gateway_route(adapter, ingested)
    exchange_box.box.callback_url = http_endpoint.url
    exchange_box.box.auto_sign, exchange_box.box.auto_sign_delay = True, 0.01
    d = delivery(envelope)
    adapter.deliver(d)
    adapter.deliver(d)  # a duplicate is not signed twice
    deadline = time.monotonic() + 5
    while not exchange_box.state.callbacks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [job.wait(1) for job in exchange_box.state.callbacks] == [True]
    assert [(i.receipt.action, i.receipt.remote_ref) for i in ingested] == [("SIGNED", d.remote_ref)]
    with pytest.raises(ValueError, match="already SIGNED"):
        exchange_box.box.return_archive(d.remote_ref, COUNTY_A, "too late")


def test_folder_clerk_refuses_a_tampered_archive(tmp_path: Path, ctx, envelope) -> None:
    root = tmp_path / "box"
    clerk = FolderClerk(root)
    d = delivery(envelope)
    folder_adapter(ctx, root).deliver(d)
    name = f"GW_{d.remote_ref}.xml"
    path = root / "inbox" / name
    path.write_bytes(path.read_bytes().replace(b'size="34"', b'size="35"'))
    assert clerk.take() == []
    assert {name, name + ".ok", name + ".error"} <= set(os.listdir(root / "failed"))
    with pytest.raises(PermanentError, match="the box rejected"):
        folder_adapter(ctx, root).deliver(d)  # redelivering the same would fail the same way
    # and the poll reports it: the copy fails with the box's note as its reason
    adapter = folder_adapter(ctx, root)
    [item] = [i for i in adapter.poll() if i.receipt is not None and i.receipt.action == "REFUSED"]
    assert item.receipt.remote_ref == d.remote_ref and item.receipt.reason
    note = (root / "failed" / (name + ".error")).read_bytes().decode("gb18030").strip()
    assert item.receipt.reason == note[:2000]
    item.ack()
    old = time.time() - 3600  # notes older than the newest one taken are not read again
    os.utime(root / "failed" / (name + ".error"), (old, old))
    assert [i for i in adapter.poll() if i.receipt is not None and i.receipt.action == "REFUSED"] == []


def test_a_refusal_note_for_no_copy_of_ours_is_not_read_again_once_refused(tmp_path: Path, ctx) -> None:
    """A note the gateway refuses (it names no copy of this node's: the ingest refuses it again
    each time it sees it) raises the mark like one taken: refused notes must not be read and
    refused on every poll for ever, each taking a place of max_per_poll from newer notes."""
    root = tmp_path / "box"
    FolderClerk(root)
    note = root / "failed" / "GW_stray-1.xml.error"
    note.write_bytes("不是本系统的文件".encode("gb18030"))
    then = time.time() - 100
    os.utime(note, (then, then))
    adapter = folder_adapter(ctx, root)
    [item] = [i for i in adapter.poll() if i.receipt is not None and i.receipt.action == "REFUSED"]
    item.reject("no delivery through adapter box matches the receipt")
    assert ctx.state.get("refused-mtime") == str(int(then))
    old = then - 3600  # notes older than the mark are not read again
    os.utime(note, (old, old))
    assert [i for i in adapter.poll() if i.receipt is not None and i.receipt.action == "REFUSED"] == []
