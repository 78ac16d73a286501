"""Urgency under backlog: a 特急 document accepted behind a backlog of ordinary (平件)
documents must reach the SOAP peer within 2 s of being accepted.

1. The simulated document exchange service runs in its own process and answers every call
   after 20 ms (``DocExchangeState(response_delay=0.02)``).
2. The backlog (10,000 平件 documents, --quick 2,000) is queued into a fresh SQLite node
   IN-PROCESS with ``pipeline.accept`` (the API's own steps without HTTP, 200 per
   transaction): accepting 10,000 through HTTP would take minutes and measures nothing here.
3. Baseline: the bare peer call time, 20 sequential direct ``SoapAdapter.deliver`` calls
   (zeep) to the same peer before the worker starts.
4. The gateway API (gunicorn, config/gunicorn.conf.py) and ``gateway worker`` start; once
   the worker is delivering the backlog, 20 特急 documents (--quick 5) are POSTed to
   /api/v1/documents one at a time, SPACING seconds apart. Each one's latency is its
   arrival at the peer minus the moment its 202 (= committed) came back.
5. The backlog must still be queued when the last 特急 document is accepted, or the run
   does not show what it should (then it says so).

    .venv/bin/python bench/urgency.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

LIMIT = 2.0  # seconds from accept to delivered at the peer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backlog", type=int, help="平件 documents queued first (default 10000, --quick 2000)")
    ap.add_argument("--urgent", type=int, help="特急 documents (default 20, --quick 5)")
    ap.add_argument("--spacing", type=float, default=1.0, help="seconds between 特急 documents (default 1)")
    ap.add_argument("--threads", type=int, default=8, help="delivery worker threads (default 8)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers for the API (default 2)")
    ap.add_argument("--delay", type=float, default=0.02, help="peer response delay (default 0.02 s)")
    a = ap.parse_args()
    backlog = a.backlog or (2000 if a.quick else 10000)
    urgent = a.urgent or (5 if a.quick else 20)
    c.install_cleanup()

    tmp = c.tempdir("urgency")
    setup = c.SoapNode(tmp, delay=a.delay, worker_threads=a.threads)  # its document is a 平件
    peer, node, key, sha = setup.peer, setup.node, setup.key, setup.sha

    t0 = time.monotonic()
    c.accept_direct(node, [setup.doc] * backlog, key)
    c.log(f"backlog: {backlog} 平件 documents queued in-process in {time.monotonic() - t0:.1f} s")

    bare = setup.soap_direct(threads=1, count=20)
    c.log(f"bare peer call (SoapAdapter.deliver, sequential x20): p50 {bare['p50'] * 1000:.1f} ms, "
          f"p99 {bare['p99'] * 1000:.1f} ms")
    before = peer.stats()["documents"]

    api = c.gateway_gunicorn(setup.conf, workers=a.workers, threads=8, logdir=tmp)
    worker = setup.start_worker()
    api.wait_ready()
    c.wait_for(lambda: peer.stats()["documents"] - before >= 50, 120, "the worker to start delivering the backlog")

    import requests

    from adapters.base import remote_ref

    s = requests.Session()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    sent: list[tuple[str, float, int]] = []  # (doc_id at the peer, accepted at, backlog left)
    for i in range(urgent):
        left = backlog - (peer.stats()["documents"] - before)
        doc = c.document(sha, urgency="特急", title=f"关于立即做好第{i + 1}号突发事件应急处置工作的紧急通知")
        r = s.post(api.url + "/api/v1/documents", data=json.dumps(doc, ensure_ascii=False).encode(),
                   headers=headers, timeout=60)
        t_acc = time.monotonic()
        if r.status_code != 202:
            raise RuntimeError(f"特急 document {i + 1}: HTTP {r.status_code} {r.text[:300]}")
        sent.append((remote_ref(r.json()["id"], c.COUNTY_A), t_acc, left))
        time.sleep(a.spacing)
    ids = [x[0] for x in sent]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(peer.times(ids)) < len(ids):
        time.sleep(0.2)
    arrivals = peer.times(ids)
    left_at_end = backlog - (peer.stats()["documents"] - before - len(arrivals))
    s.close()
    c.stop(worker)
    api.stop()
    node.close()
    peer.stop()

    lat = [arrivals[d] - t if d in arrivals else float("inf") for d, t, _ in sent]
    for (d, _, left), x in zip(sent, lat):
        c.log(f"特急 {d[:8]}: {x * 1000:.0f} ms (backlog left ~{left})")
    p50, p99, mx = c.percentile(lat, 50), c.percentile(lat, 99), max(lat)
    bare_p50 = bare["p50"]
    min_left = min(x[2] for x in sent)
    valid = left_at_end > 0
    ok = mx <= LIMIT and valid
    note = "" if valid else "; BACKLOG RAN OUT before the last 特急 arrived: not a valid run, raise --backlog"
    print(f"urgency: 特急 accept->delivered p50 {p50:.3f} s, p99 {p99:.3f} s, max {mx:.3f} s (n={urgent}); "
          f"bare peer call p50 {bare_p50:.3f} s (p50/bare {p50 / bare_p50:.1f}x, p99/bare {p99 / bare_p50:.1f}x); "
          f"target every one <= {LIMIT:g} s {c.verdict(ok)} [backlog {backlog} 平件 queued in-process via "
          f"pipeline.accept, >= {min(min_left, left_at_end)} still queued throughout; peer delay "
          f"{a.delay * 1000:g} ms, worker {a.threads} threads]{note}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    c.run(main)
