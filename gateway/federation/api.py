"""The receiving side of federation: ``/federation/v1/...``, every request signed (RFC 9421)
by a peer whose key is pinned in ``[peers]``. A refused request gets a problem+json answer
and an audit entry."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, g, request, stream_with_context
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway import audit
from gateway.api.problems import Problem, db_safe, shown
from gateway.db import Database
from gateway.federation import batch, reconcile, transfer
from gateway.federation.signing import ANSWER_HEADER, SignatureRejected, answer_signature, verify
from gateway.models import FederationNonce, table
from gateway.node import Node

bp = Blueprint("federation", __name__, url_prefix="/federation/v1")

_STATUS = {"bad-signature": 401, "unknown-key": 401, "stale-request": 401, "replayed-request": 401}
#: a nonce seen before inserts nothing (no unique-key error: in a group commit such an error
#: would roll back the whole group and run every unit of it again, one by one)
_INSERT_NONCE = {postgres: (pg_insert if postgres else sqlite_insert)(table(FederationNonce)).on_conflict_do_nothing()
                 .returning(table(FederationNonce).c.nonce) for postgres in (False, True)}


def _node() -> Node:
    return current_app.extensions["gateway.node"]


def authenticate(n: Node) -> str:
    """The peer that signed this request, or a 401 problem (with an audit entry; see
    :class:`gateway.federation.state.RejectAudit` for a flood of them)."""
    body = request.get_data(cache=True)
    fed = n.federation
    try:
        v = verify(request.method, request.url, request.headers, body, keys=fed.peer_key,
                   max_skew=n.config.federation.max_skew, node_id=n.id,
                   require_to=not n.config.federation.accept_untargeted)
        if not remember_nonce(n.db, v.key_id, v.nonce):
            raise SignatureRejected("replayed-request", f"this request from node {v.key_id} was seen before "
                                    f"(nonce {v.nonce}); a replayed request is refused", v.key_id)
        fed.maybe_purge_nonces()
        g.fed_nonce = v.nonce  # the answer is signed over it (_sign_answer)
        g.fed_peer = v.key_id  # a refusal is audited in its name (gateway.api.auth.Refusals)
        return v.key_id
    except SignatureRejected as exc:
        if fed.rejects.admit(request.remote_addr or "?", exc.kind):  # a flood is counted, not written 1 by 1
            with n.db.begin() as s:
                audit.append(s, actor=f"node:{exc.key_id or 'unknown'}", action="federation.reject",
                             obj=f"{request.method} {request.path}", outcome=exc.kind,
                             detail={"reason": exc.detail, "remote_addr": request.remote_addr})
        raise Problem(_STATUS[exc.kind], exc.kind, exc.detail) from None


@bp.after_app_request  # every blueprint's: the directory's answers too
def _sign_answer(resp: Response) -> Response:
    """Sign the answer to an authenticated node request over its nonce and body (a streamed
    content answer is not: its SHA-256, which the request names, is its proof)."""
    nonce = g.get("fed_nonce")
    if nonce and not resp.is_streamed:
        resp.headers[ANSWER_HEADER] = answer_signature(_node().federation.own_key, nonce, resp.get_data())
    return resp


def _json_body() -> Any:
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except RecursionError:
        raise Problem(400, "malformed-json", "the body is not JSON this node reads: it is nested too deeply") from None
    except ValueError as exc:
        if "int_max_str_digits" in str(exc):  # Python's own advice is no answer for a peer
            raise Problem(400, "malformed-json", "the body is not JSON this node reads: a number in it has more "
                                                 "than 4300 digits") from None
        raise Problem(400, "malformed-json", f"the body is not JSON: {exc}") from None
    bad = _unstorable(body)
    if bad is not None:
        raise Problem(400, "validation", f"the body holds text no database keeps: '{shown(bad)[:80]}' has a NUL or a "
                                         f"lone surrogate")
    return body


def _unstorable(value: Any, depth: int = 0) -> str | None:
    """The first string in a parsed body (keys too) that is not storable text, if any; JSON
    deeper than 64 levels counts as one (no federation body is nested that far)."""
    if depth > 64:
        return "…(nested more than 64 levels)"
    if isinstance(value, str):
        return None if value.isprintable() or db_safe(value) else value
    if isinstance(value, list):
        for v in value:
            bad = _unstorable(v, depth + 1)
            if bad is not None:
                return bad
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = _unstorable(k, depth + 1) or _unstorable(v, depth + 1)
            if bad is not None:
                return bad
    return None


def _answer(fn, *args: Any) -> Response:  # type: ignore[no-untyped-def]
    try:
        result = fn(*args)
    except transfer.TransferError as exc:
        raise Problem(exc.status, exc.kind, exc.detail) from None
    return Response(json.dumps(result, ensure_ascii=False), status=200, mimetype="application/json")


@bp.post("/messages")
def receive_message() -> Response:
    n = _node()
    peer = authenticate(n)
    try:
        answer, created = transfer.import_message(n, peer, _json_body())
    except transfer.TransferError as exc:
        raise Problem(exc.status, exc.kind, exc.detail) from None
    return Response(json.dumps(answer, ensure_ascii=False), status=200, mimetype="application/json",
                    headers={"Idempotent-Replayed": "false" if created else "true"})


@bp.post("/status")
def receive_status() -> Response:
    n = _node()
    peer = authenticate(n)
    body = _json_body()
    return _answer(transfer.apply_statuses, n, peer, body.get("items") if isinstance(body, dict) else None)


@bp.post("/recall")
def receive_recall() -> Response:
    n = _node()
    peer = authenticate(n)
    return _answer(transfer.recall, n, peer, _json_body())


@bp.get("/messages/<message_id>/blobs/<sha256>")
def send_blob(message_id: str, sha256: str) -> Response:
    n = _node()
    peer = authenticate(n)
    if not transfer.blob_allowed(n, peer, message_id, sha256) or not n.blobs.exists(sha256):
        raise Problem(404, "not-found", f"no content {sha256} of a message forwarded to node {peer}")

    def stream():  # type: ignore[no-untyped-def]
        with n.blobs.open(sha256) as f:
            while chunk := f.read(1 << 20):
                yield chunk

    return Response(stream_with_context(stream()), mimetype="application/octet-stream",
                    headers={"Content-Length": str(n.blobs.size(sha256))})


@bp.post("/batch")
def receive_batch() -> Response:
    n = _node()
    peer = authenticate(n)
    body = _json_body()
    return _answer(batch.apply_items, n, peer, body.get("items") if isinstance(body, dict) else None)


@bp.get("/batch")
def serve_batch() -> Response:
    n = _node()
    peer = authenticate(n)
    try:
        limit = int(request.args.get("limit", "200"))
    except ValueError:
        raise Problem(400, "validation", "limit must be an integer") from None
    return _answer(batch.serve_batch, n, peer, max(1, limit))


@bp.post("/batch/ack")
def acknowledge_batch() -> Response:
    n = _node()
    peer = authenticate(n)
    body = _json_body()
    return _answer(batch.acknowledge, n, peer, body.get("results") if isinstance(body, dict) else None)


@bp.post("/reconcile")
def reconcile_copies() -> Response:
    n = _node()
    peer = authenticate(n)
    body = _json_body()
    return _answer(reconcile.answer, n, peer, body.get("items") if isinstance(body, dict) else None)


@bp.get("/ping")
def ping() -> Response:
    n = _node()
    peer = authenticate(n)
    return Response(json.dumps({"node": n.id, "peer": peer, "time": datetime.now(UTC).isoformat()}),
                    mimetype="application/json")


def remember_nonce(db: Database, key_id: str, nonce: str) -> bool:
    """Record a signed request's nonce; False if it was recorded before (a replay)."""
    stmt = _INSERT_NONCE[db.postgres]
    return db.write(lambda c: c.execute(stmt, {"key_id": key_id, "nonce": nonce,
                                               "seen_at": datetime.now(UTC)}).first()) is not None


def purge_nonces(n: Node) -> int:
    cutoff = datetime.now(UTC) - timedelta(seconds=2 * n.config.federation.max_skew + 60)
    with n.db.begin() as s:
        return s.execute(delete(FederationNonce).where(FederationNonce.seen_at < cutoff)).rowcount  # type: ignore[attr-defined]
