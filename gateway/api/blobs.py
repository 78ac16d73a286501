"""``/api/v1/blobs``: bodies and attachments uploaded by streaming (claim check)."""
from __future__ import annotations

import re

from flask import Blueprint, Response, json, request
from pydantic import BaseModel

from gateway import audit
from gateway.api import auth
from gateway.api.common import node
from gateway.api.problems import Problem
from gateway.api.spec import operation
from gateway.blobs import BlobIncomplete, BlobTooLarge
from gateway.models import Blob

bp = Blueprint("blobs", __name__, url_prefix="/api/v1/blobs")


class BlobOut(BaseModel):
    """The stored content's address: reference it from a document by ``sha256``."""

    sha256: str
    size: int


@operation(method="post", path="/api/v1/blobs", summary="上传正文或附件 (upload a body or attachment by streaming)",
           tag="正文与附件 (blobs)", scope="blobs:write", request_media=("application/octet-stream",),
           responses={201: BlobOut},
           description="Send the raw bytes as application/octet-stream; they are streamed to disk while "
                       "SHA-256 is computed, never held in memory. The same content uploaded twice is "
                       "stored once.")
@bp.post("")
def upload() -> Response:
    n = node()
    caller = auth.require(n.db, "blobs:write")
    if request.mimetype != "application/octet-stream":
        raise Problem(415, "unsupported-media-type", "send the content as application/octet-stream")
    limit = n.config.api.max_blob_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "too-large", f"the upload is {request.content_length} bytes; at most {limit} are accepted")
    request.max_content_length = limit
    try:
        sha, size = n.blobs.put_stream(request.stream, max_bytes=limit, expect_bytes=request.content_length)
    except BlobTooLarge:
        raise Problem(413, "too-large", f"the upload exceeds {limit} bytes") from None
    except BlobIncomplete as exc:
        raise Problem(400, "incomplete-body", str(exc)) from None
    with n.db.begin() as s:
        if s.get(Blob, sha) is None:
            s.add(Blob(sha256=sha, size=size, uploaded_by=caller.key_id))
            audit.append(s, actor=caller.actor, action="blob.store", obj=f"blob:{sha}", detail={"size": size})
    return Response(json.dumps({"sha256": sha, "size": size}), status=201, mimetype="application/json",
                    headers={"Location": f"/api/v1/blobs/{sha}"})




@operation(method="get", path="/api/v1/blobs/{sha256}",
           summary="查询已上传内容 (is this content uploaded? its size)", tag="正文与附件 (blobs)",
           scope="blobs:write", responses={200: BlobOut},
           parameters=[{"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}],
           description="Where an upload's Location points. 200 with the size if content with this SHA-256 "
                       "is stored (so a caller need not upload it again), 404 if not. The content itself "
                       "is never served here.")
@bp.get("/<sha256>")
def blob_info(sha256: str) -> Response:
    n = node()
    auth.require(n.db, "blobs:write")
    if _SHA256.fullmatch(sha256) is None:
        raise Problem(404, "not-found", f"{sha256!r} is not a SHA-256 (64 lowercase hex digits)")
    try:
        size = n.blobs.known_size(sha256)
    except FileNotFoundError:
        raise Problem(404, "not-found", f"no content with SHA-256 {sha256} has been uploaded") from None
    return Response(json.dumps({"sha256": sha256, "size": size}), mimetype="application/json")


_SHA256 = re.compile(r"[0-9a-f]{64}")
