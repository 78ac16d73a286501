"""The SFTP drop adapter against a real, private OpenSSH server (and, where marked, against
the in-process simulator, to prove it keeps the same contract). Legacy contract: README §2."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import threading
import time
import tracemalloc
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paramiko
import pytest

from adapters import archive
from adapters.base import (
    AdapterContext,
    ConfigError,
    Delivery,
    PermanentError,
    RetryableError,
)
from adapters import sftp as sftp_adapter
from adapters.sftp import HostKeyMismatch, SftpAdapter, fingerprint, parse_public_key
from adapters.simulators.sftp_server import (
    DropSFTPInterface,
    LegacySftpClerk,
    generate_host_key,
    public_line,
)
from gateway import xmlsafe
from gateway.blobs import BlobStore
from gateway.envelope import Attachment, Envelope, Receipt, validate
from tests.plugins.sshd import SftpEndpoint, give_to
from tests.plugins.tcpproxy import TcpProxy

pytestmark = pytest.mark.sshd

DATA = Path(__file__).parent / "data"
UNIT_A = "1152230107CTPD8U2P"  # 甲县人民政府办公室
UNIT_B = "11522302GRALUMYP76"  # 乙市人民政府办公室
PREFECTURE_EMERGENCY = "11522300QNNHM83X1E"


# -- fixtures ----------------------------------------------------------------------------------
class DictState:
    """The StateStore protocol, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def set(self, key: str, value: str) -> None:
        self.values[key] = value

    def advance(self, key: str, value: int) -> None:
        if value > int(self.get(key) or "0"):
            self.set(key, str(value))


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def context(blobs: BlobStore, tmp_path: Path) -> AdapterContext:
    return AdapterContext(blobs=blobs, state=DictState(), base_dir=tmp_path)


class Drop:
    """One test's own folder on an SFTP server, with unit folders A and B."""

    def __init__(self, endpoint: SftpEndpoint) -> None:
        self.endpoint = endpoint
        self.sub = f"t-{uuid.uuid4().hex[:12]}"
        self.local = endpoint.data_root / self.sub
        for unit in (UNIT_A, UNIT_B):
            for folder in ("inbox", "outbox"):
                (self.local / unit / folder).mkdir(parents=True)

    def config(self, **overrides: Any) -> dict[str, Any]:
        return self.endpoint.adapter_config(self.sub, **{"units": [UNIT_A, UNIT_B], **overrides})

    def folder(self, unit: str, name: str) -> Path:
        return self.local / unit / name

    def listing(self, unit: str, name: str) -> list[str]:
        d = self.folder(unit, name)
        return sorted(os.listdir(d)) if d.exists() else []

    def clerk(self) -> LegacySftpClerk:
        return LegacySftpClerk(self.local, units=[UNIT_A, UNIT_B])


@pytest.fixture
def drop(openssh_server: SftpEndpoint) -> Drop:
    return Drop(openssh_server)


@pytest.fixture(params=["openssh", "in-process"])
def any_drop(request: pytest.FixtureRequest) -> Drop:
    """The same test against real OpenSSH and against the in-process simulator."""
    name = "openssh_server" if request.param == "openssh" else "sftp_drop_server"
    return Drop(request.getfixturevalue(name))


@pytest.fixture
def make_adapter(context: AdapterContext) -> Iterator[Callable[..., SftpAdapter]]:
    made: list[SftpAdapter] = []

    def make(config: dict[str, Any], name: str = "countydrop") -> SftpAdapter:
        adapter = SftpAdapter(name, config, context)
        made.append(adapter)
        return adapter

    yield make
    for a in made:
        a.close()


def make_delivery(
    blobs: BlobStore,
    unit: str = UNIT_A,
    body: bytes | None = None,
    attachment: Attachment | None = None,
) -> Delivery:
    env = Envelope.from_xml((DATA / "envelope-document.xml").read_bytes())
    env.message_id = str(uuid.uuid4())
    sha, size = blobs.put_bytes(
        body if body is not None else "关于值班的通知正文".encode() + os.urandom(64)
    )
    env.attachments = [Attachment("body", "正文.ofd", size, sha, "application/ofd")]
    if attachment is not None:
        env.attachments.append(attachment)
    recipient = next(r for r in env.recipients if r.unit == unit)
    return Delivery(message_id=env.message_id, recipient=recipient, envelope=env)


def receipt_bytes(ref: str, unit: str = UNIT_A, action: str = "SIGNED") -> bytes:
    """A legacy receipt file; the same bytes for the same arguments."""
    signed = datetime(2026, 11, 20, 10, 15, tzinfo=archive.CHINA_TZ)
    return archive.write_receipt(
        Receipt(
            unit=unit,
            action=action,
            remote_ref=ref,
            signer="李某",
            time=signed,
            receipt_no="JXF-2026-0002",
        )
    )


def put_outbox(
    drop: Drop, name: str, data: bytes, *, unit: str = UNIT_A, done: bool = True
) -> Path:
    path = drop.folder(unit, "outbox") / name
    path.write_bytes(data)
    if done:
        path.with_name(name + ".ok").touch()
    return path


@pytest.fixture
def proxy(openssh_server: SftpEndpoint) -> Iterator[TcpProxy]:
    p = TcpProxy(openssh_server.port)
    yield p
    p.close()


class RandomStream(io.RawIOBase):
    """``size`` random bytes, produced as read, never held whole."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = os.urandom(n)
        self.left -= n
        return n


def file_contents_sha256(path: Path, chunk: int = 4 * 1024 * 1024) -> list[str]:
    """SHA-256 of each ``<file>`` element's decoded base64 content, streaming the archive
    from disk (the real parser refuses a 270 MB text node, rightly)."""
    digests: list[str] = []
    with open(path, "rb") as fh:
        buf = b""
        state = "outside"
        pending = b""
        digest = hashlib.sha256()
        while True:
            data = fh.read(chunk)
            buf += data
            while True:
                if state == "outside":
                    i = buf.find(b"<file ")
                    if i < 0:
                        buf = buf[-8:]
                        break
                    j = buf.find(b">", i)
                    if j < 0:
                        buf = buf[i:]
                        break
                    buf, state, digest, pending = buf[j + 1 :], "inside", hashlib.sha256(), b""
                else:
                    k = buf.find(b"<")
                    text = pending + b"".join((buf if k < 0 else buf[:k]).split())
                    cut = len(text) - len(text) % 4
                    digest.update(base64.b64decode(text[:cut]))
                    pending = text[cut:]
                    if k < 0:
                        buf = b""
                        break
                    digest.update(base64.b64decode(pending))
                    digests.append(digest.hexdigest())
                    buf, state = buf[k:], "outside"
            if not data:
                return digests


# -- deliver -----------------------------------------------------------------------------------
def test_deliver_writes_gb18030_archive_then_done_file(
    drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    adapter = make_adapter(drop.config())
    body = "正文：关于做好冬季值班工作的通知".encode() + os.urandom(300)
    d = make_delivery(blobs, body=body)

    result = adapter.deliver(d)

    name = f"GW_{d.remote_ref}.xml"
    assert result.remote_id == d.remote_ref
    assert drop.listing(UNIT_A, "inbox") == [name, name + ".ok"]  # no .part left behind
    assert (drop.folder(UNIT_A, "inbox") / (name + ".ok")).stat().st_size == 0
    data = (drop.folder(UNIT_A, "inbox") / name).read_bytes()
    assert data.startswith(b'<?xml version="1.0" encoding="GB18030"?>')
    assert "关于做好2026年冬季值班".encode("gb18030") in data
    root = xmlsafe.parse(data)
    assert root.get("archiveid") == d.remote_ref
    assert [r.get("trustorgno") for r in root.findall("receivers/receiver")] == [UNIT_A]
    _, files = archive.read_archive(data)
    assert [content for _, content in files] == [body]
    assert drop.listing(UNIT_B, "inbox") == []


def test_redelivery_has_no_second_effect(drop: Drop, blobs: BlobStore, make_adapter) -> None:
    adapter = make_adapter(drop.config())
    d = make_delivery(blobs)
    adapter.deliver(d)
    target = drop.folder(UNIT_A, "inbox") / f"GW_{d.remote_ref}.xml"
    before = target.stat()

    again = make_adapter(drop.config()).deliver(d)  # e.g. a worker retrying after a crash

    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "already" in again.detail and again.remote_id == d.remote_ref
    assert drop.listing(UNIT_A, "inbox") == [target.name, target.name + ".ok"]

    # Once the legacy system took it into archive/, a retry must not put it back in the inbox.
    assert [t.ref for t in drop.clerk().take_inbox()] == [d.remote_ref]
    adapter.deliver(d)
    assert drop.listing(UNIT_A, "inbox") == []


def test_a_document_the_legacy_reader_refused_fails_with_its_note(
    drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    """The reader moves a file it cannot take to failed/ beside NAME.error (legacy README §2):
    the copy must fail with that reason, not count as delivered."""
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    d = make_delivery(blobs)
    adapter.deliver(d)
    name = f"GW_{d.remote_ref}.xml"
    failed = drop.folder(UNIT_A, "failed")
    failed.mkdir(exist_ok=True)
    for n in (name, name + ".ok"):
        (drop.folder(UNIT_A, "inbox") / n).rename(failed / n)
    (failed / (name + ".error")).write_bytes("发文字号格式错误，无法登记".encode("gb18030"))

    with pytest.raises(PermanentError, match="refused.*发文字号格式错误"):
        adapter.deliver(d)  # a retry after a crash: not "already taken"
    [item] = adapter.poll()
    r = item.receipt
    assert r is not None and (r.action, r.remote_ref, r.unit) == ("REFUSED", d.remote_ref, UNIT_A)
    assert r.reason == "发文字号格式错误，无法登记"
    assert item.key == make_adapter(drop.config(units=[UNIT_A])).poll()[0].key  # stable across restarts
    item.ack()
    # taken: read again at most while in the same second as the newest note taken (the key
    # then keeps it from being applied twice); older notes are not read at all
    assert [i.key for i in adapter.poll()] in ([], [item.key])
    old = time.time() - 3600
    os.utime(failed / (name + ".error"), (old, old))
    assert adapter.poll() == []
    assert sorted(p.name for p in failed.iterdir()) == sorted([name, name + ".ok", name + ".error"])  # left alone


def test_redelivery_completes_a_missing_done_file(
    drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    adapter = make_adapter(drop.config())
    d = make_delivery(blobs)
    adapter.deliver(d)
    ok = drop.folder(UNIT_A, "inbox") / f"GW_{d.remote_ref}.xml.ok"
    ok.unlink()  # as if the process died between the rename and the done file

    adapter.deliver(d)

    assert ok.exists()


def test_connection_cut_mid_upload_leaves_no_final_file_and_retry_succeeds(
    drop: Drop, blobs: BlobStore, make_adapter, proxy: TcpProxy
) -> None:
    big = os.urandom(6 * 1024 * 1024)
    d = make_delivery(blobs, body=big)
    adapter = make_adapter(drop.config(port=proxy.port, so_timeout=10))
    proxy.cut_after = 2 * 1024 * 1024  # about a quarter of the 8 MB archive gets through
    final = drop.folder(UNIT_A, "inbox") / f"GW_{d.remote_ref}.xml"

    with pytest.raises(RetryableError) as cut:
        adapter.deliver(d)

    assert proxy.cuts == 1, cut.value
    assert not final.exists() and not Path(f"{final}.ok").exists()
    leftovers = drop.listing(UNIT_A, "inbox")
    assert leftovers in ([], [final.name + ".part"])
    if leftovers:
        assert (drop.folder(UNIT_A, "inbox") / leftovers[0]).stat().st_size < len(big)

    proxy.cut_after = None
    adapter.deliver(d)  # the same adapter reconnects by itself, straight away

    assert drop.listing(UNIT_A, "inbox") == [final.name, final.name + ".ok"]
    _, files = archive.read_archive(final.read_bytes())
    assert files[0][1] == big
    assert proxy.connections == 2


def test_a_drop_that_refuses_deletes_takes_deliveries(
    openssh_server_refusing_deletes: SftpEndpoint, blobs: BlobStore, make_adapter
) -> None:
    """The contract needs write and rename only; nothing is deleted when nothing is left over."""
    drop = Drop(openssh_server_refusing_deletes)
    d = make_delivery(blobs)

    make_adapter(drop.config()).deliver(d)

    assert drop.listing(UNIT_A, "inbox") == [f"GW_{d.remote_ref}.xml", f"GW_{d.remote_ref}.xml.ok"]


def test_two_deliveries_share_one_connection(
    drop: Drop, blobs: BlobStore, make_adapter, proxy: TcpProxy
) -> None:
    adapter = make_adapter(drop.config(port=proxy.port))
    adapter.deliver(make_delivery(blobs))
    first = adapter.transport
    adapter.deliver(make_delivery(blobs, unit=UNIT_B))

    assert adapter.transport is first and first is not None and first.is_active()
    assert adapter.connections_opened == 1
    assert proxy.connections == 1
    assert len(drop.listing(UNIT_A, "inbox")) == len(drop.listing(UNIT_B, "inbox")) == 2


@pytest.mark.parametrize("bad_unit", ["../1152230107CTPD8U2P", "UNIT/x", "a\x00b", "A_B"])
def test_unusable_names_are_permanent_errors(
    drop: Drop, blobs: BlobStore, make_adapter, bad_unit: str
) -> None:
    adapter = make_adapter(drop.config())
    d = make_delivery(blobs)
    d.recipient.unit = bad_unit

    with pytest.raises(PermanentError):
        adapter.deliver(d)

    assert not any(p.name.startswith("GW_") for p in drop.local.rglob("*"))


def test_missing_blob_is_permanent(drop: Drop, blobs: BlobStore, make_adapter) -> None:
    d = make_delivery(blobs)
    d.envelope.attachments[0].sha256 = hashlib.sha256(b"never stored").hexdigest()

    with pytest.raises(PermanentError, match="not available"):
        make_adapter(drop.config()).deliver(d)

    assert drop.listing(UNIT_A, "inbox") == []


def test_large_attachment_is_streamed_with_bounded_memory(
    drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    size = 200 * 1024 * 1024
    sha, _ = blobs.put_stream(io.BufferedReader(RandomStream(size), 1 << 20))
    d = make_delivery(
        blobs, attachment=Attachment("attachment", "附件1.pdf", size, sha, "application/pdf")
    )
    adapter = make_adapter(drop.config())
    adapter.check()  # connect first: the measurement is about the transfer

    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        result = adapter.deliver(d)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    final = drop.folder(UNIT_A, "inbox") / f"GW_{d.remote_ref}.xml"
    written = final.stat().st_size
    print(
        f"\n200 MB attachment: {written / 1e6:.0f} MB archive in {elapsed:.1f} s "
        f"({written / elapsed / 1e6:.0f} MB/s), traced peak {peak / 2**20:.1f} MiB"
    )
    # Several archive chunks (2 MiB each) may be alive at once; a whole-file read would be
    # 200 MiB plus its 270 MiB encoding.
    assert peak < 32 * 2**20
    assert str(written) in result.detail
    body_sha = d.envelope.attachments[0].sha256
    assert file_contents_sha256(final) == [body_sha, sha]


# -- host key pinning --------------------------------------------------------------------------
def test_changed_host_key_is_refused_naming_both_fingerprints(
    drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    other = generate_host_key()
    adapter = make_adapter(drop.config(host_key=public_line(other)))
    real = parse_public_key(drop.endpoint.host_key_line)

    with pytest.raises(HostKeyMismatch) as err:
        adapter.deliver(make_delivery(blobs))

    assert isinstance(err.value, PermanentError)
    assert fingerprint(real) in str(err.value) and fingerprint(other) in str(err.value)
    health = adapter.check()
    assert not health.ok and "HOST KEY MISMATCH" in health.message
    assert drop.listing(UNIT_A, "inbox") == []


def test_server_without_a_pinned_key_type_is_refused(drop: Drop, make_adapter) -> None:
    rsa = paramiko.RSAKey.generate(1024)  # sshd here only has an ed25519 host key
    adapter = make_adapter(drop.config(host_key=public_line(rsa)))

    health = adapter.check()

    assert not health.ok and fingerprint(rsa) in health.message


def test_known_hosts_file_pins_or_refuses(drop: Drop, tmp_path: Path, make_adapter) -> None:
    ep = drop.endpoint
    known = tmp_path / "known_hosts"
    known.write_text(f"[{ep.host}]:{ep.port} {ep.host_key_line}\n")
    cfg = drop.config(known_hosts_file=str(known))
    del cfg["host_key"]
    assert make_adapter(cfg).check().ok

    known.write_text(f"otherhost {ep.host_key_line}\n")  # no entry for this server: unknown
    with pytest.raises(HostKeyMismatch, match="no host key is pinned"):
        make_adapter(cfg).deliver(make_delivery(BlobStore(tmp_path / "b2")))


def test_check_reports_latency(drop: Drop, make_adapter) -> None:
    health = make_adapter(drop.config()).check()
    assert health.ok and health.latency_ms is not None and health.latency_ms >= 0


def test_check_names_a_units_missing_folder(drop: Drop, make_adapter) -> None:
    """A unit whose outbox is missing has its receipts never collected, one whose inbox is
    missing fails every delivery: `gateway adapters check` says so before either happens."""
    shutil.rmtree(drop.local / UNIT_B / "outbox")
    health = make_adapter(drop.config()).check()
    assert not health.ok
    assert f"{drop.sub}/{UNIT_B}/outbox" in health.message and "1 unit folder(s) do not exist" in health.message
    assert f"{UNIT_A}/" not in health.message


def test_configuration_errors_name_the_key(drop: Drop, context: AdapterContext) -> None:
    cfg = drop.config()
    del cfg["host_key"]
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.host_key"):
        SftpAdapter("countydrop", cfg, context)
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.read_lock"):
        SftpAdapter("countydrop", drop.config(read_lock="whenever"), context)
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.inbox"):
        SftpAdapter("countydrop", drop.config(inbox="../{unit}/inbox"), context)
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.units\[0\]"):
        SftpAdapter("countydrop", drop.config(units=["NOTAUNIT"]), context)
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.port"):
        SftpAdapter("countydrop", drop.config(port="22"), context)
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.readLock: unknown"):
        SftpAdapter("countydrop", drop.config(readLock="stable-size"), context)


# -- poll ----------------------------------------------------------------------------------------
def test_poll_takes_only_finished_receipts_and_ack_archives_them(
    any_drop: Drop, make_adapter
) -> None:
    drop = any_drop
    ref, unfinished_ref = str(uuid.uuid4()), str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    put_outbox(drop, name, receipt_bytes(ref))
    put_outbox(drop, f"HZ_{unfinished_ref}_{UNIT_A}.xml", receipt_bytes(unfinished_ref), done=False)
    adapter = make_adapter(drop.config())

    items = adapter.poll()

    assert len(items) == 1
    item = items[0]
    assert item.receipt is not None and item.envelope is None
    assert (item.receipt.remote_ref, item.receipt.unit, item.receipt.action) == (
        ref,
        UNIT_A,
        "SIGNED",
    )
    assert item.receipt.signer == "李某"
    digest = hashlib.sha256(receipt_bytes(ref)).hexdigest()
    assert item.key == f"countydrop:{UNIT_A}/outbox/{name}:{digest}"

    item.ack()

    assert drop.listing(UNIT_A, "archive") == [name, name + ".ok"]
    assert drop.listing(UNIT_A, "outbox") == [f"HZ_{unfinished_ref}_{UNIT_A}.xml"]
    assert adapter.poll() == []
    item.ack()  # a repeated ack (the gateway crashed after the first) is harmless


def test_round_trip_with_the_legacy_clerk(any_drop: Drop, blobs: BlobStore, make_adapter) -> None:
    adapter = make_adapter(any_drop.config())
    d = make_delivery(blobs, unit=UNIT_B)
    adapter.deliver(d)
    clerk = any_drop.clerk()
    assert [(t.unit, t.ref) for t in clerk.take_inbox()] == [(UNIT_B, d.remote_ref)]
    clerk.return_document(d.remote_ref, UNIT_B, "文号有误，请更正后重发")

    [item] = adapter.poll()

    assert item.receipt is not None
    assert (item.receipt.action, item.receipt.reason) == ("RETURNED", "文号有误，请更正后重发")
    assert item.receipt.remote_ref == d.remote_ref
    item.ack()
    assert any_drop.listing(UNIT_B, "outbox") == []


def test_reject_moves_to_failed_with_the_reason(drop: Drop, make_adapter) -> None:
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    put_outbox(drop, name, receipt_bytes(ref))
    [item] = make_adapter(drop.config()).poll()

    item.reject("no delivery with this reference 无此公文")

    assert drop.listing(UNIT_A, "failed") == [name, name + ".error", name + ".ok"]
    note = (drop.folder(UNIT_A, "failed") / (name + ".error")).read_text("gb18030")
    assert "无此公文" in note
    assert drop.listing(UNIT_A, "outbox") == []


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"<receipt action='SIGN'", "not well-formed"),
        (b"<?xml version='1.0' encoding='GB18030'?><receipt action='LOST' archiveid='x'/>", "LOST"),
        (None, "the name says document"),  # a valid receipt, but for another document
    ],
    ids=["malformed-xml", "unknown-action", "name-content-mismatch"],
)
def test_unreadable_receipt_goes_to_failed_at_once(
    drop: Drop, make_adapter, content: bytes | None, reason: str
) -> None:
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    put_outbox(drop, name, content if content is not None else receipt_bytes(str(uuid.uuid4())))

    assert make_adapter(drop.config()).poll() == []

    assert drop.listing(UNIT_A, "failed") == [name, name + ".error", name + ".ok"]
    assert reason in (drop.folder(UNIT_A, "failed") / (name + ".error")).read_text("gb18030")


@pytest.mark.parametrize(("timezone", "expected"), [(None, "2026-11-26T16:30:00+00:00"),
                                                     ("UTC", "2026-11-27T00:30:00+00:00")])
def test_a_receipt_time_without_an_offset_is_local_time_of_the_adapter_zone(
        drop: Drop, make_adapter, timezone: str | None, expected: str) -> None:
    """``00:30`` on 27 November as the drop's clerk wrote it: Beijing time unless the adapter
    says its legacy system keeps another zone; a bare date is no time and goes to failed/."""
    ref, dated = str(uuid.uuid4()), str(uuid.uuid4())
    for r, stamp in ((ref, b"2026-11-27T00:30:00"), (dated, b"2026-11-27")):
        put_outbox(drop, f"HZ_{r}_{UNIT_A}.xml", receipt_bytes(r).replace(b"2026-11-20T10:15:00+08:00", stamp))
    [item] = make_adapter(drop.config(**({"timezone": timezone} if timezone else {}))).poll()
    assert item.receipt is not None and item.receipt.remote_ref == ref
    assert item.receipt.time is not None and item.receipt.time.astimezone(UTC).isoformat() == expected
    note = (drop.folder(UNIT_A, "failed") / f"HZ_{dated}_{UNIT_A}.xml.error").read_text("gb18030")
    assert "receipt/time" in note and "'2026-11-27' is not a date and time" in note


def test_max_per_poll_bounds_each_poll(drop: Drop, make_adapter) -> None:
    for unit in (UNIT_A, UNIT_B):
        for _ in range(3):
            ref = str(uuid.uuid4())
            put_outbox(drop, f"HZ_{ref}_{unit}.xml", receipt_bytes(ref, unit), unit=unit)
    adapter = make_adapter(drop.config(max_per_poll=4))

    sizes = []
    for _ in range(3):
        items = adapter.poll()
        sizes.append(len(items))
        for item in items:
            item.ack()

    assert sizes == [4, 2, 0]


def put_receipts(drop: Drop, count: int, unit: str = UNIT_A) -> set[str]:
    """``count`` finished receipts in ``unit``'s outbox; their remote refs."""
    refs = {str(uuid.uuid4()) for _ in range(count)}
    sample = str(uuid.uuid4())
    template = receipt_bytes(sample, unit)
    for ref in refs:
        put_outbox(drop, f"HZ_{ref}_{unit}.xml", template.replace(sample.encode(), ref.encode()), unit=unit)
    return refs


def test_a_crowded_outbox_costs_a_poll_only_what_it_takes(drop: Drop, make_adapter) -> None:
    """A thousand waiting: a poll reads the folder a batch at a time and stops once it has
    max_per_poll files, instead of holding the whole listing (~1 KB an entry)."""
    put_receipts(drop, 1000)
    adapter = make_adapter(drop.config(max_per_poll=10))
    adapter.check()  # connected before measuring

    tracemalloc.start()
    try:
        items = adapter.poll()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert len(items) == 10
    assert peak < 512 * 1024, f"a poll of 10 files held {peak} bytes"


def test_every_waiting_file_is_reached_even_while_none_is_acknowledged(drop: Drop, make_adapter) -> None:
    """Each poll goes on where the previous one stopped in the folder, so files that stay
    (their ack refused, their ingest failing) never hold the rest back."""
    refs = put_receipts(drop, 30)
    adapter = make_adapter(drop.config(units=[UNIT_A], max_per_poll=10))

    polls = [[i.receipt.remote_ref for i in adapter.poll() if i.receipt] for _ in range(3)]

    assert [len(p) for p in polls] == [10, 10, 10]
    assert set(polls[0]) | set(polls[1]) | set(polls[2]) == refs  # all 30, none twice
    assert len(adapter.poll()) == 10  # the next pass starts again at the top


def test_a_backlog_drained_in_small_polls_is_collected_exactly_once(drop: Drop, make_adapter) -> None:
    """Many files and small polls: passes carried from poll to poll and begun anew within
    one, a file and its .ok in different READDIR batches; each file is collected exactly
    once, nothing is left."""
    refs = put_receipts(drop, 120)
    adapter = make_adapter(drop.config(units=[UNIT_A], max_per_poll=3))

    seen: list[str] = []
    for _ in range(100):
        items = adapter.poll()
        if not items:
            break
        for item in items:
            assert item.receipt is not None
            seen.append(item.receipt.remote_ref)
            item.ack()

    assert sorted(seen) == sorted(refs)
    assert drop.listing(UNIT_A, "outbox") == [] and len(drop.listing(UNIT_A, "archive")) == 240


def test_a_done_file_without_its_file_is_moved_away_after_its_grace_period(drop: Drop, make_adapter) -> None:
    orphan = f"HZ_{uuid.uuid4()}_{UNIT_A}.xml"  # its file gone (deleted by hand)
    cut_short = f"HZ_{uuid.uuid4()}_{UNIT_A}.xml"  # an ack that moved the file, not yet its .ok
    (drop.folder(UNIT_A, "outbox") / f"{orphan}.ok").touch()
    (drop.folder(UNIT_A, "outbox") / f"{cut_short}.ok").touch()
    drop.folder(UNIT_A, "archive").mkdir()
    (drop.folder(UNIT_A, "archive") / cut_short).write_bytes(receipt_bytes(cut_short[3:39]))
    ref = str(uuid.uuid4())
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", receipt_bytes(ref))
    adapter = make_adapter(drop.config(units=[UNIT_A], orphan_seconds=0.3))

    first = adapter.poll()  # another reader may be between its two renames: left for now
    assert [i.receipt.remote_ref for i in first if i.receipt] == [ref]
    assert drop.listing(UNIT_A, "outbox") == sorted([f"{orphan}.ok", f"{cut_short}.ok",
                                                     f"HZ_{ref}_{UNIT_A}.xml", f"HZ_{ref}_{UNIT_A}.xml.ok"])
    time.sleep(0.35)
    assert adapter.poll() != []  # the receipt, not acknowledged, again; the done files go

    assert drop.listing(UNIT_A, "outbox") == [f"HZ_{ref}_{UNIT_A}.xml", f"HZ_{ref}_{UNIT_A}.xml.ok"]
    assert drop.listing(UNIT_A, "archive") == [cut_short, f"{cut_short}.ok"]
    assert drop.listing(UNIT_A, "failed") == [f"{orphan}.error", f"{orphan}.ok"]
    note = (drop.folder(UNIT_A, "failed") / f"{orphan}.error").read_text("gb18030")
    assert f"{orphan}.ok was in the outbox without {orphan}" in note


def test_a_stale_upload_is_reported_and_left_alone(
    drop: Drop, make_adapter, caplog: pytest.LogCaptureFixture
) -> None:
    stale, fresh = drop.folder(UNIT_A, "outbox") / "HZ_old.xml.part", drop.folder(UNIT_A, "outbox") / "HZ_new.xml.part"
    stale.write_bytes(b"<receipt")
    fresh.write_bytes(b"<receipt")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    adapter = make_adapter(drop.config())
    assert "HZ_old" not in adapter.check().message

    assert adapter.poll() == []

    health = adapter.check()
    assert health.ok and f"1 in {drop.local}/{UNIT_A}/outbox (e.g. HZ_old.xml.part)" in health.message
    assert "HZ_new" not in health.message
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "HZ_old.xml.part" in record.message and "left alone" in record.message
    assert drop.listing(UNIT_A, "outbox") == ["HZ_new.xml.part", "HZ_old.xml.part"]


def test_same_file_has_the_same_key_after_a_restart(drop: Drop, make_adapter) -> None:
    ref = str(uuid.uuid4())
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", receipt_bytes(ref))
    first = make_adapter(drop.config()).poll()
    # The process "dies" after the gateway committed the key but before the ack:
    restarted = make_adapter(drop.config())
    again = restarted.poll()

    assert [i.key for i in again] == [i.key for i in first] and len(first) == 1
    again[0].ack()
    assert make_adapter(drop.config()).poll() == []


def test_symlink_in_outbox_is_never_followed(drop: Drop, make_adapter, tmp_path: Path) -> None:
    ref = str(uuid.uuid4())
    secret = tmp_path / "secret.xml"  # outside the drop, and a valid receipt
    secret.write_bytes(receipt_bytes(ref))
    name = f"HZ_{ref}_{UNIT_A}.xml"
    link = drop.folder(UNIT_A, "outbox") / name
    link.symlink_to(secret)
    link.with_name(name + ".ok").touch()

    assert make_adapter(drop.config()).poll() == []

    moved = drop.folder(UNIT_A, "failed") / name
    assert moved.is_symlink()  # the link itself was moved, its target left alone
    assert secret.read_bytes() == receipt_bytes(ref)
    assert "symlink" in (drop.folder(UNIT_A, "failed") / (name + ".error")).read_text()


def test_a_name_that_is_not_utf8_is_passed_over_and_the_rest_collected(drop: Drop, make_adapter) -> None:
    """The legacy side may name a file in GB18030; paramiko's own listing fails on such a name."""
    ref = str(uuid.uuid4())
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", receipt_bytes(ref))
    odd = "HZ_回执_测试.xml".encode("gb18030")
    drop.folder(UNIT_A, "failed").mkdir()
    for folder in ("outbox", "failed"):
        for name in (odd, odd + b".ok", b"GW_" + odd[3:] + b".error"):
            with open(os.path.join(bytes(drop.folder(UNIT_A, folder)), name), "wb") as fh:
                fh.write(b"<x/>")

    items = make_adapter(drop.config()).poll()

    assert [i.receipt.remote_ref for i in items if i.receipt] == [ref]
    assert odd in os.listdir(bytes(drop.folder(UNIT_A, "outbox")))  # left where it is, untouched


# -- a server that refuses (its SFTP user may not read or write a folder) ----------------------
@pytest.fixture
def own_drop(unprivileged_openssh_server: SftpEndpoint) -> Iterator[Drop]:
    d = Drop(unprivileged_openssh_server)
    give_to(unprivileged_openssh_server, d.local)
    yield d
    for p in [d.local, *d.local.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def test_an_outbox_the_server_will_not_list_does_not_stop_the_other_units(
    own_drop: Drop, make_adapter, caplog: pytest.LogCaptureFixture
) -> None:
    ref = str(uuid.uuid4())
    put_outbox(own_drop, f"HZ_{ref}_{UNIT_B}.xml", receipt_bytes(ref, UNIT_B), unit=UNIT_B)
    own_drop.folder(UNIT_A, "outbox").chmod(0)

    items = make_adapter(own_drop.config()).poll()

    assert [i.receipt.remote_ref for i in items if i.receipt] == [ref]
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "countydrop" in record.message and f"{own_drop.sub}/{UNIT_A}/outbox" in record.message
    assert "Permission denied" in record.message


def test_a_refused_upload_names_the_file_and_what_was_refused(
    own_drop: Drop, blobs: BlobStore, make_adapter
) -> None:
    own_drop.folder(UNIT_A, "inbox").chmod(0o555)
    d = make_delivery(blobs)

    with pytest.raises(RetryableError) as err:
        make_adapter(own_drop.config()).deliver(d)

    assert f"failed writing {own_drop.local}/{UNIT_A}/inbox/GW_{d.remote_ref}.xml.part: " in str(err.value)
    assert "Permission denied" in str(err.value) and own_drop.listing(UNIT_A, "inbox") == []


def test_a_refused_ack_names_both_folders_and_holds_no_other_file_back(
    own_drop: Drop, make_adapter, caplog: pytest.LogCaptureFixture
) -> None:
    ref, other = str(uuid.uuid4()), str(uuid.uuid4())
    name, other_name = f"HZ_{ref}_{UNIT_A}.xml", f"HZ_{other}_{UNIT_B}.xml"
    put_outbox(own_drop, name, receipt_bytes(ref))
    put_outbox(own_drop, other_name, receipt_bytes(other, UNIT_B), unit=UNIT_B)
    own_drop.folder(UNIT_A, "archive").mkdir()
    give_to(own_drop.endpoint, own_drop.local)
    own_drop.folder(UNIT_A, "archive").chmod(0o555)  # the server refuses this unit's moves
    adapter = make_adapter(own_drop.config())
    items = adapter.poll()
    assert sorted(i.key for i in items) == sorted(
        f"countydrop:{u}/outbox/{n}:{hashlib.sha256(receipt_bytes(r, u)).hexdigest()}"
        for u, n, r in ((UNIT_A, name, ref), (UNIT_B, other_name, other))
    )

    for item in items:  # the refused one does not stop the round
        item.ack()

    where = own_drop.local / UNIT_A
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert f"failed moving it from {where}/outbox to {where}/archive: " in record.message
    assert "Permission denied" in record.message
    assert own_drop.listing(UNIT_A, "outbox") == [name, name + ".ok"]  # still there, whole
    assert own_drop.listing(UNIT_B, "archive") == [other_name, other_name + ".ok"]
    health = adapter.check()
    assert not health.ok and f"to {where}/archive" in health.message and name in health.message

    # Once the folder is fixed, a later poll reads it again under the same key (so the
    # gateway takes it as a duplicate, never twice) and its ack moves it.
    own_drop.folder(UNIT_A, "archive").chmod(0o755)
    [again] = adapter.poll()
    assert again.key == next(i.key for i in items if name in i.key)
    again.ack()
    assert own_drop.listing(UNIT_A, "archive") == [name, name + ".ok"]
    assert adapter.check().ok


def test_dotdot_name_from_a_hostile_server_is_never_used(
    sftp_drop_server: SftpEndpoint, make_adapter
) -> None:
    requested: list[str] = []
    ref = str(uuid.uuid4())
    # Both climb to the unit folder; the second even passes a naive "starts with HZ_" test.
    evil = [f"../HZ_{ref}_{UNIT_A}.xml", f"HZ_0/../../HZ_{ref}_{UNIT_A}.xml"]

    class HostileFS(DropSFTPInterface):
        """Lists '../' names in every outbox and records every path the client asks for."""

        def list_folder(self, path: str) -> Any:
            out = super().list_folder(path)
            if isinstance(out, list) and path.rstrip("/").endswith("outbox"):
                for fake in evil + [e + ".ok" for e in evil]:
                    attr = paramiko.SFTPAttributes()
                    attr.filename, attr.st_mode, attr.st_size, attr.st_mtime = (
                        fake,
                        stat.S_IFREG | 0o644,
                        300,
                        0,
                    )
                    out.append(attr)
            return out

    for op in ("open", "stat", "lstat", "remove", "rename", "posix_rename", "mkdir"):

        def recorder(self: Any, path: str, *rest: Any, _op: str = op) -> Any:
            requested.append(path)
            requested.extend(r for r in rest if isinstance(r, str))
            return getattr(DropSFTPInterface, _op)(self, path, *rest)

        setattr(HostileFS, op, recorder)

    sftp_drop_server.extra["server"].sftp_interface = HostileFS
    drop = Drop(sftp_drop_server)
    # If the name were followed it would find a perfectly valid receipt one level up.
    (drop.local / UNIT_A / f"HZ_{ref}_{UNIT_A}.xml").write_bytes(receipt_bytes(ref))
    (drop.local / UNIT_A / f"HZ_{ref}_{UNIT_A}.xml.ok").touch()

    assert make_adapter(drop.config()).poll() == []
    assert not any(".." in p for p in requested)
    assert (drop.local / UNIT_A / f"HZ_{ref}_{UNIT_A}.xml").exists()


def test_stable_size_read_lock_waits_for_a_file_to_stop_changing(drop: Drop, make_adapter) -> None:
    ref, growing_ref = str(uuid.uuid4()), str(uuid.uuid4())
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", receipt_bytes(ref), done=False)
    growing = put_outbox(
        drop, f"HZ_{growing_ref}_{UNIT_A}.xml", receipt_bytes(growing_ref)[:40], done=False
    )
    adapter = make_adapter(drop.config(read_lock="stable-size", stable_seconds=0.3))

    assert adapter.poll() == []  # first sight: nothing is known to be stable yet
    time.sleep(0.35)
    with open(growing, "ab") as fh:  # its writer is still at it
        fh.write(receipt_bytes(growing_ref)[40:])
    first = adapter.poll()
    assert [i.receipt.remote_ref for i in first if i.receipt] == [ref]
    first[0].ack()

    time.sleep(0.35)  # now unchanged for stable_seconds since the last poll saw it
    second = adapter.poll()
    assert [i.receipt.remote_ref for i in second if i.receipt] == [growing_ref]


def test_stable_size_a_file_left_for_the_next_poll_is_taken_only_if_it_has_not_changed_since(
    drop: Drop, make_adapter
) -> None:
    """A poll with no budget left keeps what it found ready for the next poll (its pass's
    pending list). The legacy writer reuses HZ_ names (an ARRIVE, then a SIGN) and, without
    done files, writes in place: a file it began writing again meanwhile is not read
    half-written (and refused to failed/), but waits to be stable again."""
    refs = [str(uuid.uuid4()), str(uuid.uuid4())]
    paths = {r: put_outbox(drop, f"HZ_{r}_{UNIT_A}.xml", receipt_bytes(r), done=False) for r in refs}
    adapter = make_adapter(drop.config(units=[UNIT_A], read_lock="stable-size", stable_seconds=0.3,
                                       max_per_poll=1))
    assert adapter.poll() == []  # first sight
    time.sleep(0.35)
    [first] = adapter.poll()  # both are stable; one is taken, the other left for the next poll
    assert first.receipt is not None
    first.ack()
    [left] = [r for r in refs if r != first.receipt.remote_ref]
    paths[left].write_bytes(receipt_bytes(left)[:40])  # the writer is at it again

    assert adapter.poll() == []

    assert not drop.folder(UNIT_A, "failed").exists() or drop.listing(UNIT_A, "failed") == []
    assert drop.listing(UNIT_A, "outbox") == [paths[left].name]
    paths[left].write_bytes(receipt_bytes(left))  # done writing
    time.sleep(0.35)
    adapter.poll()  # sees its new size
    time.sleep(0.35)
    assert [i.receipt.remote_ref for i in adapter.poll() if i.receipt] == [left]


def test_duty_report_becomes_an_envelope_for_the_configured_unit(drop: Drop, make_adapter) -> None:
    name = f"ZB_{UNIT_A}_20261126145210.xml"
    original = (DATA / "ZB_1152230107CTPD8U2P_20261126145210.xml").read_bytes()
    put_outbox(drop, name, original)
    ref = str(uuid.uuid4())
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", receipt_bytes(ref))

    without = make_adapter(drop.config()).poll()  # duty reports are not this adapter's job yet
    assert [i.receipt is not None for i in without] == [True]

    items = make_adapter(drop.config(duty_report_to=PREFECTURE_EMERGENCY)).poll()
    [report] = [i for i in items if i.envelope is not None]

    env = report.envelope
    assert (env.subsystem, env.type, env.sender_unit) == ("duty", "duty-report", UNIT_A)
    assert [r.unit for r in env.recipients] == [PREFECTURE_EMERGENCY]
    assert env.payload.tag == "{urn:egov:gateway:legacy:v1}legacy"
    assert env.payload.get("format") == "dutyreport"
    [inner] = list(env.payload)
    assert inner.tag == "dutyreport" and inner.findtext("summary") == "今日无突发事件，值班正常。"
    validate(env.to_element())  # a valid canonical envelope
    report.ack()
    assert name in drop.listing(UNIT_A, "archive")


def test_files_that_speak_for_another_unit_or_are_not_what_their_name_says_go_to_failed(
    drop: Drop, make_adapter
) -> None:
    ref = str(uuid.uuid4())
    # a receipt of unit B, named for unit B, but in unit A's outbox: A never speaks for B
    put_outbox(drop, f"HZ_{ref}_{UNIT_B}.xml", receipt_bytes(ref, unit=UNIT_B))
    wrong_root = f"ZB_{UNIT_A}_20261126150000.xml"
    put_outbox(drop, wrong_root, '<?xml version="1.0" encoding="GB18030"?><whatever unit="x"/>'.encode("gb18030"))
    other_unit = f"ZB_{UNIT_A}_20261126150100.xml"
    put_outbox(drop, other_unit, f'<?xml version="1.0" encoding="GB18030"?><dutyreport unit="{UNIT_B}"/>'
               .encode("gb18030"))

    assert make_adapter(drop.config(duty_report_to=PREFECTURE_EMERGENCY)).poll() == []

    failed = drop.folder(UNIT_A, "failed")
    assert f"outbox of {UNIT_A}" in (failed / f"HZ_{ref}_{UNIT_B}.xml.error").read_text("gb18030")
    assert "dutyreport" in (failed / (wrong_root + ".error")).read_text("gb18030")
    assert UNIT_B in (failed / (other_unit + ".error")).read_text("gb18030")


@pytest.mark.parametrize("declaration", ["", '<?xml version="1.0"?>\n'])
def test_a_gb18030_receipt_naming_no_encoding_is_read(drop: Drop, make_adapter, declaration: str) -> None:
    """Files on the drop are GB18030 (legacy README §2); one whose declaration names no
    encoding, or that has none, is not refused as bad UTF-8."""
    ref = str(uuid.uuid4())
    text = receipt_bytes(ref).decode("gb18030")
    text = declaration + text[text.index("?>") + 2:].lstrip()
    assert "李某" in text and "encoding" not in text[:60]
    put_outbox(drop, f"HZ_{ref}_{UNIT_A}.xml", text.encode("gb18030"))
    [item] = make_adapter(drop.config()).poll()
    assert item.receipt is not None and item.receipt.signer == "李某"


def test_a_utf8_receipt_naming_no_encoding_is_read_as_utf8() -> None:
    """XML's own default is UTF-8: bytes that are valid UTF-8 are read so, not as GB18030."""
    text = '<?xml version="1.0"?>\n<receipt signer="李某"/>'
    assert xmlsafe.parse_legacy(text.encode("utf-8")).get("signer") == "李某"
    assert xmlsafe.parse_legacy(text.encode("gb18030")).get("signer") == "李某"


# -- connection handling -----------------------------------------------------------------------
def test_concurrent_deliveries_share_one_connection(
    drop: Drop, blobs: BlobStore, make_adapter, proxy: TcpProxy
) -> None:
    adapter = make_adapter(drop.config(port=proxy.port))
    deliveries = [make_delivery(blobs, unit=(UNIT_A, UNIT_B)[i % 2]) for i in range(8)]
    errors: list[BaseException] = []

    def run(d: Delivery) -> None:
        try:
            adapter.deliver(d)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in deliveries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert proxy.connections == 1 and adapter.connections_opened == 1
    assert len(drop.listing(UNIT_A, "inbox")) == len(drop.listing(UNIT_B, "inbox")) == 8


def test_a_connection_that_died_unnoticed_is_replaced_on_the_next_call(
    drop: Drop, blobs: BlobStore, make_adapter, proxy: TcpProxy, monkeypatch
) -> None:
    adapter = make_adapter(drop.config(port=proxy.port))
    adapter.deliver(make_delivery(blobs))
    dead = adapter.transport
    assert dead is not None
    proxy.sever()
    deadline = time.monotonic() + 5
    while dead.active and time.monotonic() < deadline:
        time.sleep(0.01)
    # Pretend the reader thread has not noticed yet: the transport still claims to be alive.
    monkeypatch.setattr(dead, "is_active", lambda: True)

    adapter.deliver(make_delivery(blobs))

    assert adapter.transport is not dead
    assert adapter.connections_opened == 2 and proxy.connections == 2
    assert len(drop.listing(UNIT_A, "inbox")) == 4


def test_reconnects_after_the_server_restarts(
    sftp_drop_server: SftpEndpoint, blobs: BlobStore, make_adapter
) -> None:
    drop = Drop(sftp_drop_server)
    adapter = make_adapter(drop.config())
    adapter.deliver(make_delivery(blobs))
    server = sftp_drop_server.extra["server"]
    server.stop()  # drops every connection
    server.start()  # same port, same keys

    adapter.deliver(make_delivery(blobs))

    assert adapter.connections_opened == 2
    assert len(drop.listing(UNIT_A, "inbox")) == 4


def test_encrypted_private_key_takes_its_passphrase_from_the_environment(
    drop: Drop, tmp_path: Path, blobs: BlobStore
) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_ssh_private_key(drop.endpoint.client_key_path.read_bytes(), None)
    encrypted = tmp_path / "client_encrypted"
    encrypted.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.BestAvailableEncryption("s3cret-密".encode()),
        )
    )
    cfg = drop.config(private_key_file=str(encrypted), passphrase_env="DROP_KEY_PASS")
    env = {"DROP_KEY_PASS": "s3cret-密"}
    ctx = AdapterContext(blobs=blobs, state=DictState(), base_dir=tmp_path, secrets=env.get)

    with SftpAdapter("countydrop", cfg, ctx) as adapter:
        assert adapter.check().ok
    del cfg["passphrase_env"]
    with pytest.raises(ConfigError, match=r"adapters\.countydrop\.private_key_file: .*encrypted"):
        SftpAdapter("countydrop", cfg, ctx)


def test_ack_keeps_a_same_named_file_already_in_archive(drop: Drop, make_adapter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The legacy side names an ARRIVE and the later SIGN alike (HZ_<docid>_<unit>.xml): the
    archive keeps both."""
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    (drop.folder(UNIT_A, "archive")).mkdir()
    (drop.folder(UNIT_A, "archive") / name).write_bytes(b"an older copy")
    receipt = receipt_bytes(ref)
    put_outbox(drop, name, receipt)
    [item] = make_adapter(drop.config()).poll()

    before = datetime.now(archive.CHINA_TZ).replace(microsecond=0)
    with monkeypatch.context() as m:  # a server whose own clock is in neither zone
        m.setenv("TZ", "America/New_York")
        time.tzset()
        item.ack()
        item.ack()  # idempotent: the file is gone from the outbox, nothing moves twice
    time.tzset()
    after = datetime.now(archive.CHINA_TZ)

    archived = sorted(drop.listing(UNIT_A, "archive"))
    assert (drop.folder(UNIT_A, "archive") / name).read_bytes() == b"an older copy"
    kept = [n for n in archived if n.endswith(".xml") and n != name]
    assert len(kept) == 1 and (drop.folder(UNIT_A, "archive") / kept[0]).read_bytes() == receipt
    assert kept[0] + ".ok" in archived
    assert drop.listing(UNIT_A, "outbox") == []
    # the copy's name has the time as the legacy side writes its own: Beijing time
    stamp = datetime.strptime(kept[0][len(name) - 3:][:14], "%Y%m%d%H%M%S").replace(tzinfo=archive.CHINA_TZ)
    assert before <= stamp <= after, kept[0]


# -- the in-process simulator ------------------------------------------------------------------
@pytest.fixture
def raw_sftp(sftp_drop_server: SftpEndpoint) -> Iterator[paramiko.SFTPClient]:
    """A plain paramiko client on the simulator (what any SFTP client could send)."""
    key = paramiko.Ed25519Key(filename=str(sftp_drop_server.client_key_path))
    transport = paramiko.Transport(("127.0.0.1", sftp_drop_server.port))
    transport.connect(
        username="anyone", pkey=key, hostkey=parse_public_key(sftp_drop_server.host_key_line)
    )
    client = paramiko.SFTPClient.from_transport(transport)
    assert client is not None
    yield client
    transport.close()


def test_simulator_confines_every_path_to_its_root(
    sftp_drop_server: SftpEndpoint, raw_sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"  # a sibling of the drop's root
    outside.write_text("not yours")
    root = sftp_drop_server.data_root
    (root / "escape").symlink_to(outside)
    (root / "escape-dir").symlink_to(tmp_path)

    with pytest.raises(FileNotFoundError):  # '..' is collapsed at the root, never above it
        raw_sftp.open("/../../outside.txt")
    with pytest.raises(PermissionError):
        raw_sftp.open("escape")
    with pytest.raises(PermissionError):
        raw_sftp.listdir("escape-dir")
    with pytest.raises(PermissionError):
        raw_sftp.open("escape-dir/outside.txt", "w")
    assert stat.S_ISLNK(raw_sftp.lstat("escape").st_mode or 0)  # seen as a link, not followed
    raw_sftp.remove("escape")  # removing the link itself is fine
    assert outside.read_text() == "not yours"
    assert raw_sftp.normalize("../..") == "/"


def test_simulator_posix_rename_replaces_and_plain_rename_refuses(
    sftp_drop_server: SftpEndpoint, raw_sftp: paramiko.SFTPClient
) -> None:
    for name, text in (("a", "new"), ("b", "old"), ("c", "other")):
        with raw_sftp.open(name, "w") as fh:
            fh.write(text)

    raw_sftp.posix_rename("a", "b")
    with pytest.raises(OSError):
        raw_sftp.rename("b", "c")

    assert sorted(raw_sftp.listdir(".")) == ["b", "c"]
    assert (sftp_drop_server.data_root / "b").read_text() == "new"


def test_legacy_clerk_signs_in_the_background(
    sftp_drop_server: SftpEndpoint, blobs: BlobStore, make_adapter
) -> None:
    drop = Drop(sftp_drop_server)
    adapter = make_adapter(drop.config())
    d = make_delivery(blobs)
    adapter.deliver(d)
    clerk = drop.clerk()
    clerk.auto_sign = 0.05
    clerk.start(interval=0.05)
    try:
        deadline = time.monotonic() + 10
        items = adapter.poll()
        while not items and time.monotonic() < deadline:
            time.sleep(0.05)
            items = adapter.poll()
    finally:
        clerk.stop()

    assert [(i.receipt.action, i.receipt.remote_ref) for i in items if i.receipt] == [
        ("SIGNED", d.remote_ref)
    ]
    assert f"GW_{d.remote_ref}.xml" in drop.listing(UNIT_A, "archive")


def test_simulator_takes_public_keys_only_and_stops_its_threads(tmp_path: Path) -> None:
    from adapters.simulators.sftp_server import SftpDropServer

    host_key, client_key, stranger = generate_host_key(), generate_host_key(), generate_host_key()
    before = set(threading.enumerate())
    server = SftpDropServer(tmp_path, host_key, [client_key]).start()
    good = paramiko.Transport(("127.0.0.1", server.port))
    good.connect(username="gw", pkey=client_key, hostkey=host_key)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            with paramiko.Transport(("127.0.0.1", server.port)) as t:
                t.connect(username="gw", pkey=stranger)
        with paramiko.Transport(("127.0.0.1", server.port)) as t:
            t.start_client()
            with pytest.raises(paramiko.BadAuthenticationType):
                t.auth_password("gw", "guess")
    finally:
        server.stop()
        good.close()

    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(threading.enumerate()) - before == set()


# -- failed/ is read through only when it may hold something new ------------------------------
def listings_of(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders the adapter opens to list (its OPENDIR requests), in order; the requests
    still go to the server."""
    opened: list[str] = []
    real = sftp_adapter._opendir

    def opendir(sftp: paramiko.SFTPClient, path: str) -> bytes:
        opened.append(path)
        return real(sftp, path)

    monkeypatch.setattr(sftp_adapter, "_opendir", opendir)
    return opened


def crowded_failed(drop: Drop, files: int) -> tuple[Path, float]:
    """A failed/ of unit A holding ``files`` old rejected files and notes, its own time an
    hour ago: (the folder, that time)."""
    failed = drop.folder(UNIT_A, "failed")
    failed.mkdir()
    old = float(int(time.time()) - 3600)
    for _ in range(files // 2):
        name = f"HZ_{uuid.uuid4()}_{UNIT_A}.xml"
        for path in (failed / name, failed / (name + ".error")):
            path.write_bytes(b"x")
            os.utime(path, (old, old))
    os.utime(failed, (old, old))
    return failed, old


def refuse(failed: Path, note: str = "密级标注缺失") -> str:
    """The legacy reader moves a document of ours to failed/ beside its note: its ref."""
    ref = str(uuid.uuid4())
    (failed / f"GW_{ref}.xml").write_bytes(b"<archive/>")
    (failed / f"GW_{ref}.xml.error").write_bytes(note.encode("gb18030"))
    return ref


def test_a_failed_folder_is_not_read_again_while_nothing_changed_there(
    drop: Drop, make_adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """failed/ keeps every refused file (it is not the gateway's to empty): 300 entries are
    three READDIR answers, 20,000 two hundred, every poll. Read only when its time changed,
    or while something found there is not taken yet."""
    monkeypatch.setattr(sftp_adapter, "FAILED_SETTLE_SECONDS", 0)  # see the next test for it
    failed, _ = crowded_failed(drop, 300)
    opened = listings_of(monkeypatch)
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    folder = adapter._dir(adapter.settings.move_failed, UNIT_A)

    for _ in range(4):
        assert adapter.poll() == []
    assert opened.count(folder) == 1

    ref = refuse(failed)  # a note appears: the folder's time changes
    [item] = adapter.poll()
    assert item.receipt is not None and (item.receipt.action, item.receipt.remote_ref) == ("REFUSED", ref)
    [again] = adapter.poll()  # not taken (the ingest failed, say): read again, though unchanged
    assert again.key == item.key and opened.count(folder) == 3
    again.ack()
    assert adapter.poll() == [] and opened.count(folder) == 3  # taken: not read again


def test_a_note_written_in_the_second_failed_was_read_in_is_not_missed(drop: Drop, make_adapter) -> None:
    """SFTP gives times in whole seconds: a note written in the second the folder was read in
    leaves its time as it was. An unchanged time is trusted only once a reading began
    FAILED_SETTLE_SECONDS after that time was first seen."""
    failed, old = crowded_failed(drop, 10)
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    assert adapter.poll() == []

    ref = refuse(failed, "附件无法打开")
    os.utime(failed, (old, old))  # as a note written within that second leaves it

    [item] = adapter.poll()
    assert item.receipt is not None and (item.receipt.remote_ref, item.receipt.reason) == (ref, "附件无法打开")


def test_notes_of_one_second_beyond_a_polls_budget_are_each_taken_once(
    drop: Drop, make_adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark of notes taken is in whole seconds, so notes of its second are read again:
    those taken are passed over (else the first max_per_poll of a second would come back
    every poll and the rest never), and failed/ is read again while notes wait."""
    monkeypatch.setattr(sftp_adapter, "FAILED_SETTLE_SECONDS", 0)
    failed, _ = crowded_failed(drop, 10)
    refs = {refuse(failed) for _ in range(3)}
    now = float(int(time.time()))
    for ref in refs:
        os.utime(failed / f"GW_{ref}.xml.error", (now, now))
    os.utime(failed, (now - 60, now - 60))
    opened = listings_of(monkeypatch)
    adapter = make_adapter(drop.config(units=[UNIT_A], max_per_poll=2))
    folder = adapter._dir(adapter.settings.move_failed, UNIT_A)

    taken: list[str] = []
    for _ in range(2):
        for item in adapter.poll():
            assert item.receipt is not None
            taken.append(item.receipt.remote_ref)
            item.ack()

    assert sorted(taken) == sorted(refs)
    assert adapter.poll() == [] and opened.count(folder) == 2


# -- symlinks: never written, moved or read through ---------------------------------------------
@pytest.mark.parametrize("when", ["before", "after the check"])
def test_a_note_is_never_written_through_a_symlink_planted_under_its_name(
    drop: Drop, make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Whoever may write failed/ (the legacy side's folder) can leave a link where the gateway
    will write a reject's note: the note is created (O_EXCL), never written through it; one
    found there is left, and the file goes to failed/ under another name with its note."""
    target = tmp_path / "authorized_keys"  # any file the drop's user may write
    target.write_text("ssh-ed25519 AAAA admin\n")
    failed = drop.folder(UNIT_A, "failed")
    failed.mkdir()
    name = f"HZ_{uuid.uuid4()}_{UNIT_A}.xml"
    put_outbox(drop, name, b"<receipt")
    if when == "before":
        (failed / (name + ".error")).symlink_to(target)
    else:  # between the gateway's look at the name and its OPEN
        real_open = paramiko.SFTPClient.open

        def racing_open(self: paramiko.SFTPClient, filename: str, mode: str = "r", bufsize: int = -1) -> Any:
            note = failed / (name + ".error")
            if filename.endswith(note.name) and not note.is_symlink():
                note.symlink_to(target)
            return real_open(self, filename, mode, bufsize)

        monkeypatch.setattr(paramiko.SFTPClient, "open", racing_open)

    assert make_adapter(drop.config(units=[UNIT_A])).poll() == []  # refused at once

    assert target.read_text() == "ssh-ed25519 AAAA admin\n"
    assert (failed / (name + ".error")).is_symlink()  # left as it was
    if when == "before":
        [moved] = [p for p in failed.iterdir() if p.name.endswith(".xml") and p.name != name]
        assert moved.read_bytes() == b"<receipt"
        assert "receipt" in moved.with_name(moved.name + ".error").read_text(encoding="gb18030")
    else:  # the move is given up: the file stays, and is refused again by a later poll
        assert drop.listing(UNIT_A, "outbox") == [name, name + ".ok"]


def test_a_done_file_is_never_created_through_a_symlink_planted_under_its_name(
    drop: Drop, blobs: BlobStore, make_adapter, tmp_path: Path
) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    d = make_delivery(blobs)
    inbox = drop.folder(UNIT_A, "inbox")
    (inbox / f"GW_{d.remote_ref}.xml.ok").symlink_to(target)

    make_adapter(drop.config()).deliver(d)

    assert target.read_bytes() == b"keep me"  # not truncated
    assert (inbox / f"GW_{d.remote_ref}.xml").is_file()


def test_an_upload_never_goes_through_a_symlink_planted_after_the_check(
    drop: Drop, blobs: BlobStore, make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .part left by an earlier attempt is removed before the upload; a link planted
    between that and the upload's OPEN is refused (O_EXCL), not written through."""
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    d = make_delivery(blobs)
    part = drop.folder(UNIT_A, "inbox") / f"GW_{d.remote_ref}.xml.part"
    real_open = paramiko.SFTPClient.open

    def racing_open(self: paramiko.SFTPClient, filename: str, mode: str = "r", bufsize: int = -1) -> Any:
        if filename.endswith(".part") and not part.is_symlink():
            part.symlink_to(target)  # the legacy host's user, just before the gateway's OPEN
        return real_open(self, filename, mode, bufsize)

    monkeypatch.setattr(paramiko.SFTPClient, "open", racing_open)
    with pytest.raises(RetryableError, match=r"writing .*\.part"):
        make_adapter(drop.config()).deliver(d)
    assert target.read_bytes() == b"keep me"


def test_a_file_swapped_for_a_symlink_after_it_was_looked_at_is_not_read(
    drop: Drop, make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SFTP v3 opens through links: the open file must still be what lstat saw (FSTAT)."""
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    path = put_outbox(drop, name, receipt_bytes(ref))
    secret = tmp_path / "secret.xml"  # a file the drop's user may read and the swapper not
    secret.write_bytes(receipt_bytes(ref).replace(b"JXF-2026-0002", b"JXF-2026-00020"))  # valid too
    real_open = paramiko.SFTPClient.open

    def racing_open(self: paramiko.SFTPClient, filename: str, mode: str = "r", bufsize: int = -1) -> Any:
        if filename.endswith(name) and not path.is_symlink():
            path.unlink()
            path.symlink_to(secret)
        return real_open(self, filename, mode, bufsize)

    monkeypatch.setattr(paramiko.SFTPClient, "open", racing_open)
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    assert adapter.poll() == []
    monkeypatch.undo()
    assert adapter.poll() == []  # read again later: a symlink, refused to failed/
    assert (drop.folder(UNIT_A, "failed") / name).is_symlink()


def test_a_symlinked_inbox_is_refused(drop: Drop, blobs: BlobStore, make_adapter) -> None:
    """Unit A's inbox swapped for a link to unit B's: A's documents must not reach B."""
    inbox_a, inbox_b = drop.folder(UNIT_A, "inbox"), drop.folder(UNIT_B, "inbox")
    inbox_a.rmdir()
    inbox_a.symlink_to(inbox_b)
    adapter = make_adapter(drop.config())

    with pytest.raises(RetryableError, match=f"{UNIT_A}/inbox is a symlink") as exc_info:
        adapter.deliver(make_delivery(blobs))
    assert exc_info.value.code == "unsafe-folder"
    assert os.listdir(inbox_b) == []
    health = adapter.check()
    assert not health.ok and f"{UNIT_A}/inbox is a symlink" in health.message

    inbox_a.unlink()
    inbox_a.mkdir()
    adapter.deliver(make_delivery(blobs))
    assert adapter.check().ok


def test_a_symlinked_outbox_is_not_read_and_the_other_units_are(
    drop: Drop, make_adapter, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ref, other = str(uuid.uuid4()), str(uuid.uuid4())
    (elsewhere / f"HZ_{ref}_{UNIT_A}.xml").write_bytes(receipt_bytes(ref))
    (elsewhere / f"HZ_{ref}_{UNIT_A}.xml.ok").touch()
    drop.folder(UNIT_A, "outbox").rmdir()
    drop.folder(UNIT_A, "outbox").symlink_to(elsewhere)
    put_outbox(drop, f"HZ_{other}_{UNIT_B}.xml", receipt_bytes(other, UNIT_B), unit=UNIT_B)
    adapter = make_adapter(drop.config())

    assert [i.receipt.remote_ref for i in adapter.poll() if i.receipt] == [other]
    assert sorted(os.listdir(elsewhere)) == [f"HZ_{ref}_{UNIT_A}.xml", f"HZ_{ref}_{UNIT_A}.xml.ok"]
    assert f"{UNIT_A}/outbox is a symlink" in adapter.check().message


def test_nothing_is_moved_into_a_symlinked_archive(drop: Drop, make_adapter, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    put_outbox(drop, name, receipt_bytes(ref))
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    [item] = adapter.poll()
    drop.folder(UNIT_A, "archive").symlink_to(elsewhere)  # after the poll, before the ack

    item.ack()  # refused like any move the server refuses: the file stays, check() says why

    assert os.listdir(elsewhere) == []
    assert drop.listing(UNIT_A, "outbox") == [name, name + ".ok"]
    health = adapter.check()
    assert not health.ok and f"{UNIT_A}/archive is a symlink" in health.message


def test_nothing_is_moved_into_a_symlink_planted_while_archive_is_created(
    drop: Drop, make_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ref = str(uuid.uuid4())
    name = f"HZ_{ref}_{UNIT_A}.xml"
    put_outbox(drop, name, receipt_bytes(ref))
    adapter = make_adapter(drop.config(units=[UNIT_A]))
    [item] = adapter.poll()
    archive_dir = drop.folder(UNIT_A, "archive")
    real_mkdir = paramiko.SFTPClient.mkdir

    def racing_mkdir(self: paramiko.SFTPClient, path: str, mode: int = 0o777) -> None:
        if path.endswith(f"{UNIT_A}/archive") and not archive_dir.is_symlink():
            archive_dir.symlink_to(elsewhere)  # just before the gateway's MKDIR
        real_mkdir(self, path, mode)

    monkeypatch.setattr(paramiko.SFTPClient, "mkdir", racing_mkdir)
    item.ack()

    assert os.listdir(elsewhere) == []
    assert drop.listing(UNIT_A, "outbox") == [name, name + ".ok"]
