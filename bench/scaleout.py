"""Scale-out: delivery rate of two ``gateway worker`` processes sharing one PostgreSQL
against one, when the legacy peer is the bottleneck (it answers after a fixed delay).
Target: two workers / one worker >= 1.7.

1. A private PostgreSQL cluster (``_common.PgCluster``: fsync and synchronous_commit on) and
   the simulated SOAP document exchange service in its own process, answering every call
   after ``--delay`` (default 100 ms). With ``--threads`` (default 8, as in
   config/prefecture.toml) delivery threads a worker can do at most threads / delay calls a
   second (80/s): a peer-bound worker, not a CPU-bound one. The run prints the cores each
   process and the whole machine used. Why 100 ms and not less: a worker spends ~4-5 ms of
   CPU per SOAP delivery (zeep, XPath argument mapping, a new TCP connection per call to
   the simulator, recording); at 50 ms two workers at their ceiling need about one core
   between them, next to the peer and PostgreSQL, so on a 2-core machine the two-worker
   round runs into the CPU as soon as anything else runs (measured: ratio 1.58-1.86 at 50 ms
   depending on the machine's other load, 1.94-2.00 at 100 ms).
2. Per round, a fresh database on that cluster and a fresh data dir: ``db upgrade``, an API
   key, a 2 KB body blob, then M documents (1 recipient each; --count, default 3000, --quick
   1000) accepted IN-PROCESS (``pipeline.accept``, the API's own steps without HTTP, 200 per
   transaction) while no worker runs.
3. Then K ``gateway --config X worker`` processes start together and deliver the queue.
   Rate = (M - 1) / (arrival of the last document at the peer - arrival of the first), as in
   soap_e2e, so process start-up and WSDL loading count for no one.
4. Rounds: 1 worker, 2 workers, and (full mode) 1 worker again; the one-worker rate is the
   mean of its rounds.

The run also checks that each document reached the peer exactly once (one SendDocument call
per doc_id) and that both workers of the two-worker round delivered a share (audit actors).

    .venv/bin/python bench/scaleout.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

TARGET = 1.7


def run_round(pg: c.PgCluster, peer: c.Peer, *, workers: int, count: int, threads: int, label: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from adapters.base import remote_ref
    from gateway.models import AuditEntry

    tmp = c.tempdir(f"scaleout-{label}")
    db_url = pg.create_database(f"scaleout_{label}_{uuid.uuid4().hex[:6]}")
    raw = c.node_config(tmp / "var", db_url, peer_url=peer.url, worker_threads=threads, peer_timeout=30)
    raw["worker"]["idle_sleep"] = 0.05
    conf = c.write_node_config(tmp / "node.toml", raw)
    node, key = c.prepare_node(conf)
    sha = c.store_blob(node, c.body_bytes(2048, "scaleout"), key)
    doc = json.dumps(c.document(sha), ensure_ascii=False).encode()
    t0 = time.monotonic()
    ids = c.accept_direct(node, [doc] * count, key)
    c.log(f"[{label}] {count} documents queued in-process on PostgreSQL in {time.monotonic() - t0:.1f} s")
    refs = [remote_ref(i, c.COUNTY_A) for i in ids]
    before = peer.stats()

    procs = [c.spawn([str(c.VENV_BIN / "gateway"), "--config", str(conf), "worker"],
                     log_file=tmp / f"worker{i}.log", env={"PYTHONUNBUFFERED": "1"}) for i in range(workers)]
    cpu0 = {p.pid: c.cpu_seconds(p.pid) for p in procs}
    others0 = {"peer": c.cpu_seconds(peer.proc.pid), "postgres": c.cpu_seconds(pg.pid())}
    m0 = c.machine_busy()
    t_start = time.monotonic()
    deadline = t_start + max(180.0, count / 5)
    while True:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise RuntimeError(f"worker {i} exited: {(tmp / f'worker{i}.log').read_text(errors='replace')[-2000:]}")
        st = peer.stats()
        if st["documents"] - before["documents"] >= count and c.outbox_pending(node) == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"[{label}] only {st['documents'] - before['documents']}/{count} documents at the "
                               f"peer after {deadline - t_start:.0f} s")
        time.sleep(0.2)
    wall = time.monotonic() - t_start
    cpu = {p.pid: c.cpu_seconds(p.pid) - cpu0[p.pid] for p in procs}
    others = {"peer": c.cpu_seconds(peer.proc.pid) - others0["peer"],
              "postgres": c.cpu_seconds(pg.pid()) - others0["postgres"]}
    m1 = c.machine_busy()
    for p in procs:
        c.stop(p)
    after = peer.stats()

    times = peer.times(refs)
    if len(times) != count:
        raise RuntimeError(f"[{label}] {len(times)}/{count} of this round's documents at the peer")
    span = max(times.values()) - min(times.values())
    rate = (count - 1) / span
    sends = after["send_calls"] - before["send_calls"]
    with node.db.sessions() as s:
        by_worker = dict(s.execute(select(AuditEntry.actor, func.count()).where(
            AuditEntry.action == "delivery.attempt", AuditEntry.outcome == "delivered")
            .group_by(AuditEntry.actor)).all())
    node.close()
    shares = sorted((n / count for n in by_worker.values()), reverse=True)
    # CPU over the workers' whole run (start-up included), as cores busy on average
    cores = {**{f"worker{i}": v / wall for i, v in enumerate(cpu.values())},
             **{k: v / wall for k, v in others.items()}}
    busy = (m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1)
    c.log(f"[{label}] {workers} worker(s) x {threads} threads: {rate:.1f}/s at the peer (first->last arrival "
          f"{span:.1f} s; {wall:.1f} s wall from process start), SendDocument calls {sends} for {count} documents, "
          f"shares {[f'{x:.0%}' for x in shares]}; cores busy: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
          + f", whole machine {busy:.2f} of {os.cpu_count()}; worker CPU per delivery "
          f"{sum(cpu.values()) / count * 1000:.1f} ms")
    return {"rate": rate, "sends": sends, "shares": shares, "workers": len(by_worker), "machine": busy,
            "worker_ms": sum(cpu.values()) / count * 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, help="documents per round (default 3000, --quick 1000)")
    ap.add_argument("--threads", type=int, default=8, help="delivery threads per worker process (default 8)")
    ap.add_argument("--delay", type=float, default=0.1, help="peer answer delay in seconds (default 0.1)")
    a = ap.parse_args()
    m = a.count or (1000 if a.quick else 3000)
    c.install_cleanup()

    pg = c.PgCluster()
    pg.start()
    c.log(f"PostgreSQL on port {pg.port} (fsync on)")
    peer = c.Peer(delay=a.delay, logdir=c.tempdir("scaleout-peer"))
    c.log(f"SOAP peer (answer delay {a.delay * 1000:g} ms) on {peer.url}; a worker's ceiling is "
          f"{a.threads} threads / {a.delay * 1000:g} ms = {a.threads / a.delay:.0f}/s")

    plan = [(1, "1w"), (2, "2w")] + ([] if a.quick else [(1, "1w-again")])
    res = {label: run_round(pg, peer, workers=k, count=m, threads=a.threads, label=label) for k, label in plan}
    peer.stop()

    one = statistics.mean(r["rate"] for label, r in res.items() if label.startswith("1w"))
    two = res["2w"]["rate"]
    ratio = two / one if one else 0.0
    exactly_once = all(r["sends"] == m for r in res.values())
    both = res["2w"]["workers"] == 2 and min(res["2w"]["shares"]) >= 0.25
    ok = ratio >= TARGET and exactly_once and both
    problems = ([] if exactly_once else ["a document was sent more than once"]) + (
        [] if both else [f"the two workers' shares were {res['2w']['shares']}"])
    ceiling = a.threads / a.delay
    print(f"scaleout: 2 workers {two:.1f}/s, 1 worker {one:.1f}/s, ratio {ratio:.2f} (target >= {TARGET}) "
          f"{c.verdict(ok)} [peer delay {a.delay * 1000:g} ms, {a.threads} threads per worker (ceiling "
          f"{ceiling:.0f}/s per worker), M={m} queued in-process via pipeline.accept, PostgreSQL (fsync on), "
          f"fresh database per round, 1 worker = {'mean of 2 rounds' if not a.quick else '1 round'}, rates "
          f"first->last arrival at the peer; machine busy {res['1w']['machine']:.1f}/{res['2w']['machine']:.1f} "
          f"of {os.cpu_count()} cores (1w/2w); 2-worker shares "
          f"{'/'.join(f'{x:.0%}' for x in res['2w']['shares'])}; SendDocument calls = documents in every "
          f"round: {'yes' if exactly_once else 'NO'}"
          f"{'; ' + '; '.join(problems) if problems else ''}]", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    c.run(main)
