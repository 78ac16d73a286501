"""RFC 9457 problem details. Every error the API answers is ``application/problem+json``
with a stable ``type`` a caller can switch on."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, Response, json, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException

from gateway.db import outage, outage_text

TYPE_PREFIX = "urn:egov:gateway:problem:"

TITLES = {
    "validation": "请求内容不符合要求 (request failed validation)",
    "malformed-json": "请求体不是合法的 JSON (malformed JSON)",
    "malformed-xml": "请求体不是合法的 XML (malformed XML)",
    "forbidden-dtd": "不允许 DOCTYPE 或实体声明 (DOCTYPE/ENTITY not allowed)",
    "too-large": "请求体过大 (request too large)",
    "uri-too-long": "请求地址过长 (request line too long)",
    "header-too-large": "请求头过大 (request headers too large)",
    "incomplete-body": "请求体不完整 (request body ended early)",
    "storage-full": "存储空间不足 (storage full)",
    "database-unavailable": "数据库暂不可用 (database unavailable)",
    "too-deep": "XML 嵌套过深 (XML nested too deeply)",
    "bad-encoding": "字符编码错误 (bad character encoding)",
    "unauthenticated": "需要有效的 API 密钥 (a valid API key is required)",
    "forbidden-scope": "API 密钥无此权限 (the API key lacks a scope)",
    "metrics-token": "需要指标访问令牌 (the metrics token is required)",
    "clearance-too-low": "密级权限不足 (clearance too low)",
    "forbidden-unit": "无权代表该单位 (not allowed to act for this unit)",
    "not-found": "未找到 (not found)",
    "no-route": "收文单位无路由 (no route for a recipient)",
    "attachments-not-carried": "收文系统不接收附件 (the receiving system takes the body only)",
    "unknown-blob": "正文或附件未上传 (body or attachment not uploaded)",
    "idempotency-key-reused": "幂等键已用于不同请求 (Idempotency-Key reused)",
    "message-id-conflict": "消息标识已被占用 (message id taken)",
    "foreign-message-id": "消息标识属于其他节点 (message id of another node)",
    "unsupported-media-type": "不支持的内容类型 (unsupported media type)",
    "method-not-allowed": "不允许的方法 (method not allowed)",
    "conflict": "状态冲突 (conflict)",
    "recall-not-supported": "收文系统不支持撤回 (the receiving system has no recall)",
    "not-ready": "服务未就绪 (not ready)",
    "bad-signature": "节点签名无效 (node signature invalid)",
    "unknown-key": "未知节点密钥 (unknown node key)",
    "stale-request": "请求时间超出允许偏差 (request time outside the allowed clock skew)",
    "replayed-request": "重放的请求 (replayed request)",
    "peer-unavailable": "对端节点不可用 (peer node unavailable)",
    "malformed-request": "HTTP 请求格式错误 (malformed HTTP request)",
    "forbidden-request": "请求被拒绝 (request refused)",
    "internal": "内部错误 (internal error)",
    "upload-quota": "上传配额已用完 (upload quota used up)",
    "unsupported-coding": "不支持的编码方式 (content or transfer coding not supported)",
}


class Problem(Exception):
    """An error answer: its status, type, detail and any further members of the body;
    ``headers`` go on the answer (e.g. Retry-After), not in its body."""

    def __init__(self, status: int, kind: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail, self.extra = status, kind, detail, extra
        self.headers = headers or {}


def problem_document(status: int, kind: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The RFC 9457 body of a problem answer."""
    return {"type": TYPE_PREFIX + kind, "title": TITLES.get(kind, kind), "status": status, "detail": detail,
            **extra}


def problem_response(status: int, kind: str, detail: str, **extra: Any) -> Response:
    body = problem_document(status, kind, detail, instance=shown(request.path) if request else None, **extra)
    out = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/problem+json")
    if kind in ("unauthenticated", "metrics-token"):  # RFC 9110: a 401 says how to authenticate
        out.headers["WWW-Authenticate"] = 'Bearer realm="gateway"'
    return out


_HTTP_KINDS = {400: "validation", 401: "unauthenticated", 403: "forbidden-scope", 404: "not-found",
               405: "method-not-allowed", 409: "conflict", 413: "too-large", 415: "unsupported-media-type"}


def client_stalled(exc: BaseException) -> bool:
    """Whether ``exc`` is a read from (or write to) the client that waited out the socket's
    timeout (gateway.gunicorn_worker sets SO_RCVTIMEO / SO_SNDTIMEO, under which a blocking
    socket fails with EAGAIN)."""
    return isinstance(exc, BlockingIOError)


_STALLED = ("the request body stopped before its end: the client went away, or sent nothing for too long "
            "(GATEWAY_READ_TIMEOUT); nothing was stored")


def install(app: Flask) -> None:
    @app.errorhandler(Problem)
    def _problem(exc: Problem) -> Response:
        hook = app.extensions.get("gateway.on_problem")
        if hook is not None:  # the security refusals' audit (gateway.api.auth.Refusals)
            hook(exc)
        out = problem_response(exc.status, exc.kind, exc.detail, **exc.extra)
        out.headers.update(exc.headers)
        return out

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if isinstance(exc, ClientDisconnected):  # werkzeug's word for a body that ended or stalled
            return problem_response(400, "incomplete-body", _STALLED)
        status = exc.code or 500
        detail = exc.description or ""
        if status == 413:  # werkzeug's: a Content-Length past the endpoint's limit
            limit, size = request.max_content_length, request.content_length
            detail = f"the request body is {size} bytes" if size else "the request body is too large"
            if limit:
                detail += f"; this endpoint accepts at most {limit} bytes"
            if request.path.startswith("/api/v1/documents"):
                detail += " (a document's JSON or XML: upload its body and attachments to /api/v1/blobs and name " \
                          "them by SHA-256)"
        out = problem_response(status, _HTTP_KINDS.get(status, "internal" if status >= 500 else "validation"),
                               detail)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":  # e.g. Allow on a 405, Retry-After
                out.headers[name] = value
        return out

    @app.errorhandler(Exception)
    def _any(exc: Exception) -> Response:
        # a chunked body that stalled (read without werkzeug's length check) or whose
        # connection ended inside a chunk
        if client_stalled(exc) or isinstance(exc, NoMoreData):
            app.logger.warning("%s %s: %s", request.method, shown(request.path), _STALLED)
            return problem_response(400, "incomplete-body", _STALLED)
        if isinstance(exc, ParseException):  # a chunked body gunicorn could not read: a bad size or terminator
            app.logger.warning("%s %s: malformed chunked body: %s", request.method, shown(request.path),
                               shown(str(exc)))
            # (the connection is closed after the answer: gunicorn_worker.handle_request)
            return problem_response(400, "malformed-request", f"the chunked request body is malformed "
                                    f"({shown(str(exc))[:200]}); nothing was stored")
        kind = outage(exc)
        if kind is not None:  # the database is away or full: not the request's fault, nor a bug
            return _outage_answer(app, kind, exc)
        app.logger.exception("unhandled error on %s %s", request.method, shown(request.path))
        return problem_response(500, "internal", "an internal error occurred; it has been logged")

    @app.before_request
    def _hygiene() -> None:
        check_request()


#: seconds a caller is asked to wait before trying again while the database is away or full
RETRY_AFTER_OUTAGE = 5


class _OutageLog:
    """The log lines of requests refused for an outage: the first one, then at most one
    every ``EVERY`` seconds with the number refused since (the access log has each one).
    A 30 s restart under load would otherwise write thousands of lines saying the same."""

    EVERY = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._quiet = 0

    def note(self, app: Flask, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.EVERY:
                self._quiet += 1
                return
            quiet, self._quiet, self._last = self._quiet, 0, now
        if quiet:
            msg += f" ({quiet} more answered so since the last such line)"
        app.logger.log(level, msg, *args)


#: (gateway.api.auth.Refusals notes the refusals it cannot audit during an outage here too)
OUTAGE_LOG = _OutageLog()


def _outage_answer(app: Flask, kind: str, exc: BaseException) -> Response:
    """503 (the database is away: restarting, stopped, out of connections) or 507 (its disk
    is full), both with Retry-After; the log gets one line, not a traceback per request.
    Nothing was stored: the request's transaction was never committed (or, for a commit cut
    off on its way back, the same Idempotency-Key finds it when the caller tries again)."""
    text = outage_text(exc)
    if kind == "full":
        node = app.extensions.get("gateway.node")
        if node is not None:  # /readyz says not ready for a while (a load balancer sends the accepts elsewhere)
            node.full_database.note()
        OUTAGE_LOG.note(app, logging.ERROR, "%s %s: no disk space left for the database (%s); answered 507",
                         request.method, shown(request.path), shown(text))
        out = problem_response(507, "storage-full", "the node's database has no disk space left; nothing was "
                                                    "stored, try again later")
    else:
        OUTAGE_LOG.note(app, logging.WARNING, "%s %s: the database is unavailable (%s); answered 503",
                         request.method, shown(request.path), shown(text))
        out = problem_response(503, "database-unavailable", "the node's database is unavailable for the moment "
                                                            "(restarting, stopped or out of connections; its "
                                                            "operator is told in the node's log); do not take this "
                                                            "request as done: send it again after Retry-After "
                                                            "seconds, a POST with the same Idempotency-Key (or "
                                                            "message_id), so that it is never done twice")
    out.headers["Retry-After"] = str(RETRY_AFTER_OUTAGE)
    return out


def shown(text: str) -> str:
    """``text`` for a log line or an answer: control characters (a forged line break, a
    terminal escape, a NUL) and lone surrogates written as escapes, everything else as is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def db_safe(text: str) -> bool:
    """Text both databases can hold and compare: no NUL (PostgreSQL refuses it) and no lone
    surrogate (not UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable(text: str) -> bool:
    """A path, a query value or an id: db_safe, and no control characters at all."""
    return text.isprintable() and db_safe(text)


#: transfer codings gunicorn decodes; any other is refused rather than passed on undecoded
_TRANSFER_CODINGS = ("chunked",)


def check_request() -> None:
    """What no endpoint takes: a path or query value with control characters or that is not
    UTF-8, a query parameter given twice (each one has a single value), a body in a content
    coding (gzip …) or a transfer coding other than chunked, neither of which is decoded here."""
    raw = request.environ.get("PATH_INFO", "")  # the path's bytes, as WSGI hands them over (latin-1)
    if not raw.isascii():
        try:
            raw.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise Problem(400, "validation", f"the request path '{shown(request.path)}' holds bytes that are not "
                                             f"UTF-8") from None
    if not storable(request.path):
        raise Problem(400, "validation", f"the request path '{shown(request.path)}' contains control characters "
                                         f"or bytes that are not UTF-8")
    for name, values in request.args.lists():
        if len(values) > 1:
            raise Problem(400, "validation", f"query parameter '{shown(name)}' is given {len(values)} times; "
                                             f"it takes one value", errors=[{"field": shown(name),
                                                                              "message": "given more than once"}])
        if not storable(name) or not storable(values[0]):
            raise Problem(400, "validation", f"query parameter '{shown(name)}' contains control characters or "
                                             f"bytes that are not UTF-8")
    env = request.environ
    te = [c.strip().lower() for c in env.get("HTTP_TRANSFER_ENCODING", "").split(",") if c.strip()]
    if any(c not in _TRANSFER_CODINGS for c in te):
        raise Problem(501, "unsupported-coding", f"Transfer-Encoding '{shown(env['HTTP_TRANSFER_ENCODING'])}': "
                                                 f"only chunked is supported; send the body without other codings")
    ce = env.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if ce not in ("", "identity"):
        raise Problem(415, "unsupported-coding", f"Content-Encoding '{shown(ce)}' is not accepted: send the body "
                                                 f"uncompressed (the gateway stores and hashes the bytes it gets)",
                      headers={"Accept-Encoding": "identity"})
