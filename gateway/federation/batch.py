"""Batches: what the sync jobs carry over links that are up only part of the time.

A peer with ``link = "batch"`` (or ``"ferry"``) gets nothing from the delivery worker: the
forwards, status reports and recalls queued for it wait in the outbox until a sync job takes
them, in queue order, as a batch of *items*::

    {"seq": <outbox id>, "kind": "forward" | "status" | "recall", ...the same fields as the
     single request to /federation/v1/messages, /status or /recall}

The receiver applies the items in order, each in its own transaction and each idempotent,
and records every item it has applied (sending node, ``seq`` and what the item is): its cursor. A batch cut in
the middle is simply sent again; the items recorded before the cut are answered
``duplicate`` without being applied twice, and an item that hits trouble that may pass (a
peer that does not answer a blob fetch) stops the batch there, so nothing overtakes it — a
续报 never arrives before its 初报. (The record is per item, not a high-water mark: outbox
ids are handed out at insert and, on PostgreSQL, concurrent transactions may commit them out
of order, so a lower ``seq`` can become visible after a higher one was sent.) What the item is
(its kind, message and copy, and for a status report the report itself) is part of the key:
a sender restored from a backup hands out outbox ids again, and a new item under a ``seq``
seen before must be applied, not answered ``duplicate`` and lost. A record is marked each
time its item comes again and forgotten by the ``prune`` job [worker] keep_peer_items_days
after the last time (gateway.prune says why that is safe); a refused item's record is kept.

* ``push`` (job): send our queued items to each batch peer (``POST /federation/v1/batch``).
* ``pull`` (job): fetch the items a batch peer has queued for us (``GET /federation/v1/batch``;
  they stay claimed there under a lease), apply them, then acknowledge
  (``POST /federation/v1/batch/ack``). A lost acknowledgement costs a repeat: the lease runs
  out, the items are served again and answered ``duplicate``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from adapters.base import PermanentError, RetryableError
from gateway import audit
from gateway.envelope import CLASSIFICATION_LEVEL
from gateway.federation import require_peers, transfer
from gateway.models import IngestedItem, OutboxEntry
from gateway.node import Node
from gateway.worker import _CLAIMED_ROWS, Job, Outcome, Worker, _envelope, jobs_from_rows, queued_units

log = logging.getLogger("gateway.federation.batch")

BATCH_SIZE = 200
#: forwards of a batch accepted in one transaction (one commit), at most
ACCEPT_TOGETHER = 16
_KINDS = ("forward", "status", "recall")
#: item refusals that are security events: the peer tried to act for a unit or above its clearance,
#: or to take a message id another node made
_SECURITY_REFUSALS = ("forbidden-unit", "clearance-too-low", "foreign-message-id")


# -- the receiver's cursor -----------------------------------------------------------------
def _identity(item: dict[str, Any]) -> str:
    """What an item is, whatever ``seq`` it travels under: the same for every sending of one
    outbox row (a forward's units may shrink by a recall meanwhile, its inline blobs may
    differ: neither is part of it), different for another row given the same ``seq``."""
    kind = item.get("kind")
    if kind == "status":
        what: Any = {k: v for k, v in item.items() if k != "seq"}
    else:
        what = {"kind": kind, "message_id": item.get("message_id"),
                "units": item.get("units") if kind == "recall" else None}
    canonical = json.dumps(what, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def _key(peer: str, item: dict[str, Any]) -> str:
    return f"batch:{peer}:{item['seq']}:{_identity(item)}"


def _applied(node: Node, peer: str, items: list[dict[str, Any]]) -> dict[int, str]:
    """Of ``items``, the seqs of those recorded before, with their outcome (ok or rejected).
    Their records are marked as sent again now: the peer has not recorded this node's answer,
    and the ``prune`` job keeps a record [worker] keep_peer_items_days after it was last sent."""
    if not items:
        return {}
    keys = {_key(peer, i): i["seq"] for i in items}
    with node.db.sessions() as s:
        done: dict[int, tuple[str, str]] = {keys[key]: (key, outcome) for key, outcome in s.execute(
            select(IngestedItem.key, IngestedItem.outcome).where(IngestedItem.key.in_(list(keys))))}
    if done:
        _sent_again(node, [key for key, _ in done.values()])
    return {seq: outcome for seq, (_, outcome) in done.items()}


def _sent_again(node: Node, keys: list[str]) -> None:
    with node.db.begin() as s:
        s.execute(update(IngestedItem).where(IngestedItem.key.in_(keys)).values(at=datetime.now(UTC)),
                  execution_options={"synchronize_session": False})


def _record_applied(node: Node, peer: str, items: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """Remember what was applied (or refused for good), after the items' own transactions: a
    crash in between makes a resent item run again, which its idempotency absorbs."""
    done = [r for r in results if r["outcome"] in ("ok", "rejected")]
    if not done:
        return
    by_seq = {i["seq"]: i for i in items}
    keyed = [(_key(peer, by_seq[r["seq"]]), r) for r in done]
    with node.db.begin() as s:
        present = set(s.scalars(select(IngestedItem.key).where(IngestedItem.key.in_([k for k, _ in keyed]))))
        new = [(k, r) for k, r in keyed if k not in present]
        s.add_all([IngestedItem(key=k, adapter=f"peer:{peer}", outcome=r["outcome"]) for k, r in new])
        for _, r in new:  # a single request refused so is audited too (gateway.api.auth.Refusals)
            if r["outcome"] == "rejected" and r.get("type") in _SECURITY_REFUSALS:
                audit.append(s, actor=f"node:{peer}", action="federation.reject", obj=f"batch item {r['seq']}",
                             outcome=r["type"], detail={"reason": str(r.get("detail"))[:500]})


# -- building items (sender) --------------------------------------------------------------
def item_for(node: Node, job: Job, *, inline: bool = True) -> dict[str, Any] | None:
    """The batch item for one claimed outbox row (None: nothing left to send). Small bodies
    and attachments travel inside a forward item unless ``inline`` is off (a ferry file
    carries every blob itself)."""
    if job.kind == "forward":
        assert job.message_id is not None and job.payload is not None
        units = queued_units(node, job.message_id, job.target, job.payload["units"],
                             bool(job.payload.get("resend")))
        if not units:
            return None
        assert job.envelope_xml is not None and job.payload is not None
        env = _envelope(job.message_id, job.envelope_xml)
        link = node.config.peers[job.target].clearance if job.target in node.config.peers else None
        if link is not None and env.clearance_needed > CLASSIFICATION_LEVEL[link]:
            # checked when the message was accepted; the link's clearance was lowered since
            raise PermanentError(f"the link to node {job.target} is cleared up to {link} now; a {env.classification} "
                                 f"message no longer travels on it")
        item = {"seq": job.id, "kind": "forward", "message_id": job.message_id, "units": units,
                "hops": job.payload["hops"], "envelope": job.envelope_xml.decode("utf-8")}
        if inline:
            item["blobs"] = transfer.inline_blobs(node, env)
        return item
    if job.kind == "status":
        return {"seq": job.id, "kind": "status", **(job.payload or {})}
    if job.kind == "recall":
        assert job.recipient is not None
        return {"seq": job.id, "kind": "recall", "message_id": job.message_id, "units": [job.recipient.unit]}
    raise PermanentError(f"outbox kind {job.kind!r} does not travel in batches")


# -- applying items (receiver) ------------------------------------------------------------
def apply_items(node: Node, peer: str, items: Any) -> dict[str, Any]:
    """Apply a batch from ``peer`` in order. Answers one result per item it looked at:
    ``ok``, ``duplicate`` (applied before, or already here), ``rejected`` (will never be
    accepted, or was refused before: the sender dead-letters it) or ``retry`` (the batch
    stopped there)."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise transfer.TransferError(400, "validation", "items: expected a list of objects")
    seqs = [i.get("seq") for i in items]
    if not all(isinstance(q, int) for q in seqs) or seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        raise transfer.TransferError(400, "validation", "items: each needs an integer seq, strictly increasing")
    seen = _applied(node, peer, items)
    results: list[dict[str, Any]] = []
    pending: list[tuple[int, transfer.Incoming]] = []  # checked forwards, accepted together

    def flush() -> None:
        incoming = [inc for _, inc in pending]
        transfer.store_inline(node, incoming)
        for (seq, inc), acc in zip(pending, transfer.accept_many(node, incoming)):
            if isinstance(acc, transfer.TransferError):
                results.append({"seq": seq, "outcome": "rejected", "type": acc.kind, "detail": acc.detail})
                continue
            try:
                ans = transfer.answer(node, inc, acc)
                results.append({"seq": seq, "outcome": "ok", "created": acc.created,
                                "accepted_at": ans["accepted_at"]})
            except transfer.TransferError as exc:
                results.append({"seq": seq, "outcome": "rejected", "type": exc.kind, "detail": exc.detail})
        pending.clear()

    stopped = False
    for item in items:
        seq = item["seq"]
        if seq in seen:
            # an item refused when it first came (its answer lost) is refused again: a
            # "duplicate" would make the sender record it as handed over
            results.append({"seq": seq, "outcome": "rejected", "type": "refused-before",
                            "detail": "this item was refused when it first came (see this node's audit log)"}
                           if seen[seq] == "rejected" else {"seq": seq, "outcome": "duplicate"})
            continue
        try:
            if item.get("kind") == "forward":
                body = {k: v for k, v in item.items() if k not in ("seq", "kind")}
                pending.append((seq, transfer.prepare(node, peer, body)))
                if len(pending) >= ACCEPT_TOGETHER:
                    flush()
                continue
            flush()  # what came before this item is accepted before it is applied
            results.append({"seq": seq, "outcome": "ok", **_apply_one(node, peer, item)})
        except transfer.TransferError as exc:
            if exc.status >= 500 or exc.kind == "peer-unavailable":
                flush()
                results.append({"seq": seq, "outcome": "retry", "detail": exc.detail})
                stopped = True
                break
            flush()
            results.append({"seq": seq, "outcome": "rejected", "type": exc.kind, "detail": exc.detail})
    if not stopped:
        flush()
    results.sort(key=lambda r: r["seq"])
    _record_applied(node, peer, items, results)
    return {"node": node.id, "results": results}


def _apply_one(node: Node, peer: str, item: dict[str, Any]) -> dict[str, Any]:
    """A status or recall item (forwards are checked and accepted together by apply_items)."""
    kind = item.get("kind")
    body = {k: v for k, v in item.items() if k not in ("seq", "kind")}
    if kind == "status":
        return {"status": transfer.apply_statuses(node, peer, [body])["outcomes"]}
    if kind == "recall":
        transfer.recall(node, peer, body)
        return {}
    raise transfer.TransferError(400, "validation", f"item kind {kind!r}; expected forward, status or recall")


# -- recording what the receiver answered (sender) ------------------------------------------
def split(node: Node, jobs: list[Job]) -> tuple[list[tuple[Job, dict[str, Any]]], list[Job], list[Outcome]]:
    """The (job, item) pairs to send, in queue order (the receiver applies them in turn and
    refuses a batch whose seq does not increase), the jobs left with nothing to send, and
    the outcomes of those that may never be sent."""
    send, empty, refused = [], [], []
    for job in sorted(jobs, key=lambda j: j.id):
        try:
            item = item_for(node, job)
        except PermanentError as exc:
            refused.append(Outcome(job, error=exc))
            continue
        if item is None:
            empty.append(job)
        else:
            send.append((job, item))
    return send, empty, refused


def outcome_for(job: Job, r: dict[str, Any], units: list[str] | None = None) -> Outcome:
    """What one item's result from the receiver means for its outbox row."""
    kind = r.get("outcome")
    if kind in ("ok", "duplicate"):
        sent = units if units is not None else (job.payload or {}).get("units", [])
        return Outcome(job, extra={"units": sent, "answer": {"accepted_at": r.get("accepted_at")}})
    if kind == "rejected":
        return Outcome(job, error=PermanentError(f"node {job.target} refused it: {r.get('type')}: {r.get('detail')}"))
    return Outcome(job, error=RetryableError(f"node {job.target}: {r.get('detail') or 'asked to retry'}"))


def record_results(node: Node, worker: Worker, jobs: list[Job], results: list[dict[str, Any]]) -> dict[str, int]:
    by_seq = {r.get("seq"): r for r in results if isinstance(r, dict)}
    outcomes: list[Outcome] = []
    untouched: list[int] = []
    counts: dict[str, int] = {}
    for job in jobs:
        r = by_seq.get(job.id)
        if r is None:
            untouched.append(job.id)
            continue
        counts[str(r.get("outcome"))] = counts.get(str(r.get("outcome")), 0) + 1
        outcomes.append(outcome_for(job, r))
    worker.record(outcomes)
    worker.release(untouched)
    return counts


# -- the jobs -------------------------------------------------------------------------------
def release_orphans(node: Node, worker: Worker) -> None:
    """Rows an earlier run of this job (``worker``) left claimed, killed before it recorded
    them, go back to the queue at once (the job's lock means no other run is using them): the
    next batch starts with them, and no later row overtakes them (a 续报 before its 初报)
    while they wait for their lease to run out."""
    with node.db.begin() as s:
        s.execute(update(OutboxEntry).where(OutboxEntry.claimed_by == worker.id, OutboxEntry.state == "claimed")
                  .values(state="pending", claimed_by=None, lease_until=None),
                  execution_options={"synchronize_session": False})


_BATCH_PEERS = 'peer on a batch link (link = "batch")'


def batch_peers(node: Node) -> list[str]:
    return [name for name, p in node.config.peers.items() if p.link == "batch"]


def push(node: Node, peers: list[str] | None = None) -> dict[str, Any]:
    """Send every queued item to each batch peer, batch after batch, until none is left or
    the peer stops answering (the rest waits for the next run)."""
    out: dict[str, Any] = {}
    for peer in peers if peers is not None else require_peers(batch_peers(node), _BATCH_PEERS):
        worker = Worker(node, worker_id=f"push:{peer}:{node.id}")
        release_orphans(node, worker)
        sent: dict[str, int] = {}
        try:
            while True:
                jobs = worker.claim(BATCH_SIZE, target=peer)
                if not jobs:
                    break
                send, empty, refused = split(node, jobs)
                record_results(node, worker, empty, [{"seq": j.id, "outcome": "ok"} for j in empty])
                worker.record(refused)
                if not send:
                    continue
                items = [item for _, item in send]
                try:
                    answer = node.federation.client.post(peer, "/batch", {"items": items})
                except (RetryableError, PermanentError):
                    worker.release([j.id for j, _ in send])
                    raise
                counts = record_results(node, worker, [j for j, _ in send], answer.get("results", []))
                for k, v in counts.items():
                    sent[k] = sent.get(k, 0) + v
                if counts.get("retry") or len(answer.get("results", [])) < len(items):
                    break  # the peer stopped part-way: the rest waits for the next run
            out[peer] = sent
        except (RetryableError, PermanentError) as exc:
            out[peer] = {**sent, "error": str(exc)[:300]}
    failed = [p for p, v in out.items() if "error" in v]
    if failed and len(failed) == len(out):
        raise RetryableError(f"push: no batch peer answered ({'; '.join(out[p]['error'] for p in failed)})")
    return out


def serve_batch(node: Node, peer: str, limit: int) -> dict[str, Any]:
    """The items queued here for ``peer``, in queue order (the pull side). Items served
    before and not acknowledged are served again first: ``peer`` pulls one run at a time
    (its job's lock), so the run they were served to is over (it died, or lost the answer)."""
    if peer not in batch_peers(node):
        raise transfer.TransferError(409, "conflict", f"node {peer} is not a batch peer of node {node.id}")
    worker = Worker(node, worker_id=f"pull:{peer}:{node.id}")
    release_orphans(node, worker)
    send, empty, refused = split(node, worker.claim(min(limit, BATCH_SIZE), target=peer))
    # the rows stay claimed under a lease until acknowledged; unacknowledged ones return to
    # the queue when the lease runs out
    record_results(node, worker, empty, [{"seq": j.id, "outcome": "ok"} for j in empty])
    worker.record(refused)
    return {"node": node.id, "items": [item for _, item in send]}


def acknowledge(node: Node, peer: str, results: Any) -> dict[str, Any]:
    if not isinstance(results, list):
        raise transfer.TransferError(400, "validation", "results: expected a list")
    worker = Worker(node, worker_id=f"pull:{peer}:{node.id}")
    seqs = [r["seq"] for r in results if isinstance(r, dict) and isinstance(r.get("seq"), int)]
    with node.db.sessions() as s:
        ids = list(s.scalars(select(OutboxEntry.id).where(OutboxEntry.id.in_(seqs), OutboxEntry.target == peer,
                                                          OutboxEntry.state == "claimed")))
    # take the rows over from whichever pull claimed them, then record like the worker does
    with node.db.begin() as s:
        s.execute(update(OutboxEntry).where(OutboxEntry.id.in_(ids)).values(claimed_by=worker.id))
    jobs = _jobs(node, ids)
    counts = record_results(node, worker, jobs, results)
    return {"node": node.id, "outcomes": counts}


def _jobs(node: Node, ids: list[int]) -> list[Job]:
    if not ids:
        return []
    with node.db.sessions() as s:
        rows = s.execute(_CLAIMED_ROWS, {"ids": ids}).all()
    return jobs_from_rows(sorted(rows, key=lambda r: r.id))


def pull(node: Node, peers: list[str] | None = None) -> dict[str, Any]:
    """Fetch and apply what each batch peer has queued for this node."""
    out: dict[str, Any] = {}
    for peer in peers if peers is not None else require_peers(batch_peers(node), _BATCH_PEERS):
        got: dict[str, int] = {}
        try:
            while True:
                batch = node.federation.client.get_json(peer, f"/batch?limit={BATCH_SIZE}")
                items = batch.get("items", [])
                if not items:
                    break
                applied = apply_items(node, peer, items)
                results = applied["results"]
                node.federation.client.post(peer, "/batch/ack", {"results": results})
                for r in results:
                    got[r["outcome"]] = got.get(r["outcome"], 0) + 1
                if any(r["outcome"] == "retry" for r in results):
                    break
            out[peer] = got
        except (RetryableError, PermanentError, transfer.TransferError) as exc:
            out[peer] = {**got, "error": str(exc)[:300]}
    failed = [p for p, v in out.items() if "error" in v]
    if failed and len(failed) == len(out):
        raise RetryableError(f"pull: no batch peer answered ({'; '.join(out[p]['error'] for p in failed)})")
    return out
