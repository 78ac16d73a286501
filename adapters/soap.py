"""SOAP adapter (SOAP 适配器): the gateway's side of a SOAP 1.1 legacy service, via zeep.

Built for the document exchange service (公文交换服务, ``shared/legacy/README.md`` section 1)
but declarative, so a kindred service needs configuration, not code::

    [adapters.docexchange]
    type = "soap"
    wsdl = "schemas/legacy/docexchange.wsdl"     # relative to the repo root, absolute, or a URL
    address = "http://docexchange.intranet/docexchange"   # overrides the WSDL's location
    timeout = 10                 # seconds, connect and each call
    verify_tls = true            # or false; ca_file = "certs/intranet-ca.pem" (relative to base_dir)
    username = "gateway"         # optional WS-Security UsernameToken
    password_env = "DOCEX_PASSWORD"   # or password_file; password_digest = false
    max_per_poll = 1000
    pool_size = 10               # pooled HTTP connections

    [adapters.docexchange.send]
    operation = "SendDocument"
    [adapters.docexchange.send.arguments]     # all or nothing: replaces DEFAULT_SEND_ARGUMENTS
    doc_id = "xpath:$remote_ref"
    body = "blob:body"
    urgency = "const:平件"

    [adapters.docexchange.receipts]
    operation = "FetchReceipts"
    cursor_argument = "since_seq"

Argument expressions: ``xpath:EXPR`` over the canonical envelope element (prefixes ``e`` =
envelope, ``d`` = documents payload; variables ``$recipient``, ``$remote_ref``,
``$message_id``, ``$copy_type``, ``$copy_no``), ``blob:body`` (the body attachment's bytes) or
``const:TEXT``. Every expression is compiled and trial-evaluated when the adapter is built,
so a bad one is a :class:`ConfigError` at start-up, not a failed delivery.

Idempotency: the legacy ``doc_id`` is :attr:`Delivery.remote_ref` (deterministic per message
and recipient), and the service deduplicates by it, so a redelivery has no second effect.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import requests
import zeep
import zeep.exceptions
from lxml import etree
from requests.adapters import HTTPAdapter
from zeep.wsse.username import UsernameToken

from adapters.base import (
    Adapter,
    AdapterContext,
    ConfigError,
    ca_problem,
    Delivery,
    DeliveryError,
    DeliveryResult,
    Health,
    PermanentError,
    PolledItem,
    RetryableError,
    delivery_ref,
    legacy_time,
    register,
)
from gateway import ROOT, xmlsafe
from gateway.envelope import NS as ENVELOPE_NS
from gateway.envelope import Receipt

log = logging.getLogger(__name__)


class _NoEnvelopes(logging.Filter):
    """zeep's transport logs each request and answer whole at DEBUG: the WS-Security password
    (in clear unless password_digest), the document's title and its body, classified or not.
    Whoever turns DEBUG on to look into a link gets the address, the status and the size;
    never the envelope."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._hidden(a) for a in record.args)
        return True

    @staticmethod
    def _hidden(arg: object) -> object:
        if isinstance(arg, bytes) and b"Envelope" in arg or isinstance(arg, str) and "Envelope" in arg:
            return (f"<{len(arg)} {'bytes' if isinstance(arg, bytes) else 'characters'} of SOAP not logged: "  # type: ignore[arg-type]
                    f"they may carry the WS-Security password and the document>")
        return arg


logging.getLogger("zeep.transports").addFilter(_NoEnvelopes())

DOCUMENTS_NS = "urn:egov:gateway:documents:v1"
XPATH_NAMESPACES = {"e": ENVELOPE_NS, "d": DOCUMENTS_NS}
XPATH_VARIABLES = ("recipient", "remote_ref", "message_id", "copy_type", "copy_no")

_DOC = "e:payload/d:document"
#: SendDocument of the docexchange contract, all ten arguments.
DEFAULT_SEND_ARGUMENTS: Mapping[str, str] = MappingProxyType({
    "doc_id": "xpath:$remote_ref",
    "title": f"xpath:string({_DOC}/d:title)",
    "issuer": f"xpath:string({_DOC}/d:issuer)",
    "doc_number": f"xpath:string({_DOC}/d:doc-number)",
    "doc_type": f"xpath:string({_DOC}/d:doc-type)",
    "classification": "xpath:string(e:header/e:classification)",
    "urgency": "xpath:string(e:header/e:urgency)",
    "recipient_unit": "xpath:$recipient",
    "body_name": "xpath:string(e:attachments/e:attachment[@role='body']/@name)",
    "body": "blob:body",
})
DEFAULT_SEND_OPERATION = "SendDocument"
DEFAULT_RECEIPTS_OPERATION = "FetchReceipts"
DEFAULT_CURSOR_ARGUMENT = "since_seq"
CHECK_OPERATION = "QueryStatus"
RECALL_OPERATION = "RecallDocument"
HEALTHCHECK_DOC_ID = "healthcheck"
KNOWN_STATUSES = ("RECEIVED", "SIGNED", "RETURNED", "RECALLED", "UNKNOWN")

CURSOR_KEY = "receipts.cursor"
#: FetchReceipts answers at most this many; a full page means there may be more.
RECEIPTS_PAGE_SIZE = 500
DEFAULT_MAX_PER_POLL = 1000
DEFAULT_TIMEOUT = 10.0
DEFAULT_POOL_SIZE = 10
RECEIPT_ACTIONS = ("SIGNED", "RETURNED")

#: HTTP answers (without a SOAP fault) that say this node's settings are wrong, not the request
_HTTP_CONFIGURATION = frozenset({401, 403, 404, 405, 407, 421})

_KNOWN_KEYS = {
    "type", "wsdl", "address", "timeout", "verify_tls", "ca_file", "username", "password_env",
    "password_file", "password_digest", "max_per_poll", "pool_size", "send", "receipts",
}


class _Expr:
    """One compiled argument expression (``xpath:`` / ``blob:body`` / ``const:``)."""

    __slots__ = ("const", "kind", "source", "xpath", "_per_thread")

    def __init__(self, kind: str, source: str, xpath: etree.XPath | None = None,
                 const: str | None = None) -> None:
        self.kind = kind
        self.source = source
        self.xpath = xpath
        self.const = const
        self._per_thread = threading.local()

    def evaluate(self, root: etree._Element, variables: Mapping[str, str]) -> Any:
        """Evaluate with this thread's own copy of the compiled expression: an lxml XPath
        object lets one thread at a time evaluate it, so delivery threads sharing one queued
        on its lock for every argument of every document."""
        xp = getattr(self._per_thread, "xpath", None)
        if xp is None:
            assert self.xpath is not None
            xp = self._per_thread.xpath = etree.XPath(self.xpath.path, namespaces=XPATH_NAMESPACES)
        return xp(root, **variables)


def _xpath_string(result: Any) -> str:
    """XPath result → text, with XPath ``string()`` semantics for node-sets (first node)."""
    if isinstance(result, bool):
        return "true" if result else "false"
    if isinstance(result, float):
        return str(int(result)) if result.is_integer() else repr(result)
    if isinstance(result, list):
        if not result:
            return ""
        first = result[0]
        if isinstance(first, etree._Element):
            return "".join(first.itertext())
        return str(first)
    return str(result)


def _fault_class(code: str | None) -> str:
    """``soap:Client.Authentication`` / ``{ns}Client`` / ``SOAP-ENV:Server`` → the local part."""
    if not code:
        return ""
    code = code.strip().rsplit("}", 1)[-1]
    return code.split(":", 1)[1] if ":" in code else code


def _parse_time(text: str | None, tz: tzinfo) -> tuple[datetime | None, str | None]:
    """The receipt's time (aware; without an offset it is the legacy system's local time,
    ``tz``), or None if it gives none; or None and why its text is no time (the receipt is
    then refused, not dated by this node's clock)."""
    if text is None or not text.strip():
        return None, None
    try:
        return legacy_time(text, tz), None
    except ValueError as exc:
        return None, f"the receipt's time: {exc}"


class _Transport(zeep.Transport):
    """zeep's transport, but an HTTP 4xx/5xx that carries no SOAP Fault becomes a
    TransportError with its status, so it is classified by status (zeep would otherwise turn
    an XML error page into a code-less Fault, and the status would be lost)."""

    def post(self, address: str, message: Any, headers: Any) -> requests.Response:
        response = super().post(address, message, headers)
        # zeep hands the answer to libxml2, which takes encoding="GBK" at its word and refuses
        # a 4-byte GB18030 name in it: a GB-family answer is decoded as our own parser does
        try:
            response._content = xmlsafe.normalise_gb(response.content, _charset(response))
        except xmlsafe.UnsafeXMLError:
            pass  # not GB18030 at all: zeep says what is wrong with it
        if response.status_code >= 400 and not _has_soap_fault(response.content):
            raise zeep.exceptions.TransportError(
                f"HTTP {response.status_code}", status_code=response.status_code
            )
        return response


def _charset(response: requests.Response) -> str | None:
    """The charset the answer's Content-Type names, if any (lower case)."""
    ctype = response.headers.get("Content-Type", "")
    for part in ctype.split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() or None
    return None


def _has_soap_fault(content: bytes) -> bool:
    if not content or b"Fault" not in content:
        return False
    try:
        root = xmlsafe.parse(content)
    except xmlsafe.UnsafeXMLError:
        return False
    return any(etree.QName(el).localname == "Fault" for el in root.iter() if isinstance(el.tag, str))


@register("soap")
class SoapAdapter(Adapter):
    """A SOAP 1.1 legacy service. See the module docstring for configuration.

    One zeep client per adapter over a pooled ``requests.Session``; safe to call from
    several worker threads. Errors are classified per :mod:`adapters.base`: SOAP ``Client.*``
    and HTTP 4xx (except 408/429) are permanent; ``Server.*``, HTTP 5xx, timeouts and
    connection failures are retryable. Error messages never carry the password.
    """

    subsystems = frozenset({"documents"})  # the legacy contract carries official documents only
    takes_attachments = False  # SendDocument has a body and nothing else (legacy README §1)

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        super().__init__(name, config, context)
        unknown = sorted(set(self.config) - _KNOWN_KEYS)
        if unknown:  # a misspelt key must not silently become its default
            raise ConfigError(f"{self._key(unknown[0])}: unknown setting; expected one of "
                              f"{', '.join(sorted(_KNOWN_KEYS))}")
        self._wsdl = self._wsdl_location()
        self._address = self._opt_str("address")
        if self._address is not None and urlsplit(self._address).scheme not in ("http", "https"):
            raise ConfigError(f"{self._key('address')}: expected an http:// or https:// URL")
        self._timeout = self._number("timeout", DEFAULT_TIMEOUT)
        self._max_per_poll = self._positive_int("max_per_poll", DEFAULT_MAX_PER_POLL)
        pool_size = self._positive_int("pool_size", DEFAULT_POOL_SIZE)
        verify = self._verify()
        self._username = self._opt_str("username")
        self._password: str | None = None
        try:
            self._password = context.secret(self.config, "password")
        except ConfigError as exc:
            raise ConfigError(f"adapters.{name}.{exc}") from None
        if self._username is not None and self._password is None:
            raise ConfigError(
                f"{self._key('password_env')}: username is set; expected password_env or "
                "password_file to give its password"
            )
        if self._password is not None and self._username is None:
            raise ConfigError(f"{self._key('username')}: a password is given; expected a username")
        use_digest = self._bool("password_digest", False)

        send = self._table("send")
        self._send_op = self._opt_str("operation", send, "send") or DEFAULT_SEND_OPERATION
        self._send_args = self._compile_arguments(send)
        receipts = self._table("receipts")
        self._receipts_op = (
            self._opt_str("operation", receipts, "receipts") or DEFAULT_RECEIPTS_OPERATION
        )
        self._cursor_arg = (
            self._opt_str("cursor_argument", receipts, "receipts") or DEFAULT_CURSOR_ARGUMENT
        )
        for table, allowed, prefix in ((send, {"operation", "arguments"}, "send"),
                                       (receipts, {"operation", "cursor_argument"}, "receipts")):
            extra = sorted(set(table) - allowed)
            if extra:
                raise ConfigError(
                    f"{self._key(prefix + '.' + extra[0])}: unknown key; expected one of "
                    f"{', '.join(sorted(allowed))}"
                )

        self._session = requests.Session()
        # One pool per scheme; no urllib3-level retries: retrying is the worker's decision.
        http = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", http)
        self._session.mount("https://", http)
        self._session.verify = verify
        # Trust comes from this configuration only: with trust_env, requests lets
        # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the process environment replace ca_file
        # (the TLS test caught exactly that), and proxies from the environment apply too.
        self._session.trust_env = False
        self._transport = _Transport(
            session=self._session, timeout=self._timeout, operation_timeout=self._timeout
        )
        self._settings = zeep.Settings(
            strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True,
            xml_huge_tree=False,
        )
        self._wsse = (
            UsernameToken(self._username, self._password, use_digest=use_digest)
            if self._username is not None else None
        )
        self._lock = threading.Lock()
        self._client: zeep.Client | None = None
        self._proxy: Any = None
        # A local WSDL is read now, so a wrong operation or argument name stops start-up; a
        # URL is fetched on first use, so a service that is down does not stop the gateway.
        if not _is_url(self._wsdl):
            self._service()

    # -- configuration helpers ---------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"adapters.{self.name}.{key}"

    def _opt_str(self, key: str, table: Mapping[str, Any] | None = None,
                 prefix: str | None = None) -> str | None:
        src = self.config if table is None else table
        if key not in src:
            return None
        val = src[key]
        full = f"{prefix}.{key}" if prefix else key
        if not isinstance(val, str) or not val.strip():
            raise ConfigError(f"{self._key(full)}: expected a non-empty string, got {val!r}")
        return val.strip()

    def _number(self, key: str, default: float) -> float:
        val = self.config.get(key, default)
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0:
            raise ConfigError(f"{self._key(key)}: expected a positive number of seconds, got {val!r}")
        return float(val)

    def _positive_int(self, key: str, default: int) -> int:
        val = self.config.get(key, default)
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ConfigError(f"{self._key(key)}: expected a positive integer, got {val!r}")
        return val

    def _bool(self, key: str, default: bool) -> bool:
        val = self.config.get(key, default)
        if not isinstance(val, bool):
            raise ConfigError(f"{self._key(key)}: expected true or false, got {val!r}")
        return val

    def _table(self, key: str) -> Mapping[str, Any]:
        val = self.config.get(key, {})
        if not isinstance(val, Mapping):
            raise ConfigError(f"{self._key(key)}: expected a table, got {type(val).__name__}")
        return val

    def _wsdl_location(self) -> str:
        wsdl = self._opt_str("wsdl")
        if wsdl is None:
            raise ConfigError(f"{self._key('wsdl')}: missing; expected a WSDL file path or URL")
        if _is_url(wsdl):
            return wsdl
        path = Path(wsdl)
        path = path if path.is_absolute() else ROOT / path
        if not path.is_file():
            raise ConfigError(f"{self._key('wsdl')}: no such file {path}")
        return str(path)

    def _verify(self) -> bool | str:
        verify = self._bool("verify_tls", True)
        ca_file = self._opt_str("ca_file")
        if ca_file is None:
            return verify
        if not verify:
            raise ConfigError(f"{self._key('ca_file')}: given while verify_tls = false; "
                              "expected one or the other")
        path = Path(ca_file)
        path = path if path.is_absolute() else self.context.base_dir / path
        problem = ca_problem(path)
        if problem:
            raise ConfigError(f"{self._key('ca_file')}: {problem}")
        return str(path)

    def _compile_arguments(self, send: Mapping[str, Any]) -> dict[str, _Expr]:
        raw = send.get("arguments")
        if raw is None:
            raw = DEFAULT_SEND_ARGUMENTS
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(
                f"{self._key('send.arguments')}: expected a table of argument = expression"
            )
        # A dummy envelope: evaluating once now reports unknown prefixes, variables and
        # functions, which compiling alone does not.
        probe = etree.Element(f"{{{ENVELOPE_NS}}}envelope")
        out: dict[str, _Expr] = {}
        for arg, expr in raw.items():
            key = self._key(f"send.arguments.{arg}")
            if not isinstance(expr, str):
                raise ConfigError(f"{key}: expected a string expression, got {expr!r}")
            kind, sep, rest = expr.partition(":")
            if not sep or kind not in ("xpath", "blob", "const"):
                raise ConfigError(
                    f"{key}: {expr!r} is not an expression; expected xpath:EXPR, blob:body "
                    "or const:TEXT"
                )
            if kind == "const":
                out[arg] = _Expr("const", expr, const=rest)
            elif kind == "blob":
                if rest != "body":
                    raise ConfigError(f"{key}: {expr!r}: expected blob:body")
                out[arg] = _Expr("blob", expr)
            else:
                try:
                    xp = etree.XPath(rest, namespaces=XPATH_NAMESPACES)
                    xp(probe, **{v: "" for v in XPATH_VARIABLES})
                except etree.XPathError as exc:
                    raise ConfigError(
                        f"{key}: {rest!r} is not a usable XPath expression ({exc}); prefixes "
                        f"{', '.join(XPATH_NAMESPACES)} and variables "
                        f"{', '.join('$' + v for v in XPATH_VARIABLES)} are available"
                    ) from None
                out[arg] = _Expr("xpath", expr, xpath=xp)
        return out

    # -- the zeep client -----------------------------------------------------------------
    def _service(self) -> Any:
        """The service proxy, building the zeep client on first use (once)."""
        if self._proxy is not None:
            return self._proxy
        with self._lock:
            if self._proxy is not None:
                return self._proxy
            try:
                client = zeep.Client(self._wsdl, transport=self._transport,
                                     settings=self._settings, wsse=self._wsse)
            except (requests.RequestException, zeep.exceptions.TransportError) as exc:
                raise self._classify(exc, "loading the WSDL") from exc
            except (zeep.exceptions.Error, etree.LxmlError, OSError) as exc:
                raise ConfigError(
                    f"{self._key('wsdl')}: {self._redact(self._wsdl)} is not a usable WSDL: "
                    f"{self._redact(str(exc))}"
                ) from None
            binding = self._binding(client)
            self._check_operations(binding)
            self._proxy = (
                client.create_service(binding.name.text, self._address)
                if self._address is not None else client.service
            )
            self._client = client
            return self._proxy

    def _binding(self, client: zeep.Client) -> Any:
        """The binding of the WSDL's first service port (the contract has exactly one)."""
        for service in client.wsdl.services.values():
            for port in service.ports.values():
                return port.binding
        raise ConfigError(f"{self._key('wsdl')}: the WSDL declares no service port")

    def _check_operations(self, binding: Any) -> None:
        ops = binding.all()
        needed = [("send.operation", self._send_op), ("receipts.operation", self._receipts_op)]
        for key, op in needed:
            if op not in ops:
                raise ConfigError(
                    f"{self._key(key)}: the WSDL has no operation {op!r}; expected one of "
                    f"{', '.join(sorted(ops))}"
                )
        params = {n: el for n, el in ops[self._send_op].input.body.type.elements}
        for arg in self._send_args:
            if arg not in params:
                raise ConfigError(
                    f"{self._key('send.arguments.' + arg)}: {self._send_op} has no argument "
                    f"{arg!r}; expected one of {', '.join(params)}"
                )
        missing = [n for n, el in params.items() if not el.is_optional and n not in self._send_args]
        if missing:
            raise ConfigError(
                f"{self._key('send.arguments')}: no expression for required argument(s) "
                f"{', '.join(missing)} of {self._send_op} (a configured table replaces the "
                "defaults entirely)"
            )
        receipt_params = [n for n, _ in ops[self._receipts_op].input.body.type.elements]
        if self._cursor_arg not in receipt_params:
            raise ConfigError(
                f"{self._key('receipts.cursor_argument')}: {self._receipts_op} has no argument "
                f"{self._cursor_arg!r}; expected one of {', '.join(receipt_params)}"
            )

    def _call(self, operation: str, what: str, **kwargs: Any) -> Any:
        """Call ``operation``; every failure comes out as Retryable/PermanentError."""
        service = self._service()
        try:
            return service[operation](**kwargs)
        except Exception as exc:
            raise self._classify(exc, what) from exc

    # -- error classification ------------------------------------------------------------
    def _redact(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        # user:password@ in a URL
        return re.sub(r"(//[^/@\s:]+):[^/@\s]*@", r"\1:***@", text)

    def _where(self) -> str:
        return self._redact(self._address or self._wsdl)

    def _classify(self, exc: BaseException, what: str) -> DeliveryError:
        """Map a zeep/requests failure to the contract's two kinds, with a clear message."""
        if isinstance(exc, DeliveryError):
            return exc
        if isinstance(exc, zeep.exceptions.Fault):
            code = _fault_class(exc.code)
            msg = self._redact(
                f"{what}: {self.name} answered SOAP Fault {code or '(no faultcode)'}: "
                f"{exc.message or ''}".rstrip(": ")
            )
            head = code.split(".", 1)[0]
            # Client (SOAP 1.1) / Sender (1.2): our request is wrong, a retry sends it again.
            if head in ("Client", "Sender", "VersionMismatch", "MustUnderstand"):
                return PermanentError(msg, code=code)
            return RetryableError(msg, code=code or "fault")
        if isinstance(exc, zeep.exceptions.TransportError):
            status = exc.status_code or 0
            msg = f"{what}: {self._where()} answered HTTP {status}"
            # The contract makes only Client.* faults final. Without a fault, a 4xx is final
            # when it is about the request itself; one about where or as whom we call (a wrong
            # address or path, credentials, a proxy) is this node's configuration: the queued
            # messages go once an operator has fixed it.
            if status in _HTTP_CONFIGURATION:
                return RetryableError(f"{msg}: check adapters.{self.name}.address and its credentials",
                                      code=f"http-{status}")
            if 400 <= status < 500 and status not in (408, 429):
                return PermanentError(msg, code=f"http-{status}")
            return RetryableError(msg, code=f"http-{status}")
        if isinstance(exc, requests.Timeout):
            return RetryableError(
                f"{what}: no answer from {self._where()} within {self._timeout:g} s", code="timeout"
            )
        if isinstance(exc, requests.exceptions.SSLError):
            # Retryable: an operator fixes trust (ca_file) and the queued messages then go.
            return RetryableError(f"{what}: TLS with {self._where()} failed: {_reason(exc)}",
                                  code="tls")
        if isinstance(exc, requests.ConnectionError):
            return RetryableError(f"{what}: cannot connect to {self._where()}: {_reason(exc)}",
                                  code="connection")
        if isinstance(exc, requests.RequestException):
            return RetryableError(self._redact(f"{what}: HTTP trouble: {_reason(exc)}"),
                                  code="http")
        if isinstance(exc, zeep.exceptions.ValidationError):
            # Raised while serialising our arguments: the envelope lacks what the WSDL needs.
            return PermanentError(
                self._redact(f"{what}: the arguments do not fit the WSDL: {exc}"), code="validation"
            )
        if isinstance(exc, zeep.exceptions.Error):
            return RetryableError(
                self._redact(f"{what}: {self._where()} answered what is not the expected SOAP: "
                             f"{type(exc).__name__}: {str(exc)[:200]}"), code="bad-response"
            )
        return RetryableError(self._redact(f"{what}: {type(exc).__name__}: {exc}"))

    # -- deliver -------------------------------------------------------------------------
    def _arguments(self, delivery: Delivery) -> dict[str, Any]:
        env = delivery.envelope
        root = env.tree()  # read only: the XPath expressions below never change it
        rcpt = delivery.recipient
        variables = {
            "recipient": rcpt.unit,
            "remote_ref": delivery.remote_ref,
            "message_id": delivery.message_id,
            "copy_type": rcpt.copy_type or "",
            "copy_no": rcpt.copy_no or "",
        }
        args: dict[str, Any] = {}
        body: bytes | None = None
        for name, expr in self._send_args.items():
            if expr.kind == "const":
                args[name] = expr.const
            elif expr.kind == "blob":
                if body is None:
                    body = self._read_body(delivery)
                args[name] = body
            else:
                assert expr.xpath is not None
                try:
                    args[name] = _xpath_string(expr.evaluate(root, variables))
                except etree.XPathError as exc:
                    raise PermanentError(
                        f"{self._key('send.arguments.' + name)}: {expr.source!r} failed on "
                        f"message {delivery.message_id}: {exc}", code="mapping",
                    ) from None
        return args

    def _read_body(self, delivery: Delivery) -> bytes:
        att = delivery.envelope.body()
        if att is None:
            raise PermanentError(
                f"message {delivery.message_id} has no body attachment (正文), which "
                f"{self._send_op} needs (blob:body)", code="no-body",
            )
        try:
            with self.context.blobs.open(att.sha256) as f:
                data = f.read()
        except FileNotFoundError:
            # Retryable: a blob store that is not (yet) mounted must not fail messages for good.
            raise RetryableError(
                f"body {att.name} of message {delivery.message_id} ({att.sha256}) is not in "
                "the blob store", code="blob-missing",
            ) from None
        if hashlib.sha256(data).hexdigest() != att.sha256:
            raise PermanentError(
                f"body {att.name} of message {delivery.message_id} does not match its SHA-256 "
                "(the stored blob is corrupt)", code="blob-corrupt",
            )
        return data

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Send the document; returns the service's receipt id. Idempotent via ``doc_id``."""
        args = self._arguments(delivery)
        what = f"{self._send_op} of message {delivery.message_id} to {delivery.recipient.unit}"
        result = self._call(self._send_op, what, **args)
        remote_id = None if result is None else str(result)
        return DeliveryResult(
            remote_id=remote_id,
            detail=f"{self.name} accepted {delivery.remote_ref} as {remote_id}",
        )

    # -- poll ----------------------------------------------------------------------------
    def _cursor(self) -> int:
        raw = self.context.state.get(CURSOR_KEY, "0") or "0"
        try:
            return int(raw)
        except ValueError:
            raise RuntimeError(
                f"adapter {self.name}: state {CURSOR_KEY} holds {raw!r}, not a sequence number"
            ) from None

    def _advance_cursor(self, seq: int) -> None:
        # Items may be acked in any order, and by several instances: the cursor only ever
        # moves forward
        self.context.state.advance(CURSOR_KEY, seq)

    def poll(self) -> list[PolledItem]:
        """Receipts (回执) since the stored cursor, at most ``max_per_poll``. Nothing moves
        the cursor until the gateway acks (or rejects) an item."""
        since = self._cursor()
        items: list[PolledItem] = []
        while len(items) < self._max_per_poll:
            what = f"{self._receipts_op} since {since}"
            try:
                page = self._call(self._receipts_op, what, **{self._cursor_arg: since})
            except DeliveryError:
                if not items:
                    raise
                # What we already have is good; the rest comes next time.
                log.warning("adapter %s: %s failed; returning %d receipts", self.name, what,
                            len(items), exc_info=True)
                break
            receipts = _receipt_list(page)
            start = since
            for r in receipts:
                if len(items) >= self._max_per_poll:
                    break
                seq = int(_field(r, "seq") or 0)
                since = max(since, seq)
                item = self._item(r, seq)
                if item is not None:
                    items.append(item)
            if len(receipts) < RECEIPTS_PAGE_SIZE or since <= start:
                break  # last page (or a service that does not advance: do not spin)
        return items

    def _item(self, r: Any, seq: int) -> PolledItem | None:
        action = (_field(r, "action") or "").strip()
        if action not in RECEIPT_ACTIONS:
            log.warning("adapter %s: receipt seq %d has action %r; skipped", self.name, seq, action)
            return None
        at, problem = _parse_time(_field(r, "time"), self.legacy_tz)
        receipt = Receipt(
            unit=_field(r, "unit") or "",
            action=action,
            remote_ref=_field(r, "doc_id"),
            time=at,
            signer=_field(r, "signer") or None,
            receipt_no=_field(r, "receipt_no") or None,
            reason=_field(r, "reason") or None,
        )

        def reject(reason: str) -> None:
            # Skip it for good: a receipt the gateway cannot take must not block the rest.
            log.warning("adapter %s: receipt seq %d rejected: %s", self.name, seq, reason)
            self._advance_cursor(seq)

        return PolledItem(
            key=f"{self.name}:seq:{seq}", receipt=receipt, source=self.name,
            _ack=lambda: self._advance_cursor(seq), _reject=reject, problem=problem,
        )

    # -- check, recall, close ------------------------------------------------------------
    def check(self) -> Health:
        """QueryStatus of a dummy doc_id, timed."""
        t0 = time.perf_counter()
        try:
            status = self._call(CHECK_OPERATION, f"{CHECK_OPERATION} (health check)",
                                doc_id=HEALTHCHECK_DOC_ID)
        except (DeliveryError, ConfigError) as exc:
            return Health(False, str(exc), None)
        latency = (time.perf_counter() - t0) * 1000
        if status not in KNOWN_STATUSES:
            return Health(False, f"{CHECK_OPERATION} answered {status!r}", latency)
        return Health(True, f"{self._where()} answers ({CHECK_OPERATION}: {status})", latency)

    def recall(self, message_id: str, unit: str, ref: str | None = None) -> bool:
        """RecallDocument (撤回): True if ``RECALLED``, False if ``TOO_LATE`` (signed for)."""
        ref = delivery_ref(message_id, unit, ref)
        result = self._call(RECALL_OPERATION, f"{RECALL_OPERATION} of message {message_id} "
                            f"to {unit}", doc_id=ref)
        if result == "RECALLED":
            return True
        if result == "TOO_LATE":
            return False
        raise PermanentError(f"{RECALL_OPERATION} answered {result!r}; expected RECALLED or "
                             "TOO_LATE", code="bad-response")

    def close(self) -> None:
        self._session.close()


def _is_url(location: str) -> bool:
    return urlsplit(location).scheme in ("http", "https", "file")


def _reason(exc: BaseException) -> str:
    """The useful bit of a requests error ("Connection refused"), not its whole repr."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    return type(exc).__name__


def _field(obj: Any, name: str) -> Any:
    """A field of a zeep object (or a mapping), None when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _receipt_list(page: Any) -> list[Any]:
    """zeep answers the ReceiptArray as a list (or None when empty); accept the wrapper too."""
    if page is None:
        return []
    if not isinstance(page, list):
        page = getattr(page, "Receipt", None) or []
    return [r for r in page if r is not None]
