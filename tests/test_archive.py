"""The legacy archive/receipt format (adapters/archive.py) against the fixed samples."""
from __future__ import annotations

import base64
import copy
import hashlib
import re
import io
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree

from adapters.archive import (
    ArchiveFormatError,
    iter_archive,
    parse_receipt,
    read_archive,
    write_archive,
    write_receipt,
)
from gateway.blobs import BlobStore
from gateway.envelope import Attachment, Envelope, Receipt

DATA = Path(__file__).parent / "data"
CST = timezone(timedelta(hours=8))
PREF_OFFICE = "11522300GDR9YB9550"
COUNTY_A = "1152230107CTPD8U2P"
CITY_B = "11522302GRALUMYP76"


def sample_envelope() -> Envelope:
    return Envelope.from_xml((DATA / "envelope-document.xml").read_bytes())


def same_tree(a: etree._Element, b: etree._Element) -> bool:
    """Structural equality ignoring indentation whitespace."""
    if a.tag != b.tag or dict(a.attrib) != dict(b.attrib):
        return False
    if (a.text or "").strip() != (b.text or "").strip() or len(a) != len(b):
        return False
    return all(same_tree(x, y) for x, y in zip(a, b))


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


# -- the samples ---------------------------------------------------------------------------
def test_sample_archive_reads_as_the_sample_envelope() -> None:
    expected = sample_envelope()
    env, files = read_archive((DATA / "archive-send.xml").read_bytes())

    assert env.message_id == expected.message_id  # archiveid
    assert (env.subsystem, env.type) == (expected.subsystem, expected.type)
    assert (env.sender_unit, env.sender_name) == (expected.sender_unit, expected.sender_name)
    assert env.recipients == expected.recipients
    assert (env.classification, env.urgency) == (expected.classification, expected.urgency)
    assert same_tree(env.payload, expected.payload)
    assert env.attachments == expected.attachments  # incl. media types guessed from names
    for att, content in files:
        assert len(content) == att.size
        assert hashlib.sha256(content).hexdigest() == att.sha256
    assert files[0][1].decode("utf-8").startswith("关于做好2026年冬季值班")


def test_an_archive_without_signer_or_publish_level_reads_as_a_valid_envelope() -> None:
    """A 通知 has no 签发人: the box writes <signer/>; the envelope leaves it out rather than
    carry an empty element its payload XSD (and the document rules) refuse."""
    from gateway import payloads
    from systems.documents.payload import check_rules

    text = (DATA / "archive-send.xml").read_bytes().decode("gb18030")
    text = re.sub(r"<signer>[^<]*</signer>", "<signer/>", text)
    text = re.sub(r"<publishlevel>[^<]*</publishlevel>", "<publishlevel></publishlevel>", text)
    assert "<signer/>" in text
    env, _ = read_archive(text.encode("gb18030"))
    ns = "{urn:egov:gateway:documents:v1}"
    assert env.payload.find(ns + "signer") is None and env.payload.find(ns + "publish-level") is None
    payloads.validate(env.payload)
    check_rules(env)


@pytest.mark.parametrize(
    "name, action, signer, reason, receipt_no, hhmm",
    [
        ("receipt-arrive.xml", "ARRIVED", None, None, "JXF-2026-0001", (10, 1)),
        ("receipt-sign.xml", "SIGNED", "李某", None, "JXF-2026-0002", (10, 15)),
        ("receipt-return.xml", "RETURNED", "李某", "主送机关有误，请核实后重发", "JXF-2026-0003", (10, 20)),
    ],
)
def test_sample_receipts_parse(name, action, signer, reason, receipt_no, hhmm) -> None:
    r = parse_receipt((DATA / name).read_bytes())
    assert r.action == action
    assert r.remote_ref == "8f14e45f-ceea-467a-9575-3b1b2d0e8a01"
    assert r.unit == COUNTY_A
    assert (r.signer, r.reason, r.receipt_no) == (signer, reason, receipt_no)
    assert r.time == datetime(2026, 11, 20, *hhmm, tzinfo=CST)
    assert r.time.utcoffset() == timedelta(hours=8)


def test_receipt_round_trip_is_gb18030() -> None:
    r = parse_receipt((DATA / "receipt-return.xml").read_bytes())
    data = write_receipt(r, appid="JXF-OA", name="甲县人民政府办公室")
    assert data.startswith(b'<?xml version="1.0" encoding="GB18030"?>')
    assert "主送机关有误".encode("gb18030") in data
    assert "主送机关有误".encode() not in data
    assert parse_receipt(data) == r


def test_naive_receipt_time_is_read_as_china_time() -> None:
    data = (DATA / "receipt-sign.xml").read_bytes().replace(b"10:15:00+08:00", b"10:15:00")
    assert parse_receipt(data).time == datetime(2026, 11, 20, 10, 15, tzinfo=CST)


@pytest.mark.parametrize(
    "old, new, field",
    [
        (b'action="SIGN"', b'action="SIGNED"', "receipt/@action"),
        (b' archiveid="8f14e45f-ceea-467a-9575-3b1b2d0e8a01"', b"", "receipt/@archiveid"),
        (b'trustorgno="1152230107CTPD8U2P"', b'appno="x"', "receipt/unit/@trustorgno"),
        (b'trustorgno="1152230107CTPD8U2P"', b'trustorgno="1152230107CTPD8U2Q"', "receipt/unit/@trustorgno"),
        (b"2026-11-20T10:15:00+08:00", b"yesterday", "receipt/time"),
        (b"<receiptno>JXF-2026-0002</receiptno>", b"", "receipt/receiptno"),
        (b"<receipt ", b"<reciept ", "receipt"),
        (b"</receipt>", b"", "receipt"),  # not well-formed
        (b"<receipt ", b'<!DOCTYPE r [<!ENTITY x "y">]><receipt ', "receipt"),
    ],
)
def test_malformed_receipts_name_the_field(old: bytes, new: bytes, field: str) -> None:
    data = (DATA / "receipt-sign.xml").read_bytes()
    assert old in data
    with pytest.raises(ArchiveFormatError) as ei:
        parse_receipt(data.replace(old, new, 1))
    assert ei.value.field == field
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).startswith(field)


@pytest.mark.parametrize("sample, old, field", [
    ("receipt-sign.xml", "<signer>李某</signer>", "receipt/signer"),
    ("receipt-return.xml", "<signer>李某</signer>", "receipt/signer"),
    ("receipt-return.xml", "<reason>主送机关有误，请核实后重发</reason>", "receipt/reason"),
])
def test_a_sign_or_return_names_who_and_a_return_says_why(sample: str, old: str, field: str) -> None:
    data = (DATA / sample).read_bytes()
    assert old.encode("gb18030") in data
    with pytest.raises(ArchiveFormatError) as ei:
        parse_receipt(data.replace(old.encode("gb18030"), b"", 1))
    assert ei.value.field == field


def test_receipt_without_legacy_form_is_refused() -> None:
    with pytest.raises(ArchiveFormatError, match="RECALLED"):
        write_receipt(Receipt(unit=COUNTY_A, action="RECALLED", remote_ref="x"))


# -- writing -------------------------------------------------------------------------------
def chinese_envelope(blobs: BlobStore) -> tuple[Envelope, dict[str, bytes]]:
    """The sample envelope with real blobs, a Chinese title and odd-sized files."""
    env = sample_envelope()
    body = "通知正文：请各县市做好冬季值班。\n".encode("gb18030") * 37
    att1 = bytes(range(256)) * 3 + b"x"  # binary, size not a multiple of 3
    empty = b""
    contents = {}
    env.attachments = []
    for role, name, data in (("body", "正文.ofd", body), ("attachment", "附件1 值班表.pdf", att1),
                             ("attachment", "附件2.txt", empty)):
        sha, size = blobs.put_bytes(data)
        contents[sha] = data
        env.attachments.append(Attachment(role, name, size, sha, None))
    ns = "{urn:egov:gateway:documents:v1}"
    env.payload.find(ns + "title").text = "关于<冬季>值班&信息报送的通知"
    env.classification, env.classification_period = "秘密", "6个月"
    env.urgency = "特急"
    return env, contents


@pytest.mark.parametrize("chunk_size", [3, 4096, 3 * 1024 * 1024])
def test_write_read_round_trip_in_gb18030(blobs: BlobStore, chunk_size: int) -> None:
    env, contents = chinese_envelope(blobs)
    recipient = env.recipients[1]  # 乙市, 主送 000002
    out = io.BytesIO()
    n = write_archive(env, recipient, blobs, out, archive_id="ref-0002",
                      appids={PREF_OFFICE: "ZZF-OA", CITY_B: "YSF-OA"}, chunk_size=chunk_size)
    data = out.getvalue()
    assert n == len(data)
    assert data.startswith(b'<?xml version="1.0" encoding="GB18030"?>')
    assert "通知".encode("gb18030") in data and "通知".encode() not in data
    data.decode("gb18030")  # the whole document decodes

    root = etree.fromstring(data.decode("gb18030").split("?>", 1)[1])
    assert root.get("archiveid") == "ref-0002"
    assert root.find("sender").attrib == {"trustorgno": PREF_OFFICE, "appid": "ZZF-OA", "name": "州人民政府办公室"}
    receivers = root.findall("receivers/receiver")
    assert [dict(r.attrib) for r in receivers] == [
        {"trustorgno": CITY_B, "appid": "YSF-OA", "name": "乙市人民政府办公室", "type": "主送",
         "count": "1", "num": "000002"}
    ]
    assert root.find("archiveparameters/secret").attrib == {"grade": "秘密", "period": "6个月"}
    assert root.find("archiveparameters/docno").attrib == {"prefix": "州政办发", "year": "2026", "serial": "37"}

    back, files = read_archive(data)
    assert back.message_id == "ref-0002"
    assert back.recipients == [recipient]
    assert (back.classification, back.classification_period, back.urgency) == ("秘密", "6个月", "特急")
    assert same_tree(back.payload, env.payload)
    assert [(a.role, a.name, a.size, a.sha256) for a, _ in files] == [
        (a.role, a.name, a.size, a.sha256) for a in env.attachments
    ]
    assert [c for _, c in files] == [contents[a.sha256] for a in env.attachments]


def test_an_unclassified_documents_receivers_are_numbered_as_the_sample_numbers_them(blobs: BlobStore) -> None:
    """samples/archive-send.xml is 非密 and gives every receiver a num (000001, 000002, 000003):
    without a 份号, a copy's num is its place in the recipient list."""
    import dataclasses

    env, _ = chinese_envelope(blobs)
    env.classification, env.classification_period = "非密", None
    env.recipients = [dataclasses.replace(r, copy_no=None) for r in env.recipients]
    for i, recipient in enumerate(env.recipients):
        out = io.BytesIO()
        write_archive(env, recipient, blobs, out, archive_id=f"ref-{i}")
        root = etree.fromstring(out.getvalue().decode("gb18030").split("?>", 1)[1])
        [receiver] = root.findall("receivers/receiver")
        assert (receiver.get("trustorgno"), receiver.get("num")) == (recipient.unit, f"{i + 1:06d}")


def test_iter_archive_chunks_equal_write_archive(blobs: BlobStore) -> None:
    env, _ = chinese_envelope(blobs)
    out = io.BytesIO()
    write_archive(env, env.recipients[0], blobs, out, archive_id="r1", chunk_size=300)
    stream = iter_archive(env, env.recipients[0], blobs, archive_id="r1", chunk_size=300)
    announced = stream.length  # known before streaming: lets HTTP send Content-Length
    chunks = list(stream)
    assert len(chunks) > 5 and b"".join(chunks) == out.getvalue()
    assert announced == len(out.getvalue())
    # without appids the attribute is left out rather than invented
    assert b"appid=" not in out.getvalue()


def test_problems_surface_before_any_byte_is_produced(blobs: BlobStore) -> None:
    env, _ = chinese_envelope(blobs)
    r = env.recipients[0]
    missing = copy.deepcopy(env)
    missing.attachments[0].sha256 = "0" * 64
    with pytest.raises(ArchiveFormatError, match="not available"):
        iter_archive(missing, r, blobs, archive_id="x")
    wrong_size = copy.deepcopy(env)
    wrong_size.attachments[1].size += 1
    with pytest.raises(ArchiveFormatError, match="blob store has"):
        iter_archive(wrong_size, r, blobs, archive_id="x")
    not_doc = copy.deepcopy(env)
    not_doc.payload = etree.Element("{urn:egov:gateway:duty:v1}report")
    with pytest.raises(ArchiveFormatError) as ei:
        iter_archive(not_doc, r, blobs, archive_id="x")
    assert ei.value.field == "payload"
    stranger = copy.deepcopy(r)
    stranger.unit = "11522323C4H14TRW96"
    with pytest.raises(ArchiveFormatError) as ei:
        iter_archive(env, stranger, blobs, archive_id="x")
    assert ei.value.field == "receiver"


def test_blob_changed_while_streaming_is_detected(blobs: BlobStore) -> None:
    env, _ = chinese_envelope(blobs)
    sha = env.attachments[1].sha256
    blobs.path(sha).write_bytes(b"y" * env.attachments[1].size)  # same size, other content
    with pytest.raises(ArchiveFormatError, match="changed while streaming"):
        write_archive(env, env.recipients[0], blobs, io.BytesIO(), archive_id="x")


# -- reading checks ------------------------------------------------------------------------
def test_tampered_content_is_refused() -> None:
    data = (DATA / "archive-send.xml").read_bytes()
    b64 = b"6ZmE5Lu2Me+8muWAvOePreWuieaOkuihqO+8iOeVpe+8iQ=="
    assert b64 in data
    other = base64.b64encode(base64.b64decode(b64)[:-1] + b"!")
    with pytest.raises(ArchiveFormatError) as ei:
        read_archive(data.replace(b64, other))
    assert ei.value.field.endswith("/@sha256") and "附件1.pdf" in ei.value.field
    with pytest.raises(ArchiveFormatError) as ei:
        read_archive(data.replace(b'size="34"', b'size="35"'))
    assert ei.value.field.endswith("/@size")
    with pytest.raises(ArchiveFormatError, match="base64"):
        read_archive(data.replace(b64, b"%%%not-base64%%%"))


@pytest.mark.parametrize(
    "old, new, field",
    [
        (b' archiveid="8f14e45f-ceea-467a-9575-3b1b2d0e8a01"', b"", "archive/@archiveid"),
        (b'action="sendArchive"', b'action="recallArchive"', "archive/@action"),
        (b'trustorgno="11522300GDR9YB9550"', b'trustorgno="11522300GDR9YB9551"', "archive"),  # check char
        (b'<archive ', b'<archiv ', "archive"),
    ],
)
def test_malformed_archives_name_the_field(old: bytes, new: bytes, field: str) -> None:
    data = (DATA / "archive-send.xml").read_bytes()
    assert old in data
    with pytest.raises(ArchiveFormatError) as ei:
        read_archive(data.replace(old, new, 1))
    assert ei.value.field == field


# -- streaming -----------------------------------------------------------------------------
def test_large_attachment_is_streamed_not_held(blobs: BlobStore, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32 + 1)  # ~1 MiB, not 3-aligned
    raw = tmp_path / "big.bin"
    with open(raw, "wb") as fh:
        left = size
        while left:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    with open(raw, "rb") as fh:
        sha, n = blobs.put_stream(fh)
    assert n == size
    env = sample_envelope()
    env.attachments = [Attachment("body", "大文件.ofd", size, sha, None)]

    digest = hashlib.sha256()
    decoded = 0
    tracemalloc.start()
    try:
        chunks = iter_archive(env, env.recipients[0], blobs, archive_id="big")
        head = next(chunks)
        for chunk in chunks:
            if chunk.lstrip().startswith(b"</file>"):
                tail = chunk
                break
            part = base64.b64decode(chunk)
            digest.update(part)
            decoded += len(part)
        else:
            pytest.fail("the archive never closed the file element")
        assert list(chunks) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head.endswith(f'sha256="{sha}">'.encode())
    assert tail.rstrip().endswith(b"</archive>")
    assert decoded == size and digest.hexdigest() == sha
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes for a {size}-byte attachment"
