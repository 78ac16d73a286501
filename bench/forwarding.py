"""Forwarding rate: documents per second from a county node's accept to their delivery by
the prefecture node, against the prefecture's own accept-to-delivery rate, measured in the
same run. Target: forwarding / single node >= 0.6.

Nodes: ``adapters.simulators.cluster.Cluster`` (separate ``gateway serve`` processes: API,
delivery worker and collector in one gunicorn gthread worker each, 8 threads; SQLite; each
node with its own simulated SOAP document exchange service, running in this process). Only
the prefecture and county-a are started (county-b would only add idle polling). Auto-signing
is off: no sign-for receipts travel, so only accept -> (forward ->) deliver is measured.

0. Warm-up, untimed: one document to each node, one at a time (schemas, WSDL, connections).
1. Baseline (single node): N documents (1 recipient: 州应急管理局 EMERGENCY, a unit of the
   prefecture, routed to its SOAP adapter) POSTed to the prefecture's API by THREADS client
   threads (one ``requests.Session`` each). Rate = N / (arrival of the last of them at the
   prefecture's SOAP simulator - the first POST).
2. Forwarding: N documents for the same unit POSTed to county-a's API (sender 甲县人民政府办公室)
   with the same threads; county-a's worker forwards each to the prefecture
   (``/federation/v1/messages``, signed), which fetches the body from county-a, accepts it,
   and its worker delivers it to its SOAP simulator. Same rate, same clock.
3. (full mode) the baseline again; the single-node rate is the mean of both baseline runs.

Every document has its own small body (``--body-kb``, default 2 KB), uploaded to the node
before the clock starts, so the prefecture fetches one body per forwarded document, as it
would in service (``--shared-body``: one body for all, fetched once). The prefecture also
reports each delivery back to county-a (a ``status`` row, one signed POST each) while the
forwarding phase runs: that is part of forwarding's cost.

    .venv/bin/python bench/forwarding.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from adapters.simulators.soap_service import DocExchangeState  # noqa: E402

TARGET = 0.6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, help="documents per phase (default 1500, --quick 300)")
    ap.add_argument("--clients", type=int, default=8, help="client threads, both phases (default 8)")
    ap.add_argument("--body-kb", type=int, default=2, help="body size in KB (default 2)")
    ap.add_argument("--shared-body", action="store_true", help="one body for every document of a phase")
    ap.add_argument("--worker-threads", type=int, default=8, help="delivery worker threads of each node (default 8)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (node logs and databases)")
    a = ap.parse_args()
    n = a.count or (300 if a.quick else 1500)
    c.install_cleanup()

    from adapters.simulators.cluster import COUNTY_A, EMERGENCY, PREFECTURE, Cluster
    from adapters.simulators.soap_service import SoapServiceServer
    from adapters.base import remote_ref

    tmp = c.tempdir("forwarding")
    if a.keep:
        c.keep_dir(tmp)
        c.log(f"keeping {tmp}")
    overrides = {nid: {"worker": {"threads": a.worker_threads, "poll_interval": 0.3, "idle_sleep": 0.05,
                                  "lease_seconds": 30,
                                  "retry": {"max_attempts": 50, "base_delay": 0.2, "max_delay": 2.0}}}
                 for nid in ("prefecture", "county-a", "county-b")}
    cluster = Cluster(tmp, overrides=overrides, echo=c.log).plan()
    # The simulators: auto-signing off, and the arrival time of each document on CLOCK_MONOTONIC.
    states = {}
    for node_id, node in cluster.nodes.items():
        states[node_id] = DocExchangeState()  # no auto-signing; first arrivals timed
        node.soap = SoapServiceServer(states[node_id])
    c.on_cleanup(lambda: _close(cluster))
    pref, county = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    t0 = time.monotonic()
    for node in (pref, county):
        node.soap.start()
        node.config_path.write_text(_toml(cluster, node), encoding="utf-8")
        node.cli("db", "upgrade")
        node.api_key = node.cli("keys", "create", "--name", f"{node.id} 基准测试", "--scope", "*",
                                "--clearance", "绝密").stdout.strip()
    for node in (pref, county):
        cluster.start_node(node.id, wait=False)
    for node in (pref, county):
        cluster.wait_ready(node.id, 90)
    c.log(f"prefecture and county-a up in {time.monotonic() - t0:.1f} s (SQLite, gateway serve, 8 threads; "
          f"county-b not started)")

    def phase(name: str, node: Any, sender: str, salt: str, n: int = n, clients: int = a.clients) -> dict[str, Any]:
        shas = _upload_bodies(node, 1 if a.shared_body else n, a.body_kb * 1024, salt)
        docs = [json.dumps(_doc(sender, shas[i % len(shas)], f"{name} {i + 1}"), ensure_ascii=False).encode()
                for i in range(n)]
        state = states["prefecture"]
        cpu0 = _cpu(cluster, (pref, county))
        res = _send(node, docs, clients)
        if res["errors"]:
            raise RuntimeError(f"{name}: a POST to {node.id} failed ({len(res['ids'])} accepted before), e.g. "
                               f"{res['errors'][:3]}; see {node.root / 'node.log'} (--keep keeps it)")
        refs = [remote_ref(mid, EMERGENCY) for mid in res["ids"]]
        deadline = time.monotonic() + max(120.0, n / 5)
        while time.monotonic() < deadline:
            if len(state.arrived(refs)) == n:
                break
            for p in (pref, county):
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"node {p.id} exited; see its log: "
                                       f"{(p.root / 'node.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        times = state.arrived(refs)
        if len(times) < n:
            raise RuntimeError(f"{name}: only {len(times)}/{n} documents reached the prefecture's SOAP "
                               f"simulator in time")
        last = max(times.values())
        cpu1 = _cpu(cluster, (pref, county))
        rate = n / (last - res["first"])
        out = {"rate": rate, "wall": last - res["first"], "accept_rate": n / (res["last"] - res["first"]),
               "lag": last - res["last"]}
        out["cpu_ms"] = {k: (cpu1[k] - cpu0[k]) / n * 1000 for k in cpu0}
        busy = sum(cpu1[k] - cpu0[k] for k in cpu0) / out["wall"]
        c.log(f"{name}: {n} docs, {rate:.1f}/s first POST -> last delivered ({out['wall']:.1f} s); "
              f"accepting took {res['last'] - res['first']:.1f} s ({out['accept_rate']:.1f}/s), "
              f"last delivery {out['lag']:.2f} s after the last 202; CPU per document (ms) "
              + ", ".join(f"{k} {v:.1f}" for k, v in out["cpu_ms"].items())
              + f" (until the last delivery; {busy:.2f} cores busy on average)")
        return out

    # Warm-up, one document at a time, not timed: each node's first request loads the XML
    # schemas, its first delivery the WSDL (and a fresh node that gets 8 concurrent first
    # requests can break: concurrent first construction of the lxml schemas, see README).
    phase("warm-up (prefecture)", pref, PREFECTURE, "warm1", n=1, clients=1)
    phase("warm-up (county-a -> prefecture)", county, COUNTY_A, "warm2", n=1, clients=1)
    _settle(pref)
    base = [phase("single node", pref, PREFECTURE, "base1")]
    _settle(pref)
    fwd = phase("forwarding", county, COUNTY_A, "fwd")
    # the status reports flow back to county-a after the deliveries; let them finish before
    # the second baseline, which they would otherwise slow down
    _settle(pref)
    if not a.quick:
        base.append(phase("single node (again)", pref, PREFECTURE, "base2"))

    base_rate = statistics.mean(b["rate"] for b in base)
    ratio = fwd["rate"] / base_rate if base_rate else 0.0
    ok = ratio >= TARGET
    print(f"forwarding: county->prefecture {fwd['rate']:.1f} msg/s, single node {base_rate:.1f} msg/s, "
          f"ratio {ratio:.2f} (target >= {TARGET}) {c.verdict(ok)} [{n} docs per phase, {a.clients} client "
          f"threads, {'one shared' if a.shared_body else 'one'} {a.body_kb} KB body"
          f"{'' if a.shared_body else ' per doc'}; first POST -> last arrival at the prefecture's SOAP "
          f"simulator; SQLite, gateway serve x2 (8 threads); accept rates: county {fwd['accept_rate']:.0f}/s, "
          f"prefecture {statistics.mean(b['accept_rate'] for b in base):.0f}/s; "
          f"single node = {'mean of 2 runs' if len(base) > 1 else '1 run'}]", flush=True)
    sys.exit(0 if ok else 1)


def _cpu(cluster: Any, nodes: Any) -> dict[str, float]:
    """CPU seconds so far of each node's processes (the ``gateway serve`` master and its
    gunicorn worker) and of this process (client threads and the SOAP simulators)."""
    out = {node.id: c.cpu_seconds(node.proc.pid) if node.proc else 0.0 for node in nodes}
    t = os.times()
    out["bench"] = t.user + t.system
    return out


def _close(cluster: Any) -> None:
    """Stop the nodes one after the other (``Cluster.close`` uses a thread pool, which can no
    longer start threads once the interpreter is exiting, and then leaves the nodes running)."""
    for node_id, node in cluster.nodes.items():
        try:
            cluster.stop_node(node_id)
        except Exception as exc:  # noqa: BLE001 - stop the others anyway
            c.log(f"stopping node {node_id} failed: {exc}")
        node.soap.stop()
        node.soap.state.close()


def _toml(cluster: Any, node: Any) -> str:
    from adapters.simulators.cluster import to_toml

    return to_toml(cluster.config_for(node))


def _upload_bodies(node: Any, count: int, size: int, salt: str) -> list[str]:
    """``count`` distinct bodies of ``size`` bytes uploaded to ``node`` (4 threads)."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def one(i: int) -> str:
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = node.session()
        r = s.post(f"{node.url}/api/v1/blobs", data=c.body_bytes(size, f"{salt}:{i}"),
                   headers={"Content-Type": "application/octet-stream"}, timeout=60)
        if r.status_code != 201:
            raise RuntimeError(f"blob upload answered {r.status_code}: {r.text[:300]}")
        return str(r.json()["sha256"])

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        shas = list(pool.map(one, range(count)))
    c.log(f"uploaded {count} bodies of {size} B to {node.id} in {time.monotonic() - t0:.1f} s")
    return shas


def _doc(sender: str, sha: str, title: str) -> dict[str, Any]:
    from adapters.simulators.cluster import EMERGENCY

    return {"sender_unit": sender, "issuer": "测试机关", "doc_type": "通知", "doc_number": "州政办发〔2026〕41号",
            "title": title, "written_date": "2026-11-26", "recipients": [{"unit": EMERGENCY}],
            "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}}


def _send(node: Any, docs: list[bytes], threads: int) -> dict[str, Any]:
    """POST ``docs`` to ``node`` from ``threads`` threads (one Session each, keep-alive), as
    fast as they are answered. Returns the message ids, the first POST's start and the last
    202's time (monotonic), and the failures: the first failure stops every thread (the
    phase has failed anyway; a node that stopped answering must not hold the run for
    len(docs) x the request timeout)."""
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    it = iter(range(len(docs)))
    barrier = threading.Barrier(threads + 1)
    stamp = {"last": 0.0}
    failed = threading.Event()

    def client() -> None:
        s = node.session()
        s.headers["Content-Type"] = "application/json"
        barrier.wait()
        while not failed.is_set():
            with lock:
                i = next(it, None)
            if i is None:
                break
            try:
                r = s.post(f"{node.url}/api/v1/documents", data=docs[i], timeout=60)
                ok, text = r.status_code == 202, r.text
            except Exception as exc:  # noqa: BLE001
                ok, text = False, f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            with lock:
                if ok:
                    ids.append(json.loads(text)["id"])
                    stamp["last"] = max(stamp["last"], now)
                else:
                    errors.append(text[:300])
                    failed.set()
        s.close()

    ths = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for th in ths:
        th.start()
    first = time.monotonic()
    barrier.wait()
    for th in ths:
        th.join()
    return {"ids": ids, "errors": errors, "first": first, "last": stamp["last"]}


def _settle(node: Any, timeout: float = 120.0) -> None:
    """Wait until nothing is pending in ``node``'s outbox (status reports included)."""
    from sqlalchemy import create_engine, func, select

    from gateway.models import OutboxEntry

    engine = create_engine(node.database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                left = conn.scalar(select(func.count()).select_from(OutboxEntry)
                                   .where(OutboxEntry.state.in_(("pending", "claimed"))))
            if not left:
                return
            time.sleep(0.2)
        c.log(f"{node.id}: outbox still has {left} rows after {timeout:g} s; going on")
    finally:
        engine.dispose()


if __name__ == "__main__":
    c.run(main)
