"""The ``xml-exchange`` adapter: the older exchange box (交换箱), ``archive``/``receipt`` XML.

Two modes, chosen by ``mode``:

``http`` (default)
    ``deliver`` POSTs the archive (GB18030, streamed from the blob store) to
    ``<address>/ArchiveHandleServlet``; the box answers an ``ARRIVE`` receipt (到达回执).
    Later ``SIGN``/``RETURN`` receipts (签收/退回) are POSTed by the box to the gateway, which
    hands the body to :meth:`XmlExchangeAdapter.handle_callback`. ``poll`` yields nothing.
``folder``
    A shared folder in the SFTP-drop discipline: ``inbox/GW_<archiveid>.xml`` is written as
    ``.part`` -> fsync -> rename -> empty ``.ok``; receipts ``outbox/HZ_<archiveid>_<unit>.xml``
    (with ``.ok``) are polled, then moved to ``archive/`` on ack or ``failed/`` on reject
    if they still hold what was read (a new receipt under the name waits for the next poll).

The archive id is always :attr:`adapters.base.Delivery.remote_ref`, so a retry is the same
document at the box (it deduplicates by archive id + receiver) and receipts name it.

Configuration (``[adapters.NAME]``)::

    type = "xml-exchange"
    mode = "http"                      # or "folder"
    address = "https://box.example/exchange"   # http: base URL (no /ArchiveHandleServlet)
    timeout = 30                       # http: seconds, connect and between bytes
    verify_tls = true                  # http: verify the box's certificate
    ca_file = "certs/box-ca.pem"       # http: CA bundle (relative to the config folder)
    sender_appid = "ZZF-OA"            # the gateway's application id at the box
    appids = { "1152230107CTPD8U2P" = "JXF-OA" }   # receiver unit code -> appid
    folder = "/srv/exchange"           # folder: root holding inbox/ outbox/ archive/ failed/
    max_per_poll = 100                 # folder: receipts per poll
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import requests
from lxml import etree

from adapters.archive import (
    ACTION_TO_LEGACY,
    ArchiveFormatError,
    ArchiveStream,
    iter_archive,
    note_text,
    parse_receipt,
    refusal_item,
    refusal_mark,
)
from adapters.base import (
    Adapter,
    AdapterContext,
    ConfigError,
    ca_problem,
    Delivery,
    DeliveryResult,
    Health,
    PermanentError,
    PolledItem,
    RetryableError,
    register,
)
from gateway import xmlsafe
from gateway.durable import fsync_dir
from gateway.envelope import Receipt

log = logging.getLogger(__name__)

SERVLET = "/ArchiveHandleServlet"
CONTENT_TYPE = "application/xml; charset=GB18030"
#: Receipts are a few hundred bytes; anything far larger is not a receipt.
MAX_RECEIPT_BYTES = 1024 * 1024
#: Receipt files in outbox/: HZ_<archiveid>_<unit>.xml. The archive id part admits no
#: "_" (it separates the fields) and no path characters; ".." is refused separately.
RECEIPT_NAME = re.compile(  # fullmatch: a $ would take a name ending in a line break
    r"HZ_(?P<ref>[A-Za-z0-9][A-Za-z0-9.-]{0,127})_(?P<unit>[0-9A-HJ-NPQRTUWXY]{18})\.xml"
)
#: What an archive id may look like before it becomes part of a file name.
SAFE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,127}")  # fullmatch: no line break after it
#: the box's note beside an archive of ours it moved to failed/
REFUSED_NOTE = re.compile(r"GW_(?P<ref>[A-Za-z0-9][A-Za-z0-9.-]{0,127})\.xml\.error")


def ack_body(code: int = 0, message: str = "OK") -> bytes:
    """The small GB18030 answer to a callback: ``<result code="0">OK</result>``.
    The HTTP layer may use ``ack_body(1, reason)`` for its 400 answer."""
    root = etree.Element("result", code=str(code))
    root.text = message
    return xmlsafe.tostring_gb18030(root)


def _is_plain_component(name: str) -> bool:
    """True if ``name`` is a single path component that stays inside its folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


#: the settings of an ``xml-exchange`` adapter (besides the gateway's own: retry, callback_*)
KNOWN_KEYS = frozenset({"type", "mode", "appids", "sender_appid", "address", "timeout", "verify_tls", "ca_file",
                        "folder", "max_per_poll"})


@register("xml-exchange")
class XmlExchangeAdapter(Adapter):
    """Exchange box adapter; see the module docstring for modes and configuration."""

    subsystems = frozenset({"documents"})  # the legacy contract carries official documents only

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        super().__init__(name, config, context)
        unknown = sorted(set(self.config) - KNOWN_KEYS)
        if unknown:  # a misspelt key must not silently become its default
            raise ConfigError(f"adapters.{name}.{unknown[0]}: unknown setting; expected one of "
                              f"{', '.join(sorted(KNOWN_KEYS))}")
        self.mode = self.config.get("mode", "http")
        if self.mode not in ("http", "folder"):
            raise ConfigError(f"adapters.{name}.mode: {self.mode!r}; expected \"http\" or \"folder\"")
        appids = self.config.get("appids", {})
        if not isinstance(appids, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in appids.items()
        ):
            raise ConfigError(f"adapters.{name}.appids: expected a table of unit code = \"appid\" strings")
        self.appids: dict[str, str] = dict(appids)
        self.sender_appid: str | None = self.config.get("sender_appid")
        if self.sender_appid is not None and not isinstance(self.sender_appid, str):
            raise ConfigError(f"adapters.{name}.sender_appid: expected a string")
        self._session: requests.Session | None = None
        if self.mode == "http":
            address = self.require("address")
            if not re.match(r"^https?://[^/\s]+", address):
                raise ConfigError(f"adapters.{name}.address: {address!r} is not an http(s) URL")
            self.address = address.rstrip("/")
            timeout = self.config.get("timeout", 30)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ConfigError(f"adapters.{name}.timeout: expected a positive number of seconds")
            self.timeout = float(timeout)
            verify = self.config.get("verify_tls", True)
            if not isinstance(verify, bool):
                raise ConfigError(f"adapters.{name}.verify_tls: expected true or false")
            self.verify: bool | str = verify
            if "ca_file" in self.config:
                ca = Path(self.require("ca_file"))
                ca = ca if ca.is_absolute() else context.base_dir / ca
                problem = ca_problem(ca)
                if problem:
                    raise ConfigError(f"adapters.{name}.ca_file: {problem}")
                self.verify = str(ca) if verify else False
        else:
            folder = Path(self.require("folder"))
            self.folder = folder if folder.is_absolute() else context.base_dir / folder
            self.max_per_poll = self.config.get("max_per_poll", 100)
            if isinstance(self.max_per_poll, bool) or not isinstance(self.max_per_poll, int) \
                    or self.max_per_poll < 1:
                raise ConfigError(f"adapters.{name}.max_per_poll: expected a positive integer")

    # -- delivery ------------------------------------------------------------------------
    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Hand the envelope to the box for one receiver; idempotent by archive id."""
        ref = delivery.remote_ref
        if self.mode == "folder":
            return self._deliver_folder(delivery, ref)
        return self._deliver_http(delivery, ref)

    def _archive(self, delivery: Delivery, ref: str) -> ArchiveStream:
        try:
            return iter_archive(
                delivery.envelope, delivery.recipient, self.context.blobs,
                archive_id=ref, appids=self.appids, sender_appid=self.sender_appid,
            )
        except ArchiveFormatError as exc:
            # The envelope cannot be expressed as an archive: retrying changes nothing.
            raise PermanentError(f"cannot write the archive: {exc}", code="bad-envelope") from None

    def _http(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def _deliver_http(self, delivery: Delivery, ref: str) -> DeliveryResult:
        body = self._archive(delivery, ref)
        url = self.address + SERVLET
        try:
            resp = self._http().post(
                url, data=body, headers={"Content-Type": CONTENT_TYPE}, timeout=self.timeout,
                verify=self.verify, allow_redirects=False, stream=True,
            )
            try:
                answer = self._read_limited(resp)
            finally:
                resp.close()
        except ArchiveFormatError as exc:  # a blob changed while streaming
            raise RetryableError(f"archive {ref} aborted while sending: {exc}") from None
        except requests.Timeout:
            raise RetryableError(f"the exchange box at {url} timed out after {self.timeout:g} s",
                                 code="timeout") from None
        except requests.RequestException as exc:
            raise RetryableError(f"cannot reach the exchange box at {url}: {exc}",
                                 code="unreachable") from None

        status = resp.status_code
        if status >= 500 or status in (408, 429):
            raise RetryableError(f"the exchange box answered HTTP {status}: {_snippet(answer)}",
                                 code=f"http-{status}")
        if 400 <= status < 500:
            raise PermanentError(f"the exchange box refused archive {ref} with HTTP {status}: "
                                 f"{_snippet(answer)}", code=f"http-{status}")
        if not 200 <= status < 300:
            # A redirect cannot be followed with a streamed body; the address is likely wrong,
            # which an administrator can fix, so the delivery waits rather than fails.
            raise RetryableError(f"the exchange box answered HTTP {status} "
                                 f"(Location: {resp.headers.get('Location')}); check the address",
                                 code=f"http-{status}")
        try:
            receipt = parse_receipt(answer, self.legacy_tz)
        except ArchiveFormatError as exc:
            raise RetryableError(f"the exchange box accepted archive {ref} with HTTP {status} but "
                                 f"its answer is not a valid ARRIVE receipt: {exc}",
                                 code="bad-answer") from None
        expected = ("ARRIVED", ref, delivery.recipient.unit)
        got = (receipt.action, receipt.remote_ref, receipt.unit)
        if got != expected:
            raise RetryableError(f"the exchange box answered a receipt for {got}, expected {expected}",
                                 code="bad-answer")
        return DeliveryResult(remote_id=ref, detail=f"ARRIVED {receipt.receipt_no}")

    @staticmethod
    def _read_limited(resp: requests.Response) -> bytes:
        buf = bytearray()
        for chunk in resp.iter_content(65536):
            buf += chunk
            if len(buf) > MAX_RECEIPT_BYTES:
                break  # enough to show what went wrong; a receipt is never this large
        return bytes(buf)

    # -- callbacks (http mode) -----------------------------------------------------------
    def handle_callback(self, body: bytes, content_type: str) -> tuple[list[PolledItem], bytes, str]:
        """Take a receipt the box POSTs (SIGN/RETURN, or ARRIVE). Returns one item and a
        ``<result code="0">OK</result>`` answer; a malformed body raises
        :class:`PermanentError` (the HTTP layer answers 400 and the box may resend)."""
        if len(body) > MAX_RECEIPT_BYTES:
            raise PermanentError(f"callback body of {len(body)} bytes is too large for a receipt",
                                 code="bad-receipt")
        data: bytes | str = body
        charset = _charset(content_type)
        if xmlsafe.declared_encoding(body) is None and charset and charset not in ("utf-8", "utf8"):
            # No XML declaration: the Content-Type charset is all that says how to decode.
            try:
                data = (xmlsafe.gb18030_decode(body) if charset in xmlsafe.GB_FAMILY
                        else body.decode(charset))
            except (LookupError, UnicodeDecodeError) as exc:
                raise PermanentError(f"callback body is not valid {charset}: {exc}",
                                     code="bad-receipt") from None
        try:
            receipt = parse_receipt(data, self.legacy_tz)
        except ArchiveFormatError as exc:
            raise PermanentError(f"malformed receipt callback: {exc}", code="bad-receipt") from None
        item = PolledItem(key=self.callback_key(receipt), receipt=receipt, source=f"{self.name}:callback")
        return [item], ack_body(), CONTENT_TYPE

    def callback_key(self, receipt: Receipt) -> str:
        """Stable key of a pushed receipt: the box resending it gives the same key."""
        return (f"{self.name}:{receipt.remote_ref}:{receipt.unit}:"
                f"{ACTION_TO_LEGACY[receipt.action]}:{receipt.receipt_no}")

    # -- folder mode ---------------------------------------------------------------------
    def _sub(self, name: str) -> Path:
        # Never create the root: if a share is not mounted, writing into the empty mount
        # point would "deliver" to a local disk nobody reads.
        if not self.folder.is_dir():
            raise RetryableError(f"the exchange folder {self.folder} does not exist (not mounted?)",
                                 code="unreachable")
        path = self.folder / name
        path.mkdir(exist_ok=True)
        return path

    def _deliver_folder(self, delivery: Delivery, ref: str) -> DeliveryResult:
        if not SAFE_REF.fullmatch(ref):
            raise PermanentError(f"archive id {ref!r} cannot be used in a file name", code="bad-name")
        name = f"GW_{ref}.xml"
        try:
            inbox, done, failed = self._sub("inbox"), self._sub("archive"), self._sub("failed")
            if (done / name).exists():
                return DeliveryResult(remote_id=ref, detail=f"already taken by the box (archive/{name})")
            if (failed / name).exists():
                note = _read_note(failed / (name + ".error"))
                raise PermanentError(f"the box rejected {name}: {note}", code="rejected")
            final, ok = inbox / name, inbox / (name + ".ok")
            if final.exists():
                # A retry after a crash between rename and .ok: finish the protocol only.
                if not ok.exists():
                    ok.touch()
                    fsync_dir(inbox)
                return DeliveryResult(remote_id=ref, detail=f"already in inbox/{name}")
            stream = self._archive(delivery, ref)
            part = inbox / (name + ".part")
            try:
                with open(part, "wb") as fh:
                    fh.writelines(stream)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(part, final)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            fsync_dir(inbox)
            ok.touch()
            fsync_dir(inbox)
        except ArchiveFormatError as exc:  # a blob changed while streaming
            raise RetryableError(f"archive {ref} aborted while writing: {exc}") from None
        except OSError as exc:
            raise RetryableError(f"cannot write {name} to {self.folder}: {exc}", code="io") from None
        return DeliveryResult(remote_id=ref, detail=f"written inbox/{name}")

    def _list_outbox(self, outbox: Path) -> list[str]:
        """Names in outbox/, sorted so polls are deterministic. (A seam for tests: names
        come from another system and are treated as untrusted, whatever lists them.)"""
        return sorted(os.listdir(outbox))

    def poll(self) -> Iterable[PolledItem]:
        """Receipts in folder mode (at most ``max_per_poll``); nothing in http mode, where
        receipts arrive through :meth:`handle_callback`."""
        if self.mode != "folder":
            return []
        try:
            outbox = self._sub("outbox")
            names = self._list_outbox(outbox)
        except OSError as exc:
            raise RetryableError(f"cannot list {self.folder}/outbox: {exc}", code="io") from None
        present = set(names)
        items: list[PolledItem] = []
        for name in names:
            if len(items) >= self.max_per_poll:
                break
            if not name.endswith(".xml"):
                continue  # .ok / .part / .error companions, or foreign files
            if not _is_plain_component(name) or ".." in name:
                # Never joined to a path: only reported.
                log.warning("%s: refusing outbox entry %r: not a plain file name", self.name, name)
                if _is_plain_component(name) and name + ".ok" in present:
                    self._quarantine(outbox, name, "the file name contains '..'")
                continue
            if name + ".ok" not in present:
                continue  # the writer has not finished (.ok comes last)
            item = self._read_receipt_file(outbox, name)
            if item is not None:
                items.append(item)
        items += self._refusals(self.max_per_poll - len(items))
        return items

    def _refusals(self, budget: int) -> list[PolledItem]:
        """The box moves an archive it cannot take to ``failed/`` beside ``GW_<id>.xml.error``:
        each such note becomes a REFUSED receipt, so the copy fails with the note as reason
        instead of staying delivered (as on the SFTP drop). The box's files are left where
        they are; the note's SHA-256 in the key, and a high-water mark of the notes' mtimes,
        keep a note from being taken twice."""
        failed = self.folder / "failed"
        try:
            names = self._list_outbox(failed) if failed.is_dir() else []
        except OSError as exc:
            log.warning("%s: cannot list failed/: %s", self.name, exc)
            return []
        mark = refusal_mark(self.context.state, "refused-mtime")
        out: list[PolledItem] = []
        for name in names:
            if len(out) >= budget:
                break
            m = REFUSED_NOTE.fullmatch(name)
            if m is None:
                continue
            path = failed / name
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or int(st.st_mtime) < mark:
                    continue
                note = path.read_bytes()[:64 * 1024]
            except OSError:
                continue
            out.append(refusal_item(self.context.state, "refused-mtime", ref=m["ref"], unit="", note=note,
                                    mtime=st.st_mtime, key=f"{self.name}:failed/{name}:{hashlib.sha256(note).hexdigest()}",
                                    source=f"{self.folder}/failed/{name}"))
        return out

    def _read_receipt_file(self, outbox: Path, name: str) -> PolledItem | None:
        m = RECEIPT_NAME.fullmatch(name)
        if not m:
            self._quarantine(outbox, name, "the file name does not match HZ_<archiveid>_<unit>.xml")
            return None
        path = outbox / name
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                self._quarantine(outbox, name, "not a regular file (a link or device is never followed)")
                return None
            if st.st_size > MAX_RECEIPT_BYTES:
                self._quarantine(outbox, name, f"{st.st_size} bytes is too large for a receipt")
                return None
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(MAX_RECEIPT_BYTES + 1)
        except FileNotFoundError:
            return None  # taken meanwhile by another instance
        except OSError as exc:
            log.warning("%s: cannot read outbox/%s: %s", self.name, name, exc)
            return None
        try:
            receipt = parse_receipt(data, self.legacy_tz)
        except ArchiveFormatError as exc:
            self._quarantine(outbox, name, f"not a valid receipt: {exc}")
            return None
        if (receipt.remote_ref, receipt.unit) != (m["ref"], m["unit"]):
            self._quarantine(outbox, name, f"the receipt inside names archive {receipt.remote_ref} "
                                           f"and unit {receipt.unit}, not those of the file name")
            return None
        sha = hashlib.sha256(data).hexdigest()
        return PolledItem(
            key=f"{self.name}:file:{name}:{sha}",
            receipt=receipt,
            source=f"{self.name}:outbox/{name}",
            # only the file as read: another instance may have taken it meanwhile, and the box
            # then writes its next receipt under the same name (an ARRIVE, then a SIGN)
            _ack=partial(self._move, outbox, name, "archive", None, expect=sha),
            _reject=partial(self._reject_file, outbox, name, expect=sha),
        )

    def _move(self, outbox: Path, name: str, dest_name: str, note: str | None, *, expect: str | None = None) -> None:
        """Move NAME.xml then NAME.xml.ok to dest/ (the .xml first: a crash in between
        leaves an orphan .ok, which poll ignores, never a receipt to ingest twice). With
        ``expect`` (SHA-256), only if the file still holds what was read."""
        if expect is not None and not _holds(outbox / name, expect):
            log.info("%s: outbox/%s changed since it was read (taken by another instance, a new receipt "
                     "under its name): left for the next poll", self.name, name)
            return
        dest = self._sub(dest_name)
        target = name
        if (dest / target).exists():
            # Same name seen before (the legacy side reuses HZ_ names): keep both copies (a
            # random part, as the SFTP adapter's: two reuses within a second stay apart)
            target = f"{name[:-4]}.{datetime.now(self.legacy_tz):%Y%m%d%H%M%S}.{secrets.token_hex(3)}.xml"
        if note is not None:
            (dest / (target + ".error")).write_bytes(xmlsafe.gb18030_encode(note))
        try:
            os.replace(outbox / name, dest / target)
        except FileNotFoundError:
            return  # already moved by another instance: ack/reject are idempotent
        try:
            os.replace(outbox / (name + ".ok"), dest / (target + ".ok"))
        except FileNotFoundError:
            pass
        fsync_dir(dest)
        fsync_dir(outbox)

    def _reject_file(self, outbox: Path, name: str, reason: str, *, expect: str | None = None) -> None:
        self._move(outbox, name, "failed", reason, expect=expect)

    def _quarantine(self, outbox: Path, name: str, reason: str) -> None:
        log.warning("%s: moving outbox/%s to failed/: %s", self.name, name, reason)
        try:
            self._move(outbox, name, "failed", reason)
        except (OSError, RetryableError) as exc:
            log.warning("%s: cannot move outbox/%s to failed/: %s", self.name, name, exc)

    # -- health --------------------------------------------------------------------------
    def check(self) -> Health:
        """http: any HTTP answer from the address means reachable; folder: the folder exists
        and is writable."""
        start = time.monotonic()
        if self.mode == "folder":
            ok = self.folder.is_dir() and os.access(self.folder, os.W_OK | os.X_OK)
            ms = (time.monotonic() - start) * 1000
            msg = f"{self.folder} is writable" if ok else f"{self.folder} is missing or not writable"
            return Health(ok, msg, ms)
        try:
            resp = self._http().head(self.address, timeout=min(self.timeout, 10.0), verify=self.verify,
                                     allow_redirects=False)
            resp.close()
        except requests.RequestException as exc:
            return Health(False, f"cannot reach {self.address}: {exc}")
        return Health(True, f"{self.address} answered HTTP {resp.status_code}",
                      (time.monotonic() - start) * 1000)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None



def _charset(content_type: str | None) -> str | None:
    m = re.search(r"charset\s*=\s*\"?([A-Za-z0-9._-]+)", content_type or "", re.IGNORECASE)
    return m.group(1).lower() if m else None


def _holds(path: Path, sha256: str) -> bool:
    """Whether the file at ``path`` is there and holds the content of that SHA-256."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(MAX_RECEIPT_BYTES + 1)
    except FileNotFoundError:
        return False  # moved already (a repeated ack, or another instance's)
    return hashlib.sha256(data).hexdigest() == sha256


def _read_note(path: Path) -> str:
    try:
        return note_text(path.read_bytes()[:64 * 1024]) or "no reason given"
    except OSError:
        return "no reason given"


def _snippet(body: bytes, limit: int = 300) -> str:
    """A short, printable excerpt of an answer for error messages (legacy boxes answer
    GB18030; an error ``<receipt>``/``<result>`` text is preferred when present)."""
    text = xmlsafe.gb18030_decode(body[:4000], "replace")
    m = re.search(r"<(?:error|result|message)[^>]*>([^<]{1,500})<", text)
    text = m.group(1) if m else text
    text = " ".join(text.split())
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty answer)")
