"""Helpers shared by the subsystems' routes."""
from __future__ import annotations

import hashlib

from flask import current_app, request
from pydantic import BaseModel, ValidationError

from gateway import xmlsafe
from gateway.api.problems import Problem
from gateway.node import Node


def node() -> Node:
    return current_app.extensions["gateway.node"]


#: the message for a text field that breaks xmlsafe.XML_TEXT (pydantic would quote
#: the regular expression)
_NOT_XML_TEXT = ("contains a character an official document cannot carry: a control character other than "
                 "tab and line breaks, or U+FFFE / U+FFFF")
_PATTERN_MESSAGES = {
    xmlsafe.XML_TEXT: _NOT_XML_TEXT,
    xmlsafe.FILE_NAME: "a file name may not contain / or \\ or a control character (nor U+FFFE / U+FFFF), "
                       "or be . or ..",
}


def validation_problem(exc: ValidationError) -> Problem:
    errors = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_pattern_mismatch":
            msg = _PATTERN_MESSAGES.get((e.get("ctx") or {}).get("pattern", ""), msg)
        errors.append({"field": loc, "message": msg})
    detail = "; ".join(f"{x['field']}: {x['message']}" for x in errors[:5])
    if len(errors) > 5:  # the detail stays short; the list is whole
        detail += f"; and {len(errors) - 5} more (see errors)"
    return Problem(422, "validation", detail, errors=errors)


def parse_json(model: type[BaseModel], data: bytes) -> BaseModel:
    charset = request.mimetype_params.get("charset")
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise Problem(415, "bad-encoding", f"charset={charset}: JSON is read as UTF-8 only (RFC 8259); send the body "
                                           f"in UTF-8, or as XML, which may declare GB18030")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: RFC 8259 lets a reader ignore it
        data = data[3:]
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            first = exc.errors()[0]
            raise Problem(400, "malformed-json", f"the body is not valid JSON: {first['msg']}") from None
        raise validation_problem(exc) from None


def parse_xml(data: bytes):  # type: ignore[no-untyped-def]
    try:
        return xmlsafe.parse(data, xmlsafe.XMLLimits(max_bytes=current_app.config["MAX_CONTENT_LENGTH"]),
                             charset=request.mimetype_params.get("charset"))
    except xmlsafe.UnsafeXMLError as exc:
        status = 413 if exc.kind == "too-large" else 400
        raise Problem(status, exc.kind, exc.reason) from None


def idempotency_key() -> str | None:
    """The request's ``Idempotency-Key``, if it has one (400 if it is empty or too long)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= 200:
        raise Problem(400, "validation", "Idempotency-Key must be 1 to 200 characters long")
    return key


def body_bytes() -> bytes:
    data = request.get_data(cache=True)
    declared = request.content_length
    if declared is not None and len(data) < declared:
        # gunicorn hands over what came before the connection ended without a word: a
        # document cut there may still parse (a JSON object missing only trailing spaces)
        raise Problem(400, "incomplete-body", f"the request body ended after {len(data)} of its {declared} bytes "
                                              f"(Content-Length); nothing was stored")
    limit = request.max_content_length
    # A chunked body is cut at the limit by werkzeug without a word; one that goes on past
    # it is refused like one whose Content-Length says so.
    if (limit is not None and len(data) >= limit and request.content_length is None
            and request.environ["wsgi.input"].read(1)):
        raise Problem(413, "too-large", f"the request body is larger than this endpoint accepts ({limit} bytes)")
    return data


def request_hash() -> str:
    h = hashlib.sha256()
    h.update((request.mimetype or "").encode())
    h.update(b"\n")
    h.update(body_bytes())
    return h.hexdigest()


def wants_xml() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "application/xml"])
    return best == "application/xml"
