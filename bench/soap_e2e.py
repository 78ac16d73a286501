"""End-to-end SOAP delivery rate: documents per second from the outbox to the SOAP peer
through the delivery worker (``gateway --config X worker``), versus direct calls of
``adapters.soap.SoapAdapter.deliver`` (zeep) to the same peer with the same number of
threads (the worker's ``threads``). Target: gateway / direct >= 0.8.

1. The simulated document exchange service runs in its own process (response delay
   ``--delay``, default 0: the peer answers as fast as it can).
2. N documents (1 recipient, 16 KB body; --count, default 3000, --quick 200) are accepted
   into a fresh SQLite node IN-PROCESS (``pipeline.accept``, the API's own steps without
   HTTP, 200 per transaction) while nothing delivers.
3. Baseline: N direct ``SoapAdapter.deliver`` calls, THREADS threads, zeep warmed up.
4. Gateway: ``gateway worker`` is started; it delivers the N queued documents.
5. (full mode) the baseline once more; its rate is the mean of both baseline runs.

Both rates are measured the same way, at the peer: (N - 1) / (arrival of the last
document - arrival of the first), so process start-up and WSDL loading count for neither.
3000 documents (about 6 s at the peer) rather than 1000: the worker's first deliveries
(new connections, first claims) are not warmed up the way the baseline is, and in a 2 s
window they moved the ratio by several hundredths from run to run.
The worker's wall time from process start is printed for information.

    .venv/bin/python bench/soap_e2e.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

TARGET = 0.8


def peer_rate(peer: c.Peer, doc_ids: list[str]) -> tuple[float, int]:
    t = peer.times(doc_ids)
    if len(t) < 2:
        return 0.0, len(t)
    return (len(t) - 1) / (max(t.values()) - min(t.values())), len(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, help="documents (default 3000, --quick 200)")
    ap.add_argument("--threads", type=int, default=8, help="worker threads = baseline threads (default 8)")
    ap.add_argument("--delay", type=float, default=0.0, help="peer response delay in seconds (default 0)")
    a = ap.parse_args()
    n = a.count or (200 if a.quick else 3000)
    c.install_cleanup()

    tmp = c.tempdir("soap-e2e")
    setup = c.SoapNode(tmp, delay=a.delay, worker_threads=a.threads)
    peer, node = setup.peer, setup.node

    t0 = time.monotonic()
    ids = c.accept_direct(node, [setup.doc] * n, setup.key)
    c.log(f"accepted {n} documents in-process in {time.monotonic() - t0:.1f} s")
    from adapters.base import remote_ref

    gw_doc_ids = [remote_ref(i, c.COUNTY_A) for i in ids]

    baselines = []

    def baseline() -> None:
        res = setup.soap_direct(threads=a.threads, count=n)
        rate, got = peer_rate(peer, res["doc_ids"])
        c.log(f"direct SoapAdapter.deliver x{n}, {a.threads} threads: {rate:.1f}/s at the peer "
              f"(client side {res['rate']:.1f}/s, call p50 {res['p50'] * 1000:.1f} ms, client CPU "
              f"{res['cpu_seconds'] / n * 1000:.2f} ms a call)")
        baselines.append(rate)

    baseline()

    t_start = time.monotonic()
    worker = setup.start_worker()
    deadline = t_start + max(120.0, n / 5)
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited: {(tmp / 'worker.log').read_text(errors='replace')[-2000:]}")
        if len(peer.times(gw_doc_ids[-1:] + gw_doc_ids[:1])) == 2 and c.outbox_pending(node) == 0:
            break
        time.sleep(0.2)
    wall = time.monotonic() - t_start
    pending = c.outbox_pending(node)
    c.stop(worker)
    gw_rate, got = peer_rate(peer, gw_doc_ids)
    c.log(f"gateway worker: {got}/{n} at the peer, {gw_rate:.1f}/s at the peer; {wall:.1f} s wall from "
          f"process start ({n / wall:.1f}/s incl. start-up); outbox still pending: {pending}")
    if not a.quick:
        baseline()
    node.close()
    peer.stop()

    base = statistics.mean(baselines)
    ratio = gw_rate / base if base else 0.0
    ok = ratio >= TARGET and got == n and pending == 0
    print(f"soap_e2e: gateway worker {gw_rate:.1f} docs/s, direct zeep (SoapAdapter.deliver) {base:.1f} docs/s, "
          f"ratio {ratio:.2f} (target >= {TARGET}) {c.verdict(ok)} [{n} docs queued in-process via "
          f"pipeline.accept, {a.threads} threads each, SQLite, peer delay {a.delay * 1000:g} ms, "
          f"rates first->last arrival at the peer]", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    c.run(main)
