"""``/api/v1/blobs``: bodies and attachments uploaded by streaming (claim check)."""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, json, request
from pydantic import BaseModel
from sqlalchemy import func, select

from gateway import audit
from gateway.api import auth
from gateway.api.common import node
from gateway.api.problems import RETRY_AFTER_OUTAGE, Problem
from gateway.api.spec import operation
from gateway.blobs import BlobIncomplete, BlobNoSpace, BlobTooLarge
from gateway.models import Blob, BlobGrant
from gateway.node import Node

bp = Blueprint("blobs", __name__, url_prefix="/api/v1/blobs")
log = logging.getLogger(__name__)


class BlobOut(BaseModel):
    """The stored content's address: reference it from a document by ``sha256``."""

    sha256: str
    size: int


@operation(method="post", path="/api/v1/blobs", operation_id="upload_blob",
           summary="上传正文或附件 (upload a body or attachment by streaming)",
           tag="正文与附件 (blobs)", scope="blobs:write", request_media=("application/octet-stream",),
           responses={201: BlobOut}, errors=(400, 401, 403, 413, 415, 429, 503, 507), headers={201: ("Location",)},
           description="Send the raw bytes as application/octet-stream; they are streamed to disk while "
                       "SHA-256 is computed, never held in memory. The same content uploaded twice is "
                       "stored once. Where the node sets a daily upload quota per key, an upload that "
                       "would pass it is refused 429 upload-quota with Retry-After.")
@bp.post("")
def upload() -> Response:
    n = node()
    caller = auth.require(n.db, "blobs:write")
    if request.mimetype != "application/octet-stream":
        raise Problem(415, "unsupported-media-type", "send the content as application/octet-stream")
    limit = n.config.api.max_blob_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem(413, "too-large", f"the upload is {request.content_length} bytes; at most {limit} are accepted")
    quota = _Quota.of(n, caller)
    if quota is not None and request.content_length is not None and request.content_length > quota.room:
        raise quota.refusal(request.content_length)
    request.max_content_length = limit
    cap = limit if quota is None else min(limit, quota.room)
    try:
        sha, size = n.blobs.put_stream(request.stream, max_bytes=cap, expect_bytes=request.content_length,
                                       keep_free=n.config.api.min_free_bytes)
    except BlobNoSpace as exc:
        log.error("upload refused for want of space: %s", exc.strerror)
        # Retry-After as for a database without room (the OpenAPI document and the docs promise it)
        raise Problem(507, "storage-full", str(exc.strerror),
                      headers={"Retry-After": str(RETRY_AFTER_OUTAGE)}) from None
    except BlobTooLarge:
        if quota is not None and cap < limit:  # a stream of unknown length ran past the key's quota
            raise quota.refusal(None) from None
        raise Problem(413, "too-large", f"the upload exceeds {limit} bytes") from None
    except BlobIncomplete as exc:
        raise Problem(400, "incomplete-body", str(exc)) from None
    with n.db.begin() as s:
        if s.get(Blob, sha) is None:
            s.add(Blob(sha256=sha, size=size, uploaded_by=caller.key_id))
            audit.append(s, actor=caller.actor, action="blob.store", obj=f"blob:{sha}", detail={"size": size})
        if s.get(BlobGrant, (sha, caller.key_id)) is None:  # this key may now name it
            s.add(BlobGrant(sha256=sha, api_key_id=caller.key_id))
    return Response(json.dumps({"sha256": sha, "size": size}), status=201, mimetype="application/json",
                    headers={"Location": f"{request.root_path}/api/v1/blobs/{sha}"})




@operation(method="get", path="/api/v1/blobs/{sha256}", operation_id="get_blob",
           summary="查询已上传内容 (is this content uploaded? its size)", tag="正文与附件 (blobs)",
           scope="blobs:write", responses={200: BlobOut},
           parameters=[{"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}}],
           description="Where an upload's Location points. 200 with the size if content with this SHA-256 "
                       "is stored (so a caller need not upload it again), 404 if not. The content itself "
                       "is never served here.")
@bp.get("/<sha256>")
def blob_info(sha256: str) -> Response:
    n = node()
    caller = auth.require(n.db, "blobs:write")
    if _SHA256.fullmatch(sha256) is None:
        raise Problem(404, "not-found", f"{sha256!r} is not a SHA-256 (64 lowercase hex digits)")
    try:
        if sha256 not in granted(n, caller.key_id, [sha256]):
            raise FileNotFoundError(sha256)
        size = n.blobs.known_size(sha256)
        if n.config.api.in_use_seconds:  # a caller told "stored" gets the time to name it
            n.blobs.in_use([sha256], n.config.api.in_use_seconds)
    except FileNotFoundError:  # stored for another key or not at all: the same answer
        raise Problem(404, "not-found", f"no content with SHA-256 {sha256} has been uploaded with this API key") \
            from None
    return Response(json.dumps({"sha256": sha256, "size": size}), mimetype="application/json")


_SHA256 = re.compile(r"[0-9a-f]{64}")

#: the window of [api] upload_quota_bytes_per_day
QUOTA_WINDOW = timedelta(hours=24)


@dataclass
class _Quota:
    """What a key may still upload under its daily quota (its own, set with ``gateway keys
    quota``, or else the node's ``[api] upload_quota_bytes_per_day``): the quota less the new
    content it stored in the last 24 hours (content stored before, by anyone, adds nothing).
    Two uploads of one key running at once may pass it by at most one of them."""

    quota: int
    used: int
    oldest: datetime | None  # the earliest upload still counted
    source: str  # where the quota is set, for the answer

    @property
    def room(self) -> int:
        return max(0, self.quota - self.used)

    @classmethod
    def of(cls, n: Node, caller: auth.Caller) -> _Quota | None:
        if caller.upload_quota is not None:
            quota, source = caller.upload_quota, "set for this key with 'gateway keys quota'"
        else:
            quota, source = n.config.api.upload_quota_bytes_per_day, "[api] upload_quota_bytes_per_day"
        if not quota:
            return None
        with n.db.sessions() as s:
            used, oldest = s.execute(select(func.coalesce(func.sum(Blob.size), 0), func.min(Blob.created_at)).where(
                Blob.uploaded_by == caller.key_id, Blob.created_at > datetime.now(UTC) - QUOTA_WINDOW)).one()
        return cls(quota, int(used), oldest, source)  # min() keeps the column's type: an aware datetime

    def refusal(self, size: int | None) -> Problem:
        what = f"this upload ({size} bytes)" if size is not None else "this upload (sent without a length)"
        if (size is not None and size > self.quota) or self.oldest is None:  # waiting would not help
            return Problem(413, "too-large", f"{what} is larger than this API key's whole upload quota of "
                                             f"{self.quota} bytes a day ({self.source}); nothing was stored")
        wait = (self.oldest + QUOTA_WINDOW - datetime.now(UTC)).total_seconds()
        return Problem(429, "upload-quota",
                       f"{what} would pass this API key's upload quota: {self.used} of its {self.quota} bytes of new "
                       f"content a day are used in the last 24 hours ({self.source}); nothing was stored. Content "
                       f"already uploaded need not be sent again (GET /api/v1/blobs/{{sha256}})",
                       headers={"Retry-After": str(max(1, int(wait) + 1))})

#: per key id, the contents known to be granted to it; grants are taken back only with the
#: content itself (gateway.retention), which the accept path then finds gone, and a revoked
#: key cannot call at all, so a process may remember them. Read without a lock (a
#: set lookup is atomic under the GIL): every accept asks about all its attachments.
_GRANTED: dict[str, set[str]] = {}
_GRANTED_MAX = 65536  # contents remembered per key; past that the key's are forgotten
_granted_lock = threading.Lock()


def granted(n: Node, key_id: str, shas: list[str]) -> set[str]:
    """Those of ``shas`` the key ``key_id`` uploaded (and so may name in a document). A
    content-addressed store makes a hash alone a bearer token; this is what keeps a key that
    learned the hash of another key's (classified) content from sending it on."""
    known = _GRANTED.get(key_id, set())
    unknown = [sha for sha in shas if sha not in known]
    if not unknown:
        return set(shas)
    with n.db.sessions() as s:
        found = set(s.scalars(select(BlobGrant.sha256).where(BlobGrant.api_key_id == key_id,
                                                             BlobGrant.sha256.in_(set(unknown)))))
    with _granted_lock:
        mine = _GRANTED.setdefault(key_id, set())
        if len(mine) + len(found) > _GRANTED_MAX:
            mine.clear()
        mine.update(found)
    return {sha for sha in shas if sha in known or sha in found}
