"""Typed SQLAlchemy 2 models: the node's whole durable state.

Migrations live in ``gateway/migrations`` (Alembic); change a model, add a revision.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python. SQLite keeps no offset, and a
    naive time would be read as Beijing time by a caller in UTC+8; this attaches UTC on read
    and converts to UTC on write. PostgreSQL gives a timestamptz in the session's TimeZone
    (the server's ``timezone`` setting, or ``PGTZ``): it is converted to UTC on read, so that
    no answer depends on how the database server was set up."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


def table(model: type[Base]) -> Table:
    """The Core table of a model, typed for insert()/update()."""
    return cast(Table, model.__table__)


class Message(Base):
    """One accepted message (a canonical envelope) and its summary for queries."""

    __tablename__ = "messages"
    # A caller lists its own messages, newest first.
    __table_args__ = (Index("ix_messages_key_accepted", "api_key_id", "accepted_at"),)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    subsystem: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(64))
    sender_unit: Mapped[str] = mapped_column(String(18))
    classification: Mapped[str] = mapped_column(String(8))
    clearance: Mapped[int] = mapped_column(Integer)
    urgency: Mapped[str] = mapped_column(String(8))
    in_reply_to: Mapped[str | None] = mapped_column(String(128))
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    #: the API key (caller) that submitted it; None for messages that came from adapters
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(64), default="api")
    #: PostgreSQL 14+: compressed with LZ4 (migration 0006), not pglz, like envelope_xml
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    #: PostgreSQL 14+: compressed with LZ4 (migration 0005), not pglz: less CPU per accept
    envelope_xml: Mapped[bytes] = mapped_column(LargeBinary)
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="message", order_by="Delivery.id", lazy="selectin"
    )


#: a copy's status (``Delivery.status``), as the API and the webhooks show it
DELIVERY_STATUSES = ("queued", "delivered", "signed", "returned", "recalled", "failed")


class Delivery(Base):
    """One recipient unit's copy of a message (收文单位), with its status."""

    __tablename__ = "deliveries"
    # The unique (message_id, unit) index also serves lookups by message_id. Copies by their
    # delivery time, for ``report sign-for`` (migration 0014): only delivered ones, so that an
    # accept writes no entry, and a change after the delivery (签收) none either.
    __table_args__ = (UniqueConstraint("message_id", "unit"),
                      Index("ix_deliveries_delivered_at", "delivered_at",
                            sqlite_where=text("delivered_at IS NOT NULL"),
                            postgresql_where=text("delivered_at IS NOT NULL")))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"))
    unit: Mapped[str] = mapped_column(String(18))
    unit_name: Mapped[str | None] = mapped_column(String(200))
    copy_type: Mapped[str | None] = mapped_column(String(4))
    copy_no: Mapped[str | None] = mapped_column(String(6))
    #: "adapter" (a legacy system here) or "node" (forwarded to the next node, ``target``)
    route_kind: Mapped[str] = mapped_column(String(8))
    target: Mapped[str | None] = mapped_column(String(64))
    #: one of DELIVERY_STATUSES
    status: Mapped[str] = mapped_column(String(12))
    remote_ref: Mapped[str] = mapped_column(String(64), index=True)
    remote_id: Mapped[str | None] = mapped_column(String(200))
    signer: Mapped[str | None] = mapped_column(String(100))
    receipt_no: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    message: Mapped[Message] = relationship(back_populates="deliveries")


class OutboxEntry(Base):
    """Work for the delivery worker (transactional outbox). ``priority`` is the urgency
    rank (0 特急 first); rows are claimed with a lease so a dead worker's rows return."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_ready", "state", "priority", "next_attempt_at", "id"),
                      # only rows of a conversation: the in-order check looks them up; the rest
                      # (every deliver row) would cost an entry and a WAL page per accept
                      Index("ix_outbox_conversation", "conversation", "target", "id",
                            sqlite_where=text("conversation IS NOT NULL"),
                            postgresql_where=text("conversation IS NOT NULL")))
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    #: "deliver", "recall", "webhook"; federation: "forward" (a message to the next node),
    #: "status" (a status change back to the node a message came from)
    kind: Mapped[str] = mapped_column(String(8))
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"), index=True)
    target: Mapped[str] = mapped_column(String(400))  # adapter name, peer node id, or webhook URL
    #: forwarded rows of one conversation (初报, 续报 …) leave for a node in accept order; so do
    #: the webhook rows of one copy (``webhook:<delivery id>``), to the caller's URL
    conversation: Mapped[str | None] = mapped_column(String(128))
    payload: Mapped[dict | None] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=2)
    #: pending, claimed, done, dead
    state: Mapped[str] = mapped_column(String(8), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ReceiptRecord(Base):
    """Every receipt (回执) received, in arrival order, whatever adapter brought it."""

    __tablename__ = "receipts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    action: Mapped[str] = mapped_column(String(10))
    signer: Mapped[str | None] = mapped_column(String(100))
    receipt_no: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IngestedItem(Base):
    """Keys of everything adapters have collected (idempotent consumer), and of the batch
    items and ferry files peers sent (``adapter`` ``peer:NODE`` / ``ferry:NODE``)."""

    __tablename__ = "ingested"
    #: the ``prune`` job finds the keys not seen for a while by it (migration 0013)
    __table_args__ = (Index("ix_ingested_at", "at"),)
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    adapter: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(200))
    #: when the item was taken, or last seen again at its source (gateway.inbound) or sent
    #: again by its peer (gateway.federation.batch, ferry); a key is forgotten [worker]
    #: keep_ingested_days (legacy items) or keep_peer_items_days (peers' items) after it
    #: (gateway.prune)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AdapterState(Base):
    __tablename__ = "adapter_state"
    adapter: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Blob(Base):
    """A stored body or attachment (claim check), content-addressed."""

    __tablename__ = "blobs"
    #: what a key uploaded lately, for [api] upload_quota_bytes_per_day (migration 0009)
    __table_args__ = (Index("ix_blobs_uploader_time", "uploaded_by", "created_at"),)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    uploaded_by: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlobGrant(Base):
    """An API key may name this content in its documents: it uploaded it (migration 0008)."""

    __tablename__ = "blob_grants"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlobClaim(Base):
    """Content a stored message names: never removed as unclaimed (gateway.retention;
    migration 0011)."""

    __tablename__ = "blob_claims"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """A caller's key: stored hashed, with scopes (``documents:send`` …) and a clearance."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list] = mapped_column(JSON)
    clearance: Mapped[int] = mapped_column(Integer, default=0)
    #: units the caller may send for; empty = any unit this node serves
    units: Mapped[list] = mapped_column(JSON, default=list)
    webhook_url: Mapped[str | None] = mapped_column(String(400))
    #: new content this key may store in any 24 hours (0: no limit); None: the node's
    #: [api] upload_quota_bytes_per_day (migration 0010)
    upload_quota_bytes_per_day: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class IdempotencyRecord(Base):
    """A POST answered once per (caller, Idempotency-Key)."""

    __tablename__ = "idempotency"
    api_key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEntry(Base):
    """Append-only, hash-chained audit record (审计日志). ``hash`` covers every field and the
    previous entry's hash, so an altered, removed or reordered entry breaks the chain."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))  # not indexed: nothing looks entries up by it (0007)
    object: Mapped[str] = mapped_column(String(400))
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class FederationNonce(Base):
    """Nonces of signed node-to-node requests seen recently (replay protection). Kept for
    twice the allowed clock skew; a second request with the same (key id, nonce) is refused."""

    __tablename__ = "federation_nonces"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class DirectoryVersion(Base):
    """A signed federation directory (节点目录) as published by the prefecture node: nodes,
    their addresses and keys, and the units each serves. The newest verified one routes."""

    __tablename__ = "directory"
    version: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                         autoincrement=False)
    issuer: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: the signed document exactly as received (canonical JSON) and its detached signature
    document: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[str] = mapped_column(String(200))
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobRun(Base):
    """One run of a scheduled job (``[schedules]`` or ``gateway sync JOB``), with its outcome.
    (job, tick) is unique: one run per schedule tick however many instances are running."""

    __tablename__ = "job_runs"
    __table_args__ = (UniqueConstraint("job", "tick"), Index("ix_job_runs_job_started", "job", "started_at"),
                      # the runs left running (scheduler._run_locked looks for them before every
                      # run), without reading the job's whole history (migration 0012)
                      Index("ix_job_runs_running", "job", sqlite_where=text("outcome = 'running'"),
                            postgresql_where=text("outcome = 'running'")))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64))
    #: the schedule tick this run belongs to; manual runs use their start time
    tick: Mapped[datetime] = mapped_column(UTCDateTime())
    trigger: Mapped[str] = mapped_column(String(16))  # "schedule" or "manual"
    instance: Mapped[str] = mapped_column(String(200))
    #: running, ok, failed
    outcome: Mapped[str] = mapped_column(String(12), default="running")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
