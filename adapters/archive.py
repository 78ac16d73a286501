"""The legacy ``archive`` / ``receipt`` XML format (公文交换格式), fixed by the legacy contract
(``shared/legacy/README.md`` sections 2 and 3). Shared by the SFTP drop (``GW_<docid>.xml``,
``HZ_<docid>_<unit>.xml``) and the exchange box (交换箱, XML over HTTP).

Contracts
---------
* Archives are GB18030 with the declaration ``<?xml version="1.0" encoding="GB18030"?>``.
* One archive is written per receiver (收文单位); its ``archiveid`` is the caller's
  ``archive_id`` (normally :attr:`adapters.base.Delivery.remote_ref`).
* The header is produced by ``schemas/xslt/envelope-to-archive.xsl`` and read back by
  ``schemas/xslt/archive-to-envelope.xsl``; Python only streams and checks file contents.
* File contents are base64 inline. Writing streams them from the blob store in chunks, so
  memory use is one chunk whatever the file size; reading verifies each file's size and
  SHA-256.
* Any malformed input raises :class:`ArchiveFormatError` (a ``ValueError``) whose ``field``
  names what is wrong.

Public API: :func:`write_archive`, :func:`iter_archive`, :func:`read_archive`,
:func:`parse_receipt`, :func:`write_receipt`, :class:`ArchiveFormatError`,
:data:`ACTION_FROM_LEGACY`, :data:`ACTION_TO_LEGACY`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import BinaryIO

from lxml import etree

from adapters.base import BlobReader, PolledItem, StateStore, legacy_time
from gateway.config import DEFAULT_TIMEZONE, zone
from gateway import SCHEMAS, xmlsafe
from gateway.envelope import Attachment, Envelope, EnvelopeError, Receipt, Recipient
from gateway.units import uscc_problem

__all__ = [
    "ACTION_FROM_LEGACY",
    "ACTION_TO_LEGACY",
    "DEFAULT_CHUNK",
    "DOCUMENTS_NS",
    "XML_DECLARATION",
    "ArchiveFormatError",
    "ArchiveStream",
    "iter_archive",
    "parse_receipt",
    "read_archive",
    "write_archive",
    "write_receipt",
]

DOCUMENTS_NS = "urn:egov:gateway:documents:v1"
XML_DECLARATION = '<?xml version="1.0" encoding="GB18030"?>\n'
#: Read size for file contents: a multiple of 3 so every chunk encodes to base64 without
#: padding and the pieces concatenate into one valid base64 text.
DEFAULT_CHUNK = 3 * 512 * 1024  # 1.5 MiB read, 2 MiB encoded

#: Legacy receipt action -> canonical :data:`gateway.envelope.RECEIPT_ACTIONS`.
ACTION_FROM_LEGACY = {"ARRIVE": "ARRIVED", "SIGN": "SIGNED", "RETURN": "RETURNED"}
ACTION_TO_LEGACY = {v: k for k, v in ACTION_FROM_LEGACY.items()}

#: Legacy systems write local time without an offset now and then: it is read in the
#: adapter's zone (``[adapters.NAME] timezone``, else ``[node] timezone``), China Standard
#: Time unless configured otherwise, rather than rejected.
CHINA_TZ: tzinfo = zone(DEFAULT_TIMEZONE)

_MEDIA_TYPES = {
    ".ofd": "application/ofd",
    ".pdf": "application/pdf",
    ".wps": "application/vnd.ms-works",
    ".et": "application/vnd.ms-excel",
}

# lxml's XSLT objects are compiled once; transforms are serialised because sharing one
# XSLT object across threads is not something lxml promises for every libxslt build.
_XSLT_LOCK = threading.Lock()


class ArchiveFormatError(ValueError):
    """An archive or receipt breaks the legacy format; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@lru_cache(maxsize=1)
def _to_archive() -> etree.XSLT:
    return xmlsafe.xslt(SCHEMAS / "xslt" / "envelope-to-archive.xsl")


@lru_cache(maxsize=1)
def _to_envelope() -> etree.XSLT:
    return xmlsafe.xslt(SCHEMAS / "xslt" / "archive-to-envelope.xsl")


def _transform(xslt: etree.XSLT, root: etree._Element, **params: str) -> etree._Element:
    sp = {k.replace("_", "-"): etree.XSLT.strparam(v) for k, v in params.items()}
    with _XSLT_LOCK:
        try:
            result = xslt(root, **sp)
        except etree.XSLTApplyError as exc:
            raise ArchiveFormatError("xslt", f"transform failed: {exc}") from None
    out = result.getroot()
    if out is None:
        raise ArchiveFormatError("xslt", "the transform produced no document (wrong root element?)")
    return out


# -- writing -------------------------------------------------------------------------------
def iter_archive(
    envelope: Envelope,
    recipient: Recipient,
    blobs: BlobReader,
    *,
    archive_id: str,
    appids: Mapping[str, str] | None = None,
    sender_appid: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> ArchiveStream:
    """The archive for ONE receiver as GB18030 byte chunks (e.g. a streaming HTTP body).

    The header is built and every blob is checked (present, right size) *before* this
    returns, so envelope and blob problems raise here, not halfway through a transfer.
    While streaming, each file's SHA-256 is recomputed; a blob that changed underneath
    raises :class:`ArchiveFormatError` at the end of that file: the output is then
    incomplete and must be discarded (the caller never renames / the POST fails).

    ``appids`` maps unit codes to application ids (appid) at the box; ``sender_appid``
    overrides the sender's. Unknown appids are left out rather than invented.
    """
    appids = appids or {}
    if not archive_id:
        raise ArchiveFormatError("archiveid", "an archive id is required")
    if envelope.payload is None or envelope.payload.tag != f"{{{DOCUMENTS_NS}}}document":
        tag = getattr(envelope.payload, "tag", None)
        raise ArchiveFormatError(
            "payload", f"the archive format carries only {{{DOCUMENTS_NS}}}document, not {tag}"
        )
    if not any(r.unit == recipient.unit for r in envelope.recipients):
        raise ArchiveFormatError("receiver", f"{recipient.unit} is not a recipient of the envelope")
    chunk_size = max(3, chunk_size - chunk_size % 3)

    root = _transform(
        _to_archive(),
        envelope.to_element(),
        archive_id=archive_id,
        receiver_unit=recipient.unit,
        sender_appid=sender_appid or appids.get(envelope.sender_unit, ""),
        receiver_appid=appids.get(recipient.unit, ""),
    )
    files = root.findall("files/file")
    # A random marker stands in for each file's content; after serialising, the text is
    # split at the markers and the base64 streamed between. Random, so no title can fake it.
    marker = f"@@{uuid.uuid4().hex}@@"
    plan: list[tuple[str, int]] = []
    for f in files:
        sha, size = f.get("sha256", ""), int(f.get("size", "-1"))
        try:
            actual = blobs.size(sha)
        except (OSError, ValueError) as exc:
            raise ArchiveFormatError(f"file {f.get('name')}", f"blob {sha} is not available: {exc}") from None
        if actual != size:
            raise ArchiveFormatError(
                f"file {f.get('name')}", f"the envelope says {size} bytes, the blob store has {actual}"
            )
        plan.append((sha, size))
        f.text = marker
    text = XML_DECLARATION + etree.tostring(root, encoding="unicode", pretty_print=True)
    parts = [xmlsafe.gb18030_encode(p) for p in text.split(marker)]
    if len(parts) != len(files) + 1:  # pragma: no cover - a 128-bit collision
        raise ArchiveFormatError("files", "internal marker collision; retry")
    return ArchiveStream(parts, plan, blobs, chunk_size)


class ArchiveStream(Iterator[bytes]):
    """The chunks of one archive. ``length`` (alias ``len``, the attribute ``requests``
    looks for) is the exact byte length, known in advance (base64 of n bytes is 4*ceil(n/3)
    characters), so an HTTP client sends a plain ``Content-Length`` body instead of chunked
    encoding, which old servlet boxes dislike. Deliberately no ``__len__``: ``list()`` would
    take it as a size hint and preallocate a slot per byte."""

    def __init__(
        self, parts: list[bytes], plan: list[tuple[str, int]], blobs: BlobReader, chunk_size: int
    ) -> None:
        self.length = sum(map(len, parts)) + sum(4 * ((size + 2) // 3) for _, size in plan)
        self._chunks = self._generate(parts, plan, blobs, chunk_size)

    @property
    def len(self) -> int:
        return self.length

    def __iter__(self) -> ArchiveStream:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    @staticmethod
    def _generate(
        parts: list[bytes], plan: list[tuple[str, int]], blobs: BlobReader, chunk_size: int
    ) -> Iterator[bytes]:
        yield parts[0]
        for (sha, size), tail in zip(plan, parts[1:]):
            yield from _b64_file(blobs, sha, size, chunk_size)
            yield tail


def _b64_file(blobs: BlobReader, sha: str, size: int, chunk_size: int) -> Iterator[bytes]:
    # One reusable buffer, filled completely before encoding: every piece but the last is
    # a multiple of 3 bytes, so the base64 pieces concatenate into one valid text, and
    # memory stays at one buffer plus its encoding however large the file is.
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    digest = hashlib.sha256()
    seen = 0
    with blobs.open(sha) as fh:
        eof = False
        while not eof:
            filled = 0
            while filled < chunk_size:
                n = _read_into(fh, view[filled:])
                if not n:
                    eof = True
                    break
                filled += n
            if filled:
                piece = view[:filled]
                digest.update(piece)
                seen += filled
                yield base64.b64encode(piece)
    view.release()
    if seen != size or digest.hexdigest() != sha:
        raise ArchiveFormatError(
            f"file {sha}", f"blob content changed while streaming ({seen} bytes, expected {size})"
        )


def _read_into(fh: BinaryIO, view: memoryview) -> int:
    readinto = getattr(fh, "readinto", None)
    if readinto is not None:
        return readinto(view) or 0
    data = fh.read(len(view))  # file-likes without readinto (e.g. some SFTP/HTTP streams)
    view[: len(data)] = data
    return len(data)


def write_archive(
    envelope: Envelope,
    recipient: Recipient,
    blobs: BlobReader,
    out: BinaryIO,
    *,
    archive_id: str,
    appids: Mapping[str, str] | None = None,
    sender_appid: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> int:
    """Write the archive for ONE receiver to ``out``; return the number of bytes written.
    See :func:`iter_archive` for the contract (on error ``out`` holds a partial document)."""
    total = 0
    for chunk in iter_archive(
        envelope, recipient, blobs, archive_id=archive_id, appids=appids,
        sender_appid=sender_appid, chunk_size=chunk_size,
    ):
        out.write(chunk)
        total += len(chunk)
    return total


# -- reading -------------------------------------------------------------------------------
def _parse(data: bytes | str, what: str, limits: xmlsafe.XMLLimits | None = None) -> etree._Element:
    try:
        return xmlsafe.parse_legacy(data, limits)
    except xmlsafe.UnsafeXMLError as exc:
        raise ArchiveFormatError(what, exc.reason) from None


def media_type_for(name: str) -> str | None:
    """A best guess at a file's media type from its name (OFD is not in ``mimetypes``)."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot >= 0 else ""
    return _MEDIA_TYPES.get(ext) or mimetypes.guess_type("x" + ext)[0]


def read_archive(
    data: bytes,
    *,
    received: datetime | None = None,
    limits: xmlsafe.XMLLimits | None = None,
) -> tuple[Envelope, list[tuple[Attachment, bytes]]]:
    """Read an inbound archive: the canonical envelope (message id = archiveid, all
    receivers as recipients, ``created`` = ``received`` or now, since the format has no
    creation time) and each file's content, verified against its size and SHA-256."""
    root = _parse(data, "archive", limits or xmlsafe.XMLLimits(large_text=True))
    if root.tag != "archive":
        raise ArchiveFormatError("archive", f"root element is <{root.tag}>, expected <archive>")
    if not root.get("archiveid"):
        raise ArchiveFormatError("archive/@archiveid", "missing")
    if root.get("action", "sendArchive") != "sendArchive":
        raise ArchiveFormatError("archive/@action", f"{root.get('action')!r} is not sendArchive")
    for path in ("sender/@trustorgno", "archiveparameters/title", "archiveparameters/secret/@grade",
                 "archiveparameters/urgency"):
        if not root.xpath(f"string({path})").strip():
            raise ArchiveFormatError(path, "missing or empty")
    if not root.findall("receivers/receiver"):
        raise ArchiveFormatError("receivers/receiver", "the archive names no receiver")

    files = root.findall("files/file")
    contents: list[bytes] = []
    for i, f in enumerate(files, 1):
        field = f"files/file[{i}] ({f.get('name', '?')})"
        if f.get("type") not in ("document", "attachment"):
            raise ArchiveFormatError(field + "/@type", f"{f.get('type')!r} is not document or attachment")
        try:
            size = int(f.get("size", ""))
        except ValueError:
            raise ArchiveFormatError(field + "/@size", f"{f.get('size')!r} is not a number") from None
        try:
            content = base64.b64decode("".join((f.text or "").split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ArchiveFormatError(field, f"content is not valid base64: {exc}") from None
        if len(content) != size:
            raise ArchiveFormatError(field + "/@size", f"says {size} bytes, content has {len(content)}")
        if hashlib.sha256(content).hexdigest() != (f.get("sha256") or "").lower():
            raise ArchiveFormatError(field + "/@sha256", "does not match the content")
        contents.append(content)
        f.text = None  # the transform needs only the attributes

    created = (received or datetime.now(UTC)).isoformat()
    env_root = _transform(_to_envelope(), root, created=created)
    try:
        envelope = Envelope.from_xml(env_root)
    except EnvelopeError as exc:
        raise ArchiveFormatError("archive", f"does not map to a valid envelope: {exc}") from None
    for att in envelope.attachments:
        att.media_type = media_type_for(att.name)
    return envelope, list(zip(envelope.attachments, contents))


def _parse_time(text: str | None, tz: tzinfo) -> datetime:
    if not text or not text.strip():
        raise ArchiveFormatError("receipt/time", "missing")
    try:
        return legacy_time(text, tz)
    except ValueError as exc:
        raise ArchiveFormatError("receipt/time", str(exc)) from None


def parse_receipt(data: bytes | str, tz: tzinfo = CHINA_TZ) -> Receipt:
    """Read a legacy ``receipt`` (回执): ARRIVE/SIGN/RETURN -> ARRIVED/SIGNED/RETURNED.
    ``remote_ref`` = archiveid, ``unit`` = unit/@trustorgno; ``time`` is aware (a time
    without an offset is local time in ``tz``, the legacy system's zone)."""
    root = _parse(data, "receipt")
    if root.tag != "receipt":
        raise ArchiveFormatError("receipt", f"root element is <{root.tag}>, expected <receipt>")
    legacy = root.get("action", "")
    if legacy not in ACTION_FROM_LEGACY:
        raise ArchiveFormatError(
            "receipt/@action", f"{legacy!r} is not one of {', '.join(ACTION_FROM_LEGACY)}"
        )
    archive_id = (root.get("archiveid") or "").strip()
    if not archive_id:
        raise ArchiveFormatError("receipt/@archiveid", "missing")
    unit_el = root.find("unit")
    unit = (unit_el.get("trustorgno") or "").strip() if unit_el is not None else ""
    if not unit:
        raise ArchiveFormatError("receipt/unit/@trustorgno", "missing")
    problem = uscc_problem(unit)
    if problem:
        raise ArchiveFormatError("receipt/unit/@trustorgno", f"{unit}: {problem}")
    receipt_no = (root.findtext("receiptno") or "").strip()
    if not receipt_no:
        raise ArchiveFormatError("receipt/receiptno", "missing")
    signer = (root.findtext("signer") or "").strip() or None
    reason = (root.findtext("reason") or "").strip() or None
    # a receipt names who signed for or returned the copy, and why it was returned (DOMAIN.md)
    if legacy in ("SIGN", "RETURN") and signer is None:
        raise ArchiveFormatError("receipt/signer", f"missing; a {legacy} receipt names who did it")
    if legacy == "RETURN" and reason is None:
        raise ArchiveFormatError("receipt/reason", "missing; a RETURN receipt says why the copy was returned")
    return Receipt(
        unit=unit,
        action=ACTION_FROM_LEGACY[legacy],
        remote_ref=archive_id,
        time=_parse_time(root.findtext("time"), tz),
        signer=signer,
        receipt_no=receipt_no,
        reason=reason,
    )


def write_receipt(receipt: Receipt, *, appid: str | None = None, name: str | None = None) -> bytes:
    """Serialise a receipt in the legacy format (GB18030), as the box and clerks write it.
    ``archiveid`` is ``receipt.remote_ref`` (falling back to ``message_id``)."""
    if receipt.action not in ACTION_TO_LEGACY:
        raise ArchiveFormatError(
            "receipt/@action", f"{receipt.action!r} has no legacy form (only {', '.join(ACTION_TO_LEGACY)})"
        )
    archive_id = receipt.remote_ref or receipt.message_id
    if not archive_id:
        raise ArchiveFormatError("receipt/@archiveid", "the receipt has neither remote_ref nor message_id")
    root = etree.Element("receipt", action=ACTION_TO_LEGACY[receipt.action], archiveid=archive_id)
    unit = etree.SubElement(root, "unit", trustorgno=receipt.unit)
    if appid:
        unit.set("appid", appid)
    if name:
        unit.set("name", name)
    for tag, val in (("signer", receipt.signer), ("reason", receipt.reason)):
        if val:
            etree.SubElement(root, tag).text = val
    t = receipt.time or datetime.now(CHINA_TZ)
    etree.SubElement(root, "time").text = t.isoformat(timespec="seconds")
    if receipt.receipt_no:
        etree.SubElement(root, "receiptno").text = receipt.receipt_no
    return xmlsafe.tostring_gb18030(root)


# -- refusal notes (NAME.xml.error beside a file the legacy side moved to failed/) -----------
def note_text(data: bytes) -> str:
    """A ``.error`` note as text: GB18030 on the legacy side, though UTF-8 is read too."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = xmlsafe.gb18030_decode(data, errors="replace")
    return text.strip()[:2000]


def refusal_item(state: StateStore, mark_key: str, *, ref: str, unit: str, note: bytes, mtime: float, key: str,
                 source: str) -> PolledItem:
    """A REFUSED receipt for the note the legacy side left beside our file ``ref``. Taking
    it (ack) or refusing it (a note for no copy of this node's) raises the high-water mark
    ``mark_key`` of note times (see :func:`refusal_mark`): the note is left where it is either
    way, and a refused one is refused again each time it is read (gateway.inbound.ingest)."""
    receipt = Receipt(unit=unit, action="REFUSED", remote_ref=ref, reason=note_text(note) or "no reason given",
                      time=datetime.fromtimestamp(mtime, UTC))
    item = PolledItem(key=key, receipt=receipt, source=source)

    def taken() -> None:
        state.advance(mark_key, int(mtime))

    item._ack = taken
    item._reject = lambda _reason: taken()
    return item


def refusal_mark(state: StateStore, mark_key: str) -> int:
    """The time of the newest note taken before: older notes are not read again (one of the
    same second is read again, and told apart by its key)."""
    return int(state.get(mark_key, "0") or "0")
