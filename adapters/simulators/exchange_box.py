"""Simulated exchange box (交换箱) and folder clerk, following ``shared/legacy/README.md``
section 3 (and section 2's file discipline for :class:`FolderClerk`).

NOT production code. The pieces:

* :class:`ExchangeBox` - a WSGI app taking ``POST /ArchiveHandleServlet`` (a GB18030
  ``archive``), deduplicating by archiveid + receiver and answering an ``ARRIVE`` receipt;
  invalid input gets HTTP 400 with a receipt-like error body. A clerk API (:meth:`sign`,
  :meth:`return_archive`) POSTs ``SIGN``/``RETURN`` receipts to ``callback_url`` from a
  background thread, retrying a few times; ``auto_sign`` signs every new archive after a delay.
* :class:`ExchangeBoxState` - everything the box saw, with counters, so tests can assert
  that each effect happened exactly once.
* :class:`ExchangeBoxServer` - runs an :class:`ExchangeBox` on 127.0.0.1 (port 0 = free port)
  under ``werkzeug.serving.make_server(threaded=True)``; restartable on the same port.
* :class:`FolderClerk` - the legacy clerk of a shared folder / SFTP drop: takes
  ``inbox/GW_<id>.xml`` files that have their ``.ok``, moves them to ``archive/`` and writes
  ``outbox/HZ_<id>_<unit>.xml`` receipts (``.part`` -> rename -> ``.ok``). Any folder root.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests
from lxml import etree
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from adapters.archive import write_receipt
from gateway import xmlsafe
from gateway.envelope import Receipt

log = logging.getLogger(__name__)

CST = timezone(timedelta(hours=8))
CONTENT_TYPE = "application/xml; charset=GB18030"
GW_NAME = re.compile(r"GW_(?P<ref>[A-Za-z0-9][A-Za-z0-9.-]{0,127})\.xml")  # fullmatch


class ArchiveRejected(ValueError):
    """The box refuses an archive; ``status`` is the HTTP status it answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Receiver:
    unit: str
    appid: str | None = None
    name: str | None = None


def check_archive(root: etree._Element) -> tuple[str, list[Receiver]]:
    """What the legacy box checks on an archive: shape, receivers, file sizes and SHA-256.
    Returns (archiveid, receivers) or raises :class:`ArchiveRejected`."""
    if root.tag != "archive":
        raise ArchiveRejected(f"root element is <{root.tag}>, expected <archive>")
    if root.get("action") != "sendArchive":
        raise ArchiveRejected(f"archive/@action {root.get('action')!r} is not sendArchive")
    archive_id = root.get("archiveid") or ""
    if not archive_id:
        raise ArchiveRejected("archive/@archiveid is missing")
    if not root.findtext("archiveparameters/title"):
        raise ArchiveRejected("archiveparameters/title is missing")
    receivers = [
        Receiver(r.get("trustorgno", ""), r.get("appid"), r.get("name"))
        for r in root.findall("receivers/receiver")
    ]
    if not receivers or not all(r.unit for r in receivers):
        raise ArchiveRejected("receivers/receiver/@trustorgno is missing")
    for f in root.findall("files/file"):
        try:
            content = base64.b64decode("".join((f.text or "").split()), validate=True)
        except (binascii.Error, ValueError):
            raise ArchiveRejected(f"file {f.get('name')}: content is not base64") from None
        if str(len(content)) != f.get("size") or hashlib.sha256(content).hexdigest() != f.get("sha256"):
            raise ArchiveRejected(f"file {f.get('name')}: size or sha256 does not match the content")
    return archive_id, receivers


def error_body(message: str, archive_id: str = "", code: int = 400) -> bytes:
    """The box's receipt-like error answer (GB18030)."""
    root = etree.Element("receipt", action="ERROR", archiveid=archive_id)
    etree.SubElement(root, "error", code=str(code)).text = message
    etree.SubElement(root, "time").text = datetime.now(CST).isoformat(timespec="seconds")
    return xmlsafe.tostring_gb18030(root)


# -- the box -------------------------------------------------------------------------------
@dataclass
class ReceivedArchive:
    archive_id: str
    receiver: Receiver
    body: bytes  # the POST body exactly as received
    content_type: str
    content_length: str | None
    receipt_no: str
    received_at: datetime
    title: str
    status: str = "ARRIVED"  # ARRIVED -> SIGNED | RETURNED


@dataclass
class CallbackJob:
    """One receipt the box pushes to the gateway; :meth:`wait` until it is settled."""

    receipt: Receipt
    body: bytes
    attempts: int = 0
    delivered: bool = False
    last_error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 10.0) -> bool:
        """True once the callback was answered 2xx; False if it gave up or timed out."""
        self.done.wait(timeout)
        return self.delivered


class ExchangeBoxState:
    """What the box received and did. ``archives`` is keyed by (archiveid, receiver unit);
    ``counters``: posts, accepted, duplicates, rejected, callbacks_sent, callback_failures.

    Bounded: the box runs inside ``gateway serve`` (embedded default) for as long as the node
    does, and each archive holds the whole POST body, so only the newest archives are kept,
    at most ``max_archives`` of them and ``max_bytes`` of bodies (the newest always; the
    oldest dropped first: a clerk signing one of those gets KeyError, a sender posting it
    again gets a new receipt), and the newest ``max_log`` callbacks and rejections."""

    def __init__(self, max_archives: int = 10_000, max_bytes: int = 32 * 1024 * 1024,
                 max_log: int = 1_000) -> None:
        self.lock = threading.RLock()
        self.max_archives = max_archives
        self.max_bytes = max_bytes
        self._bytes = 0  # bodies held in archives (one body may be shared by several receivers)
        self.archives: dict[tuple[str, str], ReceivedArchive] = {}
        self.counters: Counter[str] = Counter()
        self.callbacks: deque[CallbackJob] = deque(maxlen=max_log)
        self.rejections: deque[tuple[int, str]] = deque(maxlen=max_log)
        self._seq = itertools.count(1)

    def keep(self, key: tuple[str, str], rec: ReceivedArchive) -> None:
        """Store ``rec`` (hold :attr:`lock`), dropping the oldest archives past the bound."""
        self.archives[key] = rec
        self._bytes += len(rec.body)
        while len(self.archives) > 1 and (len(self.archives) > self.max_archives or self._bytes > self.max_bytes):
            self._bytes -= len(self.archives.pop(next(iter(self.archives))).body)

    def next_receipt_no(self) -> str:
        with self.lock:
            return f"BOX-{datetime.now(CST):%Y%m%d}-{next(self._seq):05d}"


class ExchangeBox:
    """The WSGI app and the clerk (签收员) API of one simulated exchange box."""

    def __init__(
        self,
        state: ExchangeBoxState | None = None,
        *,
        callback_url: str | None = None,
        auto_sign: bool = False,
        auto_sign_delay: float = 1.0,
        auto_signer: str = "值班员",
        known_units: Iterable[str] | None = None,
        max_bytes: int = xmlsafe.DEFAULT_MAX_BYTES,
        callback_attempts: int = 5,
        callback_backoff: float = 0.2,
    ) -> None:
        self.state = state or ExchangeBoxState()
        self.callback_url = callback_url
        self.auto_sign = auto_sign
        self.auto_sign_delay = auto_sign_delay
        self.auto_signer = auto_signer
        #: Units with an account at the box; None = every unit. Others get HTTP 400.
        self.known_units = set(known_units) if known_units is not None else None
        self.max_bytes = max_bytes
        self.callback_attempts = callback_attempts
        self.callback_backoff = callback_backoff
        #: False = overloaded: every POST answers 503 (the adapter must retry).
        self.available = True

    # -- HTTP ----------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.handle(Request(environ))(environ, start_response)

    def handle(self, req: Request) -> Response:
        if not req.path.rstrip("/").endswith("/ArchiveHandleServlet"):
            if req.method in ("GET", "HEAD") and req.path == "/":
                return Response("exchange box simulator\n", content_type="text/plain; charset=utf-8")
            return Response("not found\n", status=404, content_type="text/plain; charset=utf-8")
        if req.method != "POST":
            return Response("POST only\n", status=405, headers={"Allow": "POST"})
        with self.state.lock:
            self.state.counters["posts"] += 1
        if not self.available:
            return Response(error_body("the box is busy, try later", code=503), status=503,
                            content_type=CONTENT_TYPE)
        if req.content_length is not None and req.content_length > self.max_bytes:
            return self._reject(413, f"the archive is larger than {self.max_bytes} bytes")
        if req.mimetype not in ("application/xml", "text/xml"):
            return self._reject(415, f"Content-Type {req.mimetype!r}; expected application/xml")
        data = req.get_data(cache=False)
        try:
            root = xmlsafe.parse(data, xmlsafe.XMLLimits(max_bytes=self.max_bytes, large_text=True))
            archive_id, receivers = check_archive(root)
        except xmlsafe.UnsafeXMLError as exc:
            return self._reject(400, f"invalid XML: {exc.reason}")
        except ArchiveRejected as exc:
            return self._reject(exc.status, str(exc))
        unknown = [r.unit for r in receivers if self.known_units is not None and r.unit not in self.known_units]
        if unknown:
            return self._reject(400, f"receiver {', '.join(unknown)} has no account at the box", archive_id)

        answers: list[ReceivedArchive] = []
        new: list[ReceivedArchive] = []
        with self.state.lock:
            for r in receivers:
                key = (archive_id, r.unit)
                rec = self.state.archives.get(key)
                if rec is not None:
                    self.state.counters["duplicates"] += 1  # same archive again: same answer
                else:
                    rec = ReceivedArchive(
                        archive_id, r, data, req.headers.get("Content-Type", ""),
                        req.headers.get("Content-Length"), self.state.next_receipt_no(),
                        datetime.now(CST), root.findtext("archiveparameters/title") or "",
                    )
                    self.state.keep(key, rec)
                    self.state.counters["accepted"] += 1
                    new.append(rec)
                answers.append(rec)
        if self.auto_sign:
            for rec in new:
                t = threading.Timer(self.auto_sign_delay, self._auto_sign, (rec.archive_id, rec.receiver.unit))
                t.daemon = True
                t.start()
        # One answer per POST: the receipt of the first receiver (the gateway sends one).
        first = answers[0]
        receipt = Receipt(unit=first.receiver.unit, action="ARRIVED", remote_ref=archive_id,
                          time=first.received_at, receipt_no=first.receipt_no)
        body = write_receipt(receipt, appid=first.receiver.appid, name=first.receiver.name)
        return Response(body, status=200, content_type=CONTENT_TYPE)

    def _reject(self, status: int, message: str, archive_id: str = "") -> Response:
        with self.state.lock:
            self.state.counters["rejected"] += 1
            self.state.rejections.append((status, message))
        return Response(error_body(message, archive_id, status), status=status, content_type=CONTENT_TYPE)

    # -- clerk ---------------------------------------------------------------------------
    def sign(self, archive_id: str, unit: str, signer: str = "签收人") -> CallbackJob:
        """The receiver's clerk signs for (签收) the archive: a SIGN receipt is pushed."""
        return self._clerk(archive_id, unit, "SIGNED", signer, None)

    def return_archive(self, archive_id: str, unit: str, reason: str, signer: str = "签收人") -> CallbackJob:
        """The clerk returns (退回) the archive with a reason: a RETURN receipt is pushed."""
        return self._clerk(archive_id, unit, "RETURNED", signer, reason)

    def _auto_sign(self, archive_id: str, unit: str) -> None:
        try:
            self.sign(archive_id, unit, self.auto_signer)
        except (KeyError, ValueError) as exc:  # signed or returned by hand meanwhile
            log.info("auto-sign of %s for %s skipped: %s", archive_id, unit, exc)

    def _clerk(self, archive_id: str, unit: str, action: str, signer: str, reason: str | None) -> CallbackJob:
        with self.state.lock:
            rec = self.state.archives.get((archive_id, unit))
            if rec is None:
                raise KeyError(f"the box holds no archive {archive_id} for {unit}")
            if rec.status != "ARRIVED":
                raise ValueError(f"archive {archive_id} for {unit} is already {rec.status}")
            rec.status = action
            receipt = Receipt(unit=unit, action=action, remote_ref=archive_id, time=datetime.now(CST),
                              signer=signer, receipt_no=self.state.next_receipt_no(), reason=reason)
        job = CallbackJob(receipt, write_receipt(receipt, appid=rec.receiver.appid, name=rec.receiver.name))
        with self.state.lock:
            self.state.callbacks.append(job)
        if not self.callback_url:
            job.last_error = "no callback_url configured"
            job.done.set()
        else:
            threading.Thread(target=self._push, args=(job,), name="box-callback", daemon=True).start()
        return job

    def _push(self, job: CallbackJob) -> None:
        """POST the receipt to the callback address, retrying with backoff (the real box
        retries a few times, then leaves the receipt for an operator)."""
        assert self.callback_url
        delay = self.callback_backoff
        for attempt in range(1, self.callback_attempts + 1):
            job.attempts = attempt
            try:
                resp = requests.post(self.callback_url, data=job.body,
                                     headers={"Content-Type": CONTENT_TYPE}, timeout=5)
                if 200 <= resp.status_code < 300:
                    job.delivered = True
                    with self.state.lock:
                        self.state.counters["callbacks_sent"] += 1
                    break
                job.last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except requests.RequestException as exc:
                job.last_error = str(exc)
            with self.state.lock:
                self.state.counters["callback_failures"] += 1
            if attempt < self.callback_attempts:
                time.sleep(delay)
                delay *= 2
        job.done.set()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # tests and demo stay readable
        pass


class ExchangeBoxServer:
    """Serve an :class:`ExchangeBox` on ``host:port`` (0 = a free port, kept across
    restarts so ``stop()``/``start()`` simulates the box going down and coming back)."""

    def __init__(self, box: ExchangeBox | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.box = box or ExchangeBox()
        self.host = host
        self.port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> ExchangeBoxState:
        return self.box.state

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ExchangeBoxServer:
        if self._server is not None:
            return self
        self._server = make_server(self.host, self.port, self.box, threaded=True,
                                   request_handler=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="exchange-box", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> ExchangeBoxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the folder clerk ----------------------------------------------------------------------
@dataclass
class TakenArchive:
    archive_id: str
    receivers: list[Receiver]
    path: Path  # where it lies now, under archive/


class FolderClerk:
    """The legacy clerk of one folder root with ``inbox/ outbox/ archive/ failed/`` (the
    exchange box's shared folder, or one unit's folder on the SFTP drop)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("inbox", "outbox", "archive", "failed"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._seq = itertools.count(1)

    def take(self) -> list[TakenArchive]:
        """Take every finished ``inbox/GW_*.xml`` (its ``.ok`` exists): valid ones move to
        ``archive/``, invalid ones to ``failed/`` beside a ``.error`` note (GB18030)."""
        inbox = self.root / "inbox"
        taken: list[TakenArchive] = []
        for name in sorted(os.listdir(inbox)):
            m = GW_NAME.fullmatch(name)
            if not m or not (inbox / (name + ".ok")).exists():
                continue
            try:
                root = xmlsafe.parse((inbox / name).read_bytes(), xmlsafe.XMLLimits(large_text=True))
                archive_id, receivers = check_archive(root)
                if archive_id != m["ref"]:
                    raise ArchiveRejected(f"archiveid {archive_id} does not match the file name")
            except (xmlsafe.UnsafeXMLError, ArchiveRejected) as exc:
                self._move(name, "failed", note=str(exc))
                continue
            taken.append(TakenArchive(archive_id, receivers, self._move(name, "archive")))
        return taken

    def _move(self, name: str, dest: str, note: str | None = None) -> Path:
        src, dst = self.root / "inbox", self.root / dest
        if note is not None:
            (dst / (name + ".error")).write_bytes(xmlsafe.gb18030_encode(note))
        os.replace(src / name, dst / name)
        try:
            os.replace(src / (name + ".ok"), dst / (name + ".ok"))
        except FileNotFoundError:
            pass
        return dst / name

    def write_receipt(
        self,
        archive_id: str,
        unit: str,
        action: str,
        *,
        signer: str | None = None,
        reason: str | None = None,
        receipt_no: str | None = None,
        appid: str | None = None,
        name: str | None = None,
    ) -> Path:
        """Write ``outbox/HZ_<archiveid>_<unit>.xml`` (``.part`` -> fsync -> rename -> ``.ok``).
        ``action`` is canonical (ARRIVED/SIGNED/RETURNED). Refuses to overwrite a receipt
        not yet collected (the legacy name has no room for two)."""
        outbox = self.root / "outbox"
        fname = f"HZ_{archive_id}_{unit}.xml"
        final = outbox / fname
        if final.exists():
            raise FileExistsError(f"{final} has not been collected yet")
        receipt = Receipt(unit=unit, action=action, remote_ref=archive_id, time=datetime.now(CST),
                          signer=signer, reason=reason,
                          receipt_no=receipt_no or f"CLK-{datetime.now(CST):%Y%m%d%H%M%S}-{next(self._seq):04d}")
        part = outbox / (fname + ".part")
        with open(part, "wb") as fh:
            fh.write(write_receipt(receipt, appid=appid, name=name))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, final)
        (outbox / (fname + ".ok")).touch()
        return final

    def sign(self, archive_id: str, unit: str, signer: str = "签收人") -> Path:
        return self.write_receipt(archive_id, unit, "SIGNED", signer=signer)

    def return_archive(self, archive_id: str, unit: str, reason: str, signer: str = "签收人") -> Path:
        return self.write_receipt(archive_id, unit, "RETURNED", signer=signer, reason=reason)

    def process(self, action: str = "SIGNED", signer: str = "签收人", reason: str | None = None) -> list[Path]:
        """Take everything in the inbox and answer each receiver with one receipt."""
        out = []
        for t in self.take():
            for r in t.receivers:
                out.append(self.write_receipt(t.archive_id, r.unit, action, signer=signer,
                                              reason=reason, appid=r.appid, name=r.name))
        return out
