"""HTTP routes of the documents subsystem: ``/api/v1/documents…``."""
from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, request
from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session, defer, lazyload

from gateway import audit, payloads, pipeline, xmlsafe
from gateway.api import auth
from gateway.api.blobs import granted
from gateway.api.common import (
    body_bytes,
    idempotency_key,
    node,
    parse_json,
    parse_xml,
    request_hash,
    validation_problem,
    wants_xml,
)
from gateway.api.problems import Problem, storable
from gateway.api.spec import IDEMPOTENCY_KEY, operation
from gateway.envelope import CLASSIFICATION_LEVEL, Envelope, EnvelopeError, own_id
from gateway.models import Delivery, IdempotencyRecord, Message, ReceiptRecord
from gateway.pipeline import IdempotencyKey, Rejected, StoredMessage, accept
from systems.documents import SLUG, payload
from systems.documents.schemas import (
    RECIPIENT_STATUSES,
    DocumentIn,
    DocumentList,
    DocumentOut,
    ReceiptOut,
    RecipientStatus,
)

bp = Blueprint("documents", __name__, url_prefix=f"/api/v1/{SLUG}")

_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _document_in() -> tuple[DocumentIn, bool]:
    """The request's document, and whether its values are plain text for XML (see
    xmlsafe.plain_json; only told for JSON)."""
    mt = request.mimetype
    data = body_bytes()
    if mt in ("application/json", ""):
        return parse_json(DocumentIn, data), xmlsafe.plain_json(data)  # type: ignore[return-value]
    if mt in ("application/xml", "text/xml"):
        root = parse_xml(data)
        try:
            env = Envelope.from_xml(root)
            if env.subsystem != SLUG or env.type != "document":
                raise Problem(422, "validation", f"the envelope is for {env.subsystem}/{env.type}; this "
                              f"endpoint takes {SLUG}/document")
            payloads.validate(env.payload)  # the caller's payload, against the payload XSD
            fields = payload.from_envelope(env)
        except EnvelopeError as exc:
            errs = [{"field": f, "message": m} for f, m in exc.errors]
            raise Problem(422, "validation", str(exc), errors=errs) from None
        except ValueError as exc:
            raise Problem(422, "validation", str(exc)) from None
        try:
            return DocumentIn.model_validate(fields), False
        except ValidationError as exc:
            raise validation_problem(exc) from None
    raise Problem(415, "unsupported-media-type", f"send application/json or application/xml, not {mt}")


def _status_out(m: Message, with_receipts: bool, receipts: dict[int, list[ReceiptRecord]] | None = None) -> DocumentOut:
    rs = []
    for d in m.deliveries:
        rs.append(RecipientStatus(
            unit=d.unit, name=d.unit_name, copy_type=d.copy_type, copy_no=d.copy_no, status=d.status,
            route=d.target, signer=d.signer, signed_at=d.signed_at, receipt_no=d.receipt_no, reason=d.reason,
            last_error=d.last_error if d.status in ("queued", "failed") else None,
            receipts=[ReceiptOut(action=r.action, signer=r.signer, receipt_no=r.receipt_no, reason=r.reason,
                                 time=r.time, source=r.source) for r in (receipts or {}).get(d.id, [])]
            if with_receipts else []))
    return DocumentOut(**_header(m), recipients=rs)


def status_url(message_id: str) -> str:
    """The document's own URL (``url_for`` cost a twentieth of an accept's CPU; a ``/`` in an
    id is escaped here, so the URL leads back to the document)."""
    if _PLAIN_ID.fullmatch(message_id) is None:
        message_id = quote(message_id, safe=_SAFE)
    return f"{request.root_path}/api/v1/{SLUG}/{message_id}"


_SAFE = "!$&'()*+,:;=@-._~"
#: a recipient's status, as the list's ?status= takes it
_STATUSES = RECIPIENT_STATUSES
#: the query parameters the list takes
_LIST_PARAMS = ("status", "limit", "cursor")
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:~-]+")  # what the API allows as a message id: nothing to escape


def _header(m: Message | StoredMessage) -> dict:
    """The document-level fields of a DocumentOut, whichever way the answer is built."""
    s = m.summary or {}
    return {"id": m.id, "status_url": status_url(m.id),
            "accepted_at": m.accepted_at, "sender_unit": m.sender_unit, "doc_number": s.get("doc_number"),
            "title": s.get("title"), "doc_type": s.get("doc_type"), "classification": m.classification,
            "urgency": m.urgency}


def _accepted_out(m: StoredMessage, env, routes) -> dict:  # type: ignore[no-untyped-def]
    """The 202 answer (schema: DocumentOut), built from what was just stored: no second read,
    and no second validation of values that were validated on the way in."""
    assert m.accepted_at is not None
    return {
        **_header(m),
        "accepted_at": m.accepted_at.isoformat().replace("+00:00", "Z"),  # as pydantic writes it
        "recipients": [{"unit": r.unit, "name": r.name, "copy_type": r.copy_type, "copy_no": r.copy_no,
                        "status": "queued", "route": route.target,
                        "signer": None, "signed_at": None, "receipt_no": None, "reason": None,
                        "last_error": None, "receipts": []}
                       for r, route in zip(env.recipients, routes)],
    }


def _json(model, status: int = 200, **headers: str) -> Response:  # type: ignore[no-untyped-def]
    # a dict (the 202 answer) is written by pydantic-core's encoder, like the models: the same
    # compact JSON, for less than half of json.dumps' work
    body = to_json(model) if isinstance(model, dict) else model.model_dump_json()
    return Response(body, status=status, mimetype="application/json", headers=headers)


#: status answers never show the stored envelope (20 KB and more): not read for them
_NO_XML = defer(Message.envelope_xml)


#: the envelope's (and the stored id's) limit, schemas/envelope.xsd
_ID_MAX = 128


def _stored_id(n, given: str, caller: auth.Caller) -> str:  # type: ignore[no-untyped-def]
    """The id a document whose ``message_id`` the caller chose is stored under: the caller's
    id with this node's id after it (envelope.own_id), so that callers at two nodes that
    number alike never meet where both send. A document this caller sent before 2026-11-28
    is stored under its id alone: a resend of it keeps that id (and is a replay). Another
    key's document stored so does not stand in the way (two callers here numbering alike)."""
    own = own_id(given, n.id)
    if own == given:
        return given
    with n.db.sessions() as s:
        if s.scalar(select(Message.id).where(Message.id == given, Message.api_key_id == caller.key_id)) is not None:
            return given
    if len(own) > _ID_MAX:
        msg = (f"at most {_ID_MAX - len(n.id) - 1} characters at this node, which stores a message id you choose "
               f"as <your id>:{n.id} (at most {_ID_MAX}); got {len(given)}")
        raise Problem(422, "validation", f"message_id: {msg}", errors=[{"field": "message_id", "message": msg}])
    return own


def _find(s: Session, message_id: str, caller: auth.Caller, with_xml: bool = False) -> Message:
    """The caller's document ``message_id`` (the id the gateway answered with, or the
    caller's own id without this node's id after it), or the 404 / 403 answer."""
    options = [lazyload(Message.deliveries)] if with_xml else [_NO_XML]
    m = s.get(Message, message_id, options=options)
    if (m is None or m.api_key_id != caller.key_id) and (own := own_id(message_id, node().id)) != message_id:
        # the id alone may name another's document here (one a node of an older version stored
        # under a caller's id as it was, forwarded from another node): the caller's own comes first
        mine = s.get(Message, own, options=options)
        if mine is not None and (m is None or mine.api_key_id == caller.key_id):
            m = mine
    if m is None or m.subsystem != SLUG or (m.api_key_id != caller.key_id and not caller.has("admin")):
        raise Problem(404, "not-found", f"no document {message_id} sent with this API key")
    if m.clearance > caller.clearance:
        raise Problem(403, "clearance-too-low", "the document is classified above this key's clearance")
    return m


def _load(message_id: str, caller: auth.Caller, receipts: bool = True) -> DocumentOut:
    n = node()
    with n.db.sessions() as s:
        m = _find(s, message_id, caller)
        recs: dict[int, list[ReceiptRecord]] = {}
        if receipts:
            ids = [d.id for d in m.deliveries]
            for r in s.scalars(select(ReceiptRecord).where(ReceiptRecord.delivery_id.in_(ids))
                               .order_by(ReceiptRecord.id)):
                recs.setdefault(r.delivery_id, []).append(r)
        return _status_out(m, receipts, recs)


@operation(method="post", path="/api/v1/documents", operation_id="send_document",
           summary="发文：发送公文 (send an official document)",
           tag="公文 (documents)", scope="documents:send", request=DocumentIn,
           request_media=("application/json", "application/xml"), responses={202: DocumentOut},
           alternatives={"application/xml": "with Accept: application/xml, the canonical envelope as stored "
                                            "(schemas/envelope.xsd), with its message id and 份号"},
           parameters=[IDEMPOTENCY_KEY], headers={202: ("Location", "Idempotent-Replayed")},
           description="Accepted (202) means stored: the document, its audit entry and one delivery per "
                       "recipient are committed. Upload the body and attachments to /api/v1/blobs first.")
@bp.post("")
def send_document() -> Response:
    n = node()
    caller = auth.require(n.db, "documents:send")
    doc, plain = _document_in()
    if caller.units and doc.sender_unit not in caller.units:
        raise Problem(403, "forbidden-unit", f"this API key may not send for unit {doc.sender_unit}")
    if n.config.node.units and doc.sender_unit not in n.config.node.units:
        raise Problem(403, "forbidden-unit", f"unit {doc.sender_unit} is not served by node {n.id}")
    if CLASSIFICATION_LEVEL[doc.classification] > caller.clearance:
        raise Problem(403, "clearance-too-low",
                      f"this API key's clearance does not cover {doc.classification} documents")
    # The blob store is content-addressed and written only by a complete upload, so a file
    # under its SHA-256 gives its size; that this key uploaded it is a grant in the database,
    # remembered per process (blobs.granted), so a blob checked before costs no round trip.
    shas = [doc.body["sha256"], *[a["sha256"] for a in doc.attachments]]
    # only content this key uploaded (a hash alone is no proof of having it; see blobs.granted)
    mine = granted(n, caller.key_id, shas)
    known = n.blobs.known
    # where unclaimed content is removed after a while, what this document names is marked
    # in use, so that it cannot be removed while the document is being stored
    window = n.config.api.in_use_seconds
    try:  # all of them granted and stored (the usual case): their sizes in one pass
        sizes = {sha: known(sha)[0] for sha in shas} if len(mine) == len(set(shas)) else None
        if sizes is not None and window:
            n.blobs.in_use(shas, window)
    except FileNotFoundError:
        sizes = None
    if sizes is None:  # which ones are not, each named
        sizes, missing = {}, []
        for i, sha in enumerate(shas):
            try:
                if sha not in mine:
                    raise FileNotFoundError(sha)
                sizes[sha] = n.blobs.size(sha)  # not a remembered size: this one may be gone
                if window:
                    n.blobs.in_use([sha], window)
            except FileNotFoundError:
                missing.append(("body.sha256" if i == 0 else f"attachments.{i - 1}.sha256", sha))
        if missing:
            raise Problem(422, "unknown-blob", f"{missing[0][0]}: no content with SHA-256 {missing[0][1]} was "
                          f"uploaded with this API key; upload it to /api/v1/blobs first",
                          errors=[{"field": f, "message": f"no content with SHA-256 {sha} was uploaded with this "
                                                          f"API key"} for f, sha in missing])
    if sizes[doc.body["sha256"]] == 0:
        msg = "the body (正文) is empty: the content uploaded under this SHA-256 has no bytes"
        raise Problem(422, "validation", f"body.sha256: {msg}", errors=[{"field": "body.sha256", "message": msg}])
    mid = None if doc.message_id is None else _stored_id(n, doc.message_id, caller)
    env = payload.to_envelope(doc, message_id=mid, node_id=n.id, sizes=sizes, plain=plain)
    idem_key = idempotency_key()
    idem = None if idem_key is None else IdempotencyKey(caller.key_id, idem_key, request_hash())
    summary = {"doc_number": doc.doc_number, "title": doc.title, "doc_type": doc.doc_type}
    try:
        result = accept(n, env, actor=caller.actor, api_key_id=caller.key_id, summary=summary, idempotency=idem,
                        new_id=doc.message_id is None)
    except Rejected as exc:
        extra: dict[str, Any] = {"errors": [{"field": exc.field, "message": exc.detail}]} if exc.field else {}
        raise Problem(exc.status, exc.kind, exc.detail, **extra) from None
    if wants_xml():  # the canonical XML the document is stored as, with its id and 份号
        headers = {"Location": status_url(result.message.id)}
        if not result.created:
            headers["Idempotent-Replayed"] = "true"
            with n.db.sessions() as s:
                xml = _find(s, result.message.id, caller, with_xml=True).envelope_xml
        else:
            xml = env.to_xml()
        return Response(xml, status=202, mimetype="application/xml", headers=headers)
    out: dict | DocumentOut
    if result.created and result.routes is not None:
        out = _accepted_out(result.message, env, result.routes)
    else:  # a replay: the copies as they are now, receipts included, as a GET shows them
        out = _load(result.message.id, caller)
    headers = {"Location": out["status_url"] if isinstance(out, dict) else out.status_url}
    if not result.created:
        headers["Idempotent-Replayed"] = "true"
    return _json(out, 202, **headers)


@operation(method="get", path="/api/v1/documents/{id}", operation_id="get_document",
           summary="查询公文状态 (one document with each recipient's status)",
           tag="公文 (documents)", scope="documents:read", responses={200: DocumentOut}, parameters=[_ID_PARAM],
           alternatives={"application/xml": "with Accept: application/xml, the stored canonical envelope "
                                            "(schemas/envelope.xsd)"})
@bp.get("/<message_id>")
def get_document(message_id: str) -> Response:
    n = node()
    caller = auth.require(n.db, "documents:read")
    if wants_xml():  # the stored envelope: one read, and none of the status rows
        with n.db.sessions() as s:
            m = _find(s, message_id, caller, with_xml=True)
            xml, classification, message_id = m.envelope_xml, m.classification, m.id
        _audit_read(n, caller, message_id, classification, "xml")
        return Response(xml, mimetype="application/xml")
    out = _load(message_id, caller)
    _audit_read(n, caller, out.id, out.classification, "json")
    return _json(out)


def _audit_read(n, caller: auth.Caller, message_id: str, classification: str, form: str) -> None:  # type: ignore[no-untyped-def]
    """A classified document read is audited: who saw which, in what form (GB/T 22239).
    Unclassified ones are not, so that status polling writes nothing."""
    if classification != "非密":
        with n.db.begin() as s:
            audit.append(s, actor=caller.actor, action="document.read", obj=f"message:{message_id}",
                         detail={"classification": classification, "form": form})


def _audit_list(n, caller: auth.Caller, items: list[DocumentOut]) -> None:  # type: ignore[no-untyped-def]
    """A list that showed classified documents is audited, naming them."""
    classified = [i.id for i in items if i.classification != "非密"]
    if classified:
        with n.db.begin() as s:
            audit.append(s, actor=caller.actor, action="document.list", obj="documents",
                         detail={"classified": classified, "form": "json"})


@operation(method="get", path="/api/v1/documents", operation_id="list_documents",
           summary="公文列表 (documents sent with this key, newest first)",
           tag="公文 (documents)", scope="documents:read", responses={200: DocumentList},
           parameters=[{"name": "status", "in": "query", "schema": {"type": "string", "enum": list(_STATUSES)},
                        "description": "only documents with a recipient in this status"},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 50},
                        "description": "at most this many documents; at most 200 are given (a larger limit "
                                       "gives 200)"},
                       {"name": "cursor", "in": "query", "schema": {"type": "string"}}])
@bp.get("")
def list_documents() -> Response:
    n = node()
    caller = auth.require(n.db, "documents:read")
    for name in request.args:  # a filter it does not have is not silently ignored
        if name not in _LIST_PARAMS:
            raise Problem(400, "validation", f"query parameter '{name}' is not a parameter of this list; it takes "
                                             f"status, limit and cursor",
                          errors=[{"field": name, "message": "not a parameter of this list; it takes status, limit "
                                                             "and cursor"}])
    raw_limit = request.args.get("limit", "50")
    if not raw_limit.isascii() or not raw_limit.isdigit() or int(raw_limit) < 1:
        raise Problem(400, "validation", f"limit {raw_limit!r}: expected an integer from 1 to 200 (larger asks get 200)",
                      errors=[{"field": "limit", "message": "expected an integer from 1 to 200"}])
    limit = min(200, int(raw_limit))
    q = (select(Message).options(_NO_XML).where(Message.subsystem == SLUG, Message.clearance <= caller.clearance)
         .order_by(Message.accepted_at.desc(), Message.id.desc()).limit(limit + 1))
    if not caller.has("admin"):
        q = q.where(Message.api_key_id == caller.key_id)
    status = request.args.get("status")
    if status and status not in _STATUSES:
        raise Problem(400, "validation", f"status {status!r}: expected one of {', '.join(_STATUSES)}",
                      errors=[{"field": "status", "message": f"expected one of {', '.join(_STATUSES)}"}])
    if status:
        # a probe of each listed document's copies (the (message_id, unit) index), newest first
        # until the page is full; SQLite made "id IN (copies in that status)" a list of every
        # copy in the table, read again for every request
        q = q.where(exists().where(Delivery.message_id == Message.id, Delivery.status == status))
    cursor = request.args.get("cursor")
    if cursor:
        try:
            at_s, mid = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            if not isinstance(at_s, str) or not isinstance(mid, str) or not storable(mid) or len(mid) > 128:
                raise TypeError
            at = datetime.fromisoformat(at_s)
            if at.tzinfo is None:  # the API writes every cursor's time with its offset
                raise TypeError
        except (ValueError, TypeError):
            raise Problem(400, "validation", "cursor is not one this API returned",
                          errors=[{"field": "cursor", "message": "not a cursor this API returned"}]) from None
        # the first condition, implied by the second, bounds the index range: without it a page
        # deep in the list read every newer document's index entry first
        q = q.where(Message.accepted_at <= at,
                    or_(Message.accepted_at < at, and_(Message.accepted_at == at, Message.id < mid)))
    with n.db.sessions() as s:
        rows = s.scalars(q).all()
        items = [_status_out(m, False) for m in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = base64.urlsafe_b64encode(json.dumps([last.accepted_at.isoformat(), last.id]).encode()).decode()
    _audit_list(n, caller, items)
    return _json(DocumentList(items=items, next_cursor=nxt))


@operation(method="post", path="/api/v1/documents/{id}/recall", operation_id="recall_document",
           summary="撤回公文 (recall before sign-for)",
           tag="公文 (documents)", scope="documents:recall", responses={202: DocumentOut},
           parameters=[_ID_PARAM, IDEMPOTENCY_KEY], headers={202: ("Idempotent-Replayed",)},
           description="Copies not yet delivered are withdrawn at once; delivered copies are recalled at the "
                       "receiving system where its protocol has a recall (the SOAP document service), and "
                       "keep their status with a `reason` saying so where it has none (the SFTP drop, the "
                       "exchange box); copies already signed for (已签收) cannot be recalled. A recall sent "
                       "again with the same Idempotency-Key is answered again (Idempotent-Replayed). 409 "
                       "`conflict` when no copy is left to recall, `recall-not-supported` when every copy left "
                       "sits in a system that has no recall.")
@bp.post("/<message_id>/recall")
def recall_document(message_id: str) -> Response:
    n = node()
    caller = auth.require(n.db, "documents:recall")
    message_id = _load(message_id, caller, receipts=False).id  # ownership and clearance; the stored id
    idem_key = idempotency_key()
    # what the key was first used for: this recall (a key used for a send, or for another
    # document's recall, is refused as reused)
    digest = hashlib.sha256(f"POST recall\n{message_id}".encode()).hexdigest()
    try:
        replayed = _recall(n, message_id, caller, idem_key, digest)
    except n.db.integrity_errors:  # the same key raced in twice: the other one was stored first
        replayed = _recall(n, message_id, caller, idem_key, digest)
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return _json(_load(message_id, caller), 202, **headers)


def _recall(n, message_id: str, caller: auth.Caller, idem_key: str | None, digest: str) -> bool:  # type: ignore[no-untyped-def]
    """Recall in one transaction; True if the Idempotency-Key had already done it."""
    with n.db.begin() as s:
        if idem_key is not None:
            rec = s.get(IdempotencyRecord, (caller.key_id, idem_key))
            if rec is not None:
                if rec.request_hash != digest or rec.message_id != message_id:
                    raise Problem(422, "idempotency-key-reused", f"Idempotency-Key {idem_key!r} was used before "
                                                                 f"with a different request")
                return True
        out = pipeline.recall(s, message_id, recallable=pipeline.recallable(n))
        if not out.acted and out.cannot:
            raise Problem(409, "recall-not-supported", f"document {message_id} cannot be recalled: the copies for "
                          f"{', '.join(out.cannot)} were delivered to legacy systems that have no recall (the SFTP "
                          f"drop, the exchange box); ask the receiving units to withdraw them")
        if not out.acted:
            raise Problem(409, "conflict", f"document {message_id} has no copy left to recall: each one is signed "
                                           f"for (已签收), returned, recalled or failed")
        if idem_key is not None:
            s.add(IdempotencyRecord(api_key_id=caller.key_id, key=idem_key, request_hash=digest,
                                    message_id=message_id))
        audit.append(s, actor=caller.actor, action="message.recall", obj=f"message:{message_id}",
                     detail={"not_recallable": out.cannot} if out.cannot else None)
    return False
