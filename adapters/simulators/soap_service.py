"""Simulated legacy document exchange service (公文交换服务), SOAP 1.1 document/literal wrapped.

Follows the fixed contract in ``../shared/legacy/README.md`` section 1 and
``schemas/legacy/docexchange.wsdl`` exactly, because the real service will be pointed at the
gateway in its place:

* ``GET <path>?wsdl`` serves the contract WSDL, its service location rewritten to this address;
* ``SendDocument`` validates against the WSDL's schema and the value sets (密级, 紧急程度, 文种),
  deduplicates by ``doc_id`` (same id → same receipt id, no second effect);
* ``QueryStatus``, ``FetchReceipts`` (seq > since_seq, oldest first, at most 500) and
  ``RecallDocument`` (``RECALLED``, or ``TOO_LATE`` once signed for);
* invalid input answers a SOAP 1.1 Fault ``Client.*`` (HTTP 500, as SOAP 1.1 requires).

Receipts (回执) appear when a clerk signs for (签收) or returns (退回) a document: here through the
clerk API of :class:`DocExchangeState` (``sign``, ``return_document``, or ``auto_sign``).
Tests and benchmarks inject trouble with :meth:`DocExchangeState.fail_next` and
:attr:`DocExchangeState.response_delay`.

A plain WSGI app: requests are parsed with :func:`gateway.xmlsafe.parse` only, responses built
with lxml. Not production code (see the package docstring).
"""
from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Self

from lxml import etree
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from gateway import SCHEMAS, xmlsafe

log = logging.getLogger(__name__)

DOCEX_NS = "urn:egov:docexchange:v1"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
WSDL_SOAP11_NS = "http://schemas.xmlsoap.org/wsdl/soap/"
XSD_NS = "http://www.w3.org/2001/XMLSchema"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"

WSDL_PATH = SCHEMAS / "legacy" / "docexchange.wsdl"

#: Value sets of the contract.
CLASSIFICATIONS = ("非密", "秘密", "机密", "绝密")  # 密级
URGENCIES = ("特急", "加急", "平件")  # 紧急程度
#: The 15 文种 of the 党政机关公文处理工作条例, plus 令 (the short form of 命令) which the real
#: system also accepts.
DOC_TYPES = (
    "决议", "决定", "命令", "公报", "公告", "通告", "意见", "通知",
    "通报", "报告", "请示", "批复", "议案", "函", "纪要", "令",
)
SEND_FIELDS = (
    "doc_id", "title", "issuer", "doc_number", "doc_type",
    "classification", "urgency", "recipient_unit", "body_name", "body",
)
STATUSES = ("RECEIVED", "SIGNED", "RETURNED", "RECALLED", "UNKNOWN")
MAX_RECEIPTS_PER_PAGE = 500
FAILURE_KINDS = ("http503", "server-fault", "client-fault")
#: The legacy system keeps local time (China Standard Time, no DST) and says so in its stamps.
LEGACY_TZ = timezone(timedelta(hours=8))
DEFAULT_PATH = "/docexchange"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


class SoapFault(Exception):
    """A SOAP 1.1 fault to answer; ``code`` is the local part, e.g. ``Client.InvalidValue``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StoredDocument:
    """One document (公文) as the legacy system holds it: one effect per ``doc_id``."""

    doc_id: str
    title: str
    issuer: str
    doc_number: str
    doc_type: str
    classification: str
    urgency: str
    recipient_unit: str
    body_name: str
    body: bytes
    receipt_id: str
    status: str = "RECEIVED"
    received: datetime | None = None


@dataclass(frozen=True)
class StoredReceipt:
    """A receipt (回执) as ``FetchReceipts`` reports it."""

    seq: int
    doc_id: str
    unit: str
    action: str  # SIGNED or RETURNED
    signer: str
    time: str
    receipt_no: str | None = None
    reason: str | None = None


class DocExchangeState:
    """The service's memory, behind one lock; outlives restarts of the HTTP server.

    Contract operations (``send_document`` ...) are called by :class:`DocExchangeApp`; the clerk
    API (``sign``, ``return_document``) and the inspection counters are for tests and the demo.
    ``auto_sign=True`` starts a thread that signs every new document ``auto_sign_delay``
    seconds after it arrives; :meth:`close` stops it.

    Bounded: it runs inside ``gateway serve`` (embedded default) for as long as the node
    does, and each document holds its body, so only the newest documents are kept, at most
    ``max_docs`` of them and ``max_body_bytes`` of bodies (the newest always); an older one
    is as unknown as one never sent. ``arrivals`` keeps the newest ``max_docs`` times.
    """

    def __init__(
        self,
        *,
        auto_sign: bool = False,
        auto_sign_delay: float = 2.0,
        auto_signer: str = "值班员",
        response_delay: float = 0.0,
        max_docs: int = 20_000,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.max_docs = max_docs
        self.max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._docs: dict[str, StoredDocument] = {}
        #: doc_id -> first arrival on CLOCK_MONOTONIC (benchmarks time deliveries by it)
        self.arrivals: dict[str, float] = {}
        self._receipts: list[StoredReceipt] = []
        self._receipt_ids = itertools.count(1)
        self._calls: collections.Counter[str] = collections.Counter()
        self._failures: collections.deque[tuple[str, str | None]] = collections.deque()
        #: Seconds every SOAP answer waits (a benchmark wants a peer that answers in 20 ms).
        self.response_delay = response_delay
        self.auto_sign_delay = auto_sign_delay
        self.auto_signer = auto_signer
        self._closed = False
        self._sign_queue: collections.deque[tuple[float, str]] = collections.deque()
        self._auto_thread: threading.Thread | None = None
        if auto_sign:
            self._auto_thread = threading.Thread(
                target=self._auto_sign_loop, name="docexchange-auto-sign", daemon=True
            )
            self._auto_thread.start()

    # -- inspection ----------------------------------------------------------------------
    @property
    def send_calls(self) -> int:
        """Every ``SendDocument`` request received, including rejected and failed ones."""
        with self._lock:
            return self._calls["SendDocument"]

    @property
    def documents(self) -> int:
        """Distinct documents accepted: the number of effects."""
        with self._lock:
            return len(self._docs)

    def calls(self, operation: str) -> int:
        with self._lock:
            return self._calls[operation]

    def document(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            return self._docs.get(doc_id)

    def all_documents(self) -> list[StoredDocument]:
        with self._lock:
            return list(self._docs.values())

    def receipts(self) -> list[StoredReceipt]:
        with self._lock:
            return list(self._receipts)

    # -- fault injection -----------------------------------------------------------------
    def fail_next(self, n: int, kind: str, operation: str | None = None) -> None:
        """Make the next ``n`` SOAP calls (of ``operation``, or any) fail with ``kind``:
        ``http503`` (overloaded), ``server-fault`` (``Server.Busy``) or ``client-fault``
        (``Client.Rejected``)."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAILURE_KINDS)}, not {kind!r}")
        with self._lock:
            self._failures.extend([(kind, operation)] * n)

    def take_failure(self, operation: str) -> str | None:
        """The failure to inject for this call, if any (consumed)."""
        with self._lock:
            for i, (kind, op) in enumerate(self._failures):
                if op is None or op == operation:
                    del self._failures[i]
                    return kind
        return None

    def record_call(self, operation: str) -> None:
        with self._lock:
            self._calls[operation] += 1

    # -- contract operations -------------------------------------------------------------
    def send_document(self, fields: Mapping[str, Any]) -> str:
        """Accept a document, or answer the receipt id it already has (deduplication)."""
        _check_value(fields, "classification", CLASSIFICATIONS, "密级")
        _check_value(fields, "urgency", URGENCIES, "紧急程度")
        _check_value(fields, "doc_type", DOC_TYPES, "文种")
        doc_id = str(fields["doc_id"])
        with self._lock:
            existing = self._docs.get(doc_id)
            if existing is not None:
                return existing.receipt_id
            doc = StoredDocument(
                **{k: fields[k] for k in SEND_FIELDS},
                receipt_id=f"DX{next(self._receipt_ids):010d}",
                received=_now(),
            )
            self._docs[doc_id] = doc
            self.arrivals[doc_id] = time.monotonic()
            self._body_bytes += len(doc.body)
            # the oldest first (dicts keep insertion order; a new status keeps the place)
            while len(self._docs) > 1 and (len(self._docs) > self.max_docs or self._body_bytes > self.max_body_bytes):
                self._body_bytes -= len(self._docs.pop(next(iter(self._docs))).body)
            while len(self.arrivals) > self.max_docs:
                del self.arrivals[next(iter(self.arrivals))]
            if self._auto_thread is not None:
                self._sign_queue.append((time.monotonic() + self.auto_sign_delay, doc_id))
                self._cond.notify_all()
            return doc.receipt_id

    def query_status(self, doc_id: str) -> str:
        with self._lock:
            doc = self._docs.get(doc_id)
            return doc.status if doc else "UNKNOWN"

    def fetch_receipts(self, since_seq: int) -> list[StoredReceipt]:
        """Receipts with seq > ``since_seq``, oldest first, at most 500."""
        with self._lock:
            # seq is 1-based and dense, so the list index is seq - 1.
            start = max(0, since_seq)
            return self._receipts[start:start + MAX_RECEIPTS_PER_PAGE]

    def recall_document(self, doc_id: str) -> str:
        """Withdraw (撤回) a document: ``RECALLED``, or ``TOO_LATE`` once signed for."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is None:
                raise SoapFault("Client.UnknownDocument", f"no document with doc_id {doc_id}")
            if doc.status == "SIGNED":
                return "TOO_LATE"
            if doc.status == "RECEIVED":
                self._docs[doc_id] = replace(doc, status="RECALLED")
            return "RECALLED"

    # -- clerk API (the legacy system's own UI) ------------------------------------------
    def sign(self, doc_id: str, signer: str, receipt_no: str | None = None, stamp: str | None = None) -> StoredReceipt:
        """A clerk signs for (签收) a document; a ``SIGNED`` receipt appears. ``stamp``: the
        receipt's ``time`` as the system writes it (a string, per the WSDL); default now, UTC+8."""
        with self._lock:
            doc = self._open_doc(doc_id)
            self._docs[doc_id] = replace(doc, status="SIGNED")
            seq = len(self._receipts) + 1
            return self._add_receipt(
                doc, "SIGNED", signer, receipt_no=receipt_no or f"QS{seq:08d}", stamp=stamp
            )

    def return_document(self, doc_id: str, reason: str, signer: str, receipt_no: str | None = None) -> StoredReceipt:
        """A clerk returns (退回) a document with a reason; a ``RETURNED`` receipt appears,
        numbered like a ``SIGNED`` one (the contract's receipts all carry receipt_no)."""
        with self._lock:
            doc = self._open_doc(doc_id)
            self._docs[doc_id] = replace(doc, status="RETURNED")
            seq = len(self._receipts) + 1
            return self._add_receipt(doc, "RETURNED", signer, receipt_no=receipt_no or f"QS{seq:08d}",
                                     reason=reason)

    def _open_doc(self, doc_id: str) -> StoredDocument:
        doc = self._docs.get(doc_id)
        if doc is None:
            raise KeyError(f"no document with doc_id {doc_id}")
        if doc.status != "RECEIVED":
            raise ValueError(f"document {doc_id} is {doc.status}; only RECEIVED can be acted on")
        return doc

    def _add_receipt(self, doc: StoredDocument, action: str, signer: str, *,
                     receipt_no: str | None = None, reason: str | None = None,
                     stamp: str | None = None) -> StoredReceipt:
        r = StoredReceipt(
            seq=len(self._receipts) + 1, doc_id=doc.doc_id, unit=doc.recipient_unit,
            action=action, signer=signer, time=_now().isoformat(timespec="seconds") if stamp is None else stamp,
            receipt_no=receipt_no, reason=reason,
        )
        self._receipts.append(r)
        return r

    # -- auto sign (demo) ----------------------------------------------------------------
    def _auto_sign_loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._sign_queue and self._sign_queue[0][0] <= now:
                    _, doc_id = self._sign_queue.popleft()
                    doc = self._docs.get(doc_id)
                    if doc is not None and doc.status == "RECEIVED":  # recalled meanwhile: skip
                        self.sign(doc_id, self.auto_signer)
                timeout = self._sign_queue[0][0] - now if self._sign_queue else None
                self._cond.wait(timeout)

    def arrived(self, doc_ids: list[str]) -> dict[str, float]:
        """First arrival time (CLOCK_MONOTONIC) of each of ``doc_ids`` that has arrived."""
        with self._lock:
            return {d: self.arrivals[d] for d in doc_ids if d in self.arrivals}

    def close(self) -> None:
        """Stop the auto-sign thread (if any). The data stays readable."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._auto_thread is not None:
            self._auto_thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now() -> datetime:
    return datetime.now(LEGACY_TZ).replace(microsecond=0)


def _check_value(fields: Mapping[str, Any], name: str, allowed: Iterable[str], term: str) -> None:
    if fields[name] not in allowed:
        raise SoapFault(
            "Client.InvalidValue",
            f"{name} ({term}) {fields[name]!r} is not one of {'、'.join(allowed)}",
        )


# -- the WSDL and its schema ---------------------------------------------------------------
@lru_cache(maxsize=1)
def _wsdl_root_bytes() -> bytes:
    return WSDL_PATH.read_bytes()


@lru_cache(maxsize=1)
def _message_schema() -> etree.XMLSchema:
    """The WSDL's embedded xs:schema, to validate request payloads exactly as declared."""
    root = xmlsafe.parse(_wsdl_root_bytes())
    schema_el = root.find(f"{{{WSDL_NS}}}types/{{{XSD_NS}}}schema")
    assert schema_el is not None, "the contract WSDL has no xs:schema"
    # A standalone copy that keeps the WSDL root's namespace declarations (the schema refers
    # to types as tns:...; QName values are not reconciled by a plain copy).
    doc = etree.Element(f"{{{XSD_NS}}}schema", nsmap=root.nsmap)
    for k, v in schema_el.attrib.items():
        doc.set(k, v)
    for child in schema_el:
        doc.append(etree.fromstring(etree.tostring(child)))
    return etree.XMLSchema(doc)


def wsdl_for(address: str) -> bytes:
    """The contract WSDL with its ``soap:address`` rewritten to ``address``."""
    root = xmlsafe.parse(_wsdl_root_bytes())
    for addr in root.iter(f"{{{WSDL_SOAP11_NS}}}address"):
        addr.set("location", address)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


# -- the WSGI app --------------------------------------------------------------------------
def _soap_envelope(body_child: etree._Element) -> bytes:
    env = etree.Element(f"{{{SOAP11_NS}}}Envelope", nsmap={"soap": SOAP11_NS})
    body = etree.SubElement(env, f"{{{SOAP11_NS}}}Body")
    body.append(body_child)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def _fault_body(code: str, message: str) -> bytes:
    fault = etree.Element(f"{{{SOAP11_NS}}}Fault", nsmap={"soap": SOAP11_NS})
    # faultcode is a QName in SOAP 1.1; the dotted suffix refines Client/Server.
    etree.SubElement(fault, "faultcode").text = f"soap:{code}"
    etree.SubElement(fault, "faultstring").text = message
    return _soap_envelope(fault)


def _t(tag: str) -> str:
    return f"{{{DOCEX_NS}}}{tag}"


class DocExchangeApp:
    """The WSGI application. ``username``/``password`` turn on a WS-Security UsernameToken
    check (PasswordText or PasswordDigest); a missing or wrong token answers
    ``Client.Authentication``."""

    def __init__(
        self,
        state: DocExchangeState,
        *,
        path: str = DEFAULT_PATH,
        username: str | None = None,
        password: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.state = state
        self.path = path
        self.username = username
        self.password = password
        self.max_request_bytes = max_request_bytes
        self._handlers: dict[str, Callable[[etree._Element], etree._Element]] = {
            "SendDocument": self._send_document,
            "QueryStatus": self._query_status,
            "FetchReceipts": self._fetch_receipts,
            "RecallDocument": self._recall_document,
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        response = self._dispatch(request)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        if request.path != self.path:
            return Response("not found\n", 404, mimetype="text/plain")
        if request.method == "GET" and any(k.lower() == "wsdl" for k in request.args):
            address = request.host_url.rstrip("/") + request.script_root + self.path
            return Response(wsdl_for(address), 200, content_type="text/xml; charset=utf-8")
        if request.method != "POST":
            return Response("use POST for SOAP or GET ?wsdl\n", 405, mimetype="text/plain",
                            headers={"Allow": "GET, POST"})
        if (request.content_length or 0) > self.max_request_bytes:
            return Response("request too large\n", 413, mimetype="text/plain")
        data = request.stream.read(self.max_request_bytes + 1)
        try:
            return self._soap(data)
        except SoapFault as fault:
            return self._fault(fault.code, fault.message)
        except Exception:  # the real service answers Server.* for internal trouble
            log.exception("docexchange simulator: internal error")
            return self._fault("Server.Internal", "internal error")

    def _fault(self, code: str, message: str) -> Response:
        return Response(_fault_body(code, message), 500, content_type="text/xml; charset=utf-8")

    def _soap(self, data: bytes) -> Response:
        try:
            root = xmlsafe.parse(data, xmlsafe.XMLLimits(max_bytes=self.max_request_bytes))
        except xmlsafe.UnsafeXMLError as exc:
            raise SoapFault("Client.InvalidXML", exc.reason) from None
        if root.tag == f"{{{SOAP12_NS}}}Envelope":
            raise SoapFault("VersionMismatch", "this service speaks SOAP 1.1 only")
        if root.tag != f"{{{SOAP11_NS}}}Envelope":
            raise SoapFault("Client.InvalidMessage", "the root element is not a SOAP 1.1 Envelope")
        body = root.find(f"{{{SOAP11_NS}}}Body")
        payload = next((el for el in body if isinstance(el.tag, str)), None) if body is not None else None
        if payload is None:
            raise SoapFault("Client.InvalidMessage", "the SOAP Body is empty")
        qname = etree.QName(payload)
        handler = self._handlers.get(qname.localname) if qname.namespace == DOCEX_NS else None
        if handler is None:
            raise SoapFault("Client.UnknownOperation", f"no operation {qname.text}")
        operation = qname.localname
        self.state.record_call(operation)

        if self.state.response_delay > 0:
            time.sleep(self.state.response_delay)
        failure = self.state.take_failure(operation)
        if failure == "http503":
            return Response("Service Unavailable\n", 503, mimetype="text/plain",
                            headers={"Retry-After": "1"})
        if failure == "server-fault":
            raise SoapFault("Server.Busy", "the service is overloaded, try again later")
        if failure == "client-fault":
            raise SoapFault("Client.Rejected", "the request was rejected")

        if self.username is not None:
            self._authenticate(root)
        schema = _message_schema()
        if not schema.validate(payload):
            err = schema.error_log.last_error
            raise SoapFault("Client.InvalidMessage", f"{operation}: {err.message if err else 'invalid'}")
        return Response(_soap_envelope(handler(payload)), 200,
                        content_type="text/xml; charset=utf-8")

    def _authenticate(self, envelope: etree._Element) -> None:
        token = envelope.find(
            f"{{{SOAP11_NS}}}Header/{{{WSSE_NS}}}Security/{{{WSSE_NS}}}UsernameToken"
        )
        if token is None:
            raise SoapFault("Client.Authentication", "a WS-Security UsernameToken is required")
        username = token.findtext(f"{{{WSSE_NS}}}Username") or ""
        pw_el = token.find(f"{{{WSSE_NS}}}Password")
        given = (pw_el.text or "") if pw_el is not None else ""
        assert self.password is not None
        if pw_el is not None and pw_el.get("Type", "").endswith("#PasswordDigest"):
            # digest = Base64(SHA-1(nonce + created + password)), WSS UsernameToken Profile 1.0
            try:
                nonce = base64.b64decode(token.findtext(f"{{{WSSE_NS}}}Nonce") or "")
            except ValueError:
                nonce = b""
            created = (token.findtext(f"{{{WSU_NS}}}Created") or "").encode()
            expected = base64.b64encode(
                hashlib.sha1(nonce + created + self.password.encode()).digest()
            ).decode()
        else:
            expected = self.password
        user_ok = hmac.compare_digest(username.encode(), (self.username or "").encode())
        pw_ok = hmac.compare_digest(given.encode(), expected.encode())
        if not (user_ok and pw_ok):
            # Never say which part was wrong, never echo what was given.
            raise SoapFault("Client.Authentication", "the user name or password is wrong")

    # -- operations (payload already schema-valid) --------------------------------------
    def _send_document(self, payload: etree._Element) -> etree._Element:
        fields: dict[str, Any] = {name: payload.findtext(_t(name)) or "" for name in SEND_FIELDS}
        try:
            fields["body"] = base64.b64decode("".join(fields["body"].split()), validate=True)
        except ValueError:
            raise SoapFault("Client.InvalidValue", "body is not valid base64") from None
        receipt_id = self.state.send_document(fields)
        resp = etree.Element(_t("SendDocumentResponse"), nsmap={"tns": DOCEX_NS})
        etree.SubElement(resp, _t("SendDocumentResult")).text = receipt_id
        return resp

    def _query_status(self, payload: etree._Element) -> etree._Element:
        status = self.state.query_status(payload.findtext(_t("doc_id")) or "")
        resp = etree.Element(_t("QueryStatusResponse"), nsmap={"tns": DOCEX_NS})
        etree.SubElement(resp, _t("QueryStatusResult")).text = status
        return resp

    def _fetch_receipts(self, payload: etree._Element) -> etree._Element:
        since = int((payload.findtext(_t("since_seq")) or "0").strip())
        resp = etree.Element(_t("FetchReceiptsResponse"), nsmap={"tns": DOCEX_NS})
        arr = etree.SubElement(resp, _t("FetchReceiptsResult"))
        for r in self.state.fetch_receipts(since):
            el = etree.SubElement(arr, _t("Receipt"))
            for name in ("seq", "doc_id", "unit", "action", "signer", "time", "receipt_no", "reason"):
                val = getattr(r, name)
                if val is not None:  # minOccurs=0: absent rather than empty
                    etree.SubElement(el, _t(name)).text = str(val)
        return resp

    def _recall_document(self, payload: etree._Element) -> etree._Element:
        result = self.state.recall_document(payload.findtext(_t("doc_id")) or "")
        resp = etree.Element(_t("RecallDocumentResponse"), nsmap={"tns": DOCEX_NS})
        etree.SubElement(resp, _t("RecallDocumentResult")).text = result
        return resp


# -- a real threaded HTTP server -----------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    """Logs to ``logging`` at debug level instead of stderr, and tracks its connection so
    :meth:`SoapServiceServer.stop` can cut calls in flight (werkzeug closes idle ones)."""

    def setup(self) -> None:
        super().setup()
        tracked = getattr(self.server, "gw_connections", None)
        if tracked is not None:
            with self.server.gw_lock:  # type: ignore[attr-defined]
                tracked.add(self.connection)

    def finish(self) -> None:
        tracked = getattr(self.server, "gw_connections", None)
        if tracked is not None:
            with self.server.gw_lock:  # type: ignore[attr-defined]
                tracked.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the connection was cut by stop()
            pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("docexchange %s %s", self.requestline, code)

    def log(self, type: str, message: str, *args: Any) -> None:
        log.debug("docexchange %s: " + message, type, *args)


class SoapServiceServer:
    """The simulator under a real threaded WSGI server on ``host`` (``port`` 0 = a free one).

    ``start()`` / ``stop()`` may be repeated; a restart binds the same port and keeps the
    state. ``stop()`` closes the listening socket, so new calls get "connection refused", and
    cuts the connections of calls in flight (their clients see the connection drop, while
    the call itself may still take effect here: an answer lost on the way back).
    """

    def __init__(
        self,
        state: DocExchangeState | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = DEFAULT_PATH,
        username: str | None = None,
        password: str | None = None,
        ssl_context: Any = None,
    ) -> None:
        self.state = state if state is not None else DocExchangeState()
        #: an ``ssl.SSLContext`` with the server certificate: the service speaks HTTPS
        self.ssl_context = ssl_context
        self.app = DocExchangeApp(self.state, path=path, username=username, password=password)
        self.host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The service address, e.g. ``http://127.0.0.1:PORT/docexchange``."""
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self._port}{self.app.path}"

    @property
    def wsdl_url(self) -> str:
        return self.url + "?wsdl"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        if self._server is not None:
            return self
        srv = make_server(self.host, self._port, self.app, threaded=True,
                          request_handler=_QuietHandler, ssl_context=self.ssl_context)
        srv.gw_connections = set()  # type: ignore[attr-defined]
        srv.gw_lock = threading.Lock()  # type: ignore[attr-defined]
        # Cut connections make handler threads fail mid-write; that is expected here.
        srv.handle_error = lambda request, client_address: log.debug(  # type: ignore[method-assign]
            "docexchange: connection from %s ended abruptly", client_address
        )
        self._port = srv.server_port
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"docexchange-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        with srv.gw_lock:  # type: ignore[attr-defined]
            conns = list(srv.gw_connections)  # type: ignore[attr-defined]
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop the server and the state's auto-sign thread."""
        self.stop()
        self.state.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
