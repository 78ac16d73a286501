"""Documents accepted per second through POST /api/v1/documents (202) versus a bare Flask
endpoint that only parses the same JSON, both under config/gunicorn.conf.py with the same
worker count and threads. Target: gateway / bare >= 0.5.

Each document is ~20 KB of JSON (UTF-8) with one recipient; see _common.padded_document.
The gateway node: SQLite (the embedded default's style: a file in the data dir, WAL,
synchronous=FULL), a default route to a SOAP adapter, NO delivery worker running (only the
gunicorn app), so only the cost of accepting is measured. With PostgreSQL available the same
node on a private PostgreSQL cluster is measured too (--no-postgres skips it).

Each backend is measured in a phase of its own: rounds alternate bare / gateway(sqlite),
then (PostgreSQL started only now) bare / gateway(postgresql), so machine noise hits both
sides of a ratio alike and one backend's background work (PostgreSQL's autovacuum and
checkpoints, dirty pages still being written back) never lands in the other's rounds.
Each rate is the mean over its phase's rounds; each ratio is gateway mean / bare mean of
the same phase. The line also gives the CPU milliseconds per request of the server's workers,
PostgreSQL and the load generator, which shares the two cores (see bench/README.md).

    .venv/bin/python bench/accept_rate.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

TARGET = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round (< 60 s)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers, both servers (default 2 = cores)")
    ap.add_argument("--threads", type=int, default=8, help="gthread threads per worker (default 8, as the conf)")
    ap.add_argument("--clients", type=int, default=8, help="load generator threads = connections (default 8)")
    ap.add_argument("--duration", type=float, help="seconds measured per target and round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--no-postgres", action="store_true")
    a = ap.parse_args()
    duration = a.duration or (4.0 if a.quick else 10.0)
    rounds = a.rounds or (1 if a.quick else 3)
    warmup = 1.0 if a.quick else 2.0
    c.install_cleanup()

    tmp = c.tempdir("accept")
    backends = ["sqlite"] if a.no_postgres else ["sqlite", "postgresql"]
    bare = c.bare_gunicorn(workers=a.workers, threads=a.threads, logdir=tmp)
    bare.wait_ready()
    # the same blobs on every gateway node -> the same SHA-256s -> byte-identical documents
    body = c.body_bytes(64 * 1024, "body")
    atts = [c.body_bytes(2048, f"att{i}") for i in range(99)]
    doc_file = tmp / "doc.json"
    parts = []
    ok_all = True
    for backend in backends:
        pg = None
        if backend == "sqlite":
            url = f"sqlite:///{tmp / 'sqlite' / 'var' / 'gateway.db'}"
        else:
            try:
                pg = c.PgCluster()
                url = pg.start()
            except Exception as exc:  # noqa: BLE001
                c.log(f"PostgreSQL not available ({exc}); measuring SQLite only")
                break
        d = tmp / backend
        d.mkdir(exist_ok=True)
        conf = c.write_node_config(d / "node.toml", c.node_config(d / "var", url))
        node, key = c.prepare_node(conf)
        node.close()
        name = f"gateway({backend})"
        g = c.gateway_gunicorn(conf, workers=a.workers, threads=a.threads, logdir=tmp, name=f"gateway-{backend}")
        g.wait_ready()
        body_sha = c.upload_blob(g.url, key, body)
        att_shas = [c.upload_blob(g.url, key, x) for x in atts]
        doc_bytes = c.padded_document(body_sha, att_shas)
        doc_file.write_bytes(doc_bytes)
        n_atts = len(json.loads(doc_bytes)["attachments"])
        c.log(f"{name}: document of {len(doc_bytes)} bytes of JSON, 1 recipient, note 2000 chars, "
              f"{n_atts} attachments")

        order = [("bare flask", bare, None), (name, g, key)]
        results: dict[str, list[dict]] = {n: [] for n, _, _ in order}
        for _n, srv, k in order:  # short warm-up: imports, pools, SQLite/PG caches
            c.run_loadgen(srv.url + "/api/v1/documents", [doc_file], key=k, threads=a.clients, duration=1.0)
        pg_pid = pg.pid() if pg is not None else None
        for r in range(rounds):
            for n, srv, k in order:
                # CPU per request of each party (warm-up included): the server's workers, the
                # database server (gateway rounds on PostgreSQL), the load generator
                watched = (srv.proc.pid, pg_pid if k else None)
                cpu0 = [c.cpu_seconds(p) if p else 0.0 for p in watched]
                res = c.run_loadgen(srv.url + "/api/v1/documents", [doc_file], key=k, threads=a.clients,
                                    duration=duration, warmup=warmup)
                sent = max(1, res["requests"])
                cpu1 = [c.cpu_seconds(p) if p else 0.0 for p in watched]
                res["server_ms"], res["db_ms"] = ((b - a) / sent * 1000 for a, b in zip(cpu0, cpu1))
                res["client_ms"] = res["cpu_seconds"] / sent * 1000
                if res["errors"]:
                    c.log(f"{n}: {res['errors']} errors, e.g. {res['first_errors']}")
                lat = res["latency"][0]
                c.log(f"{backend} round {r + 1}/{rounds} {n}: {res['rate']:.1f}/s  p50 {lat['p50'] * 1000:.1f} ms  "
                      f"p99 {lat['p99'] * 1000:.1f} ms  errors {res['errors']}  CPU ms a request: server "
                      f"{res['server_ms']:.2f}" + (f" + PostgreSQL {res['db_ms']:.2f}" if watched[1] else "")
                      + f", load generator {res['client_ms']:.2f} "
                      f"({res['cpu_seconds'] / res['wall'] * 100:.0f}% of a core)")
                results[n].append(res)
        g.stop()
        if pg is not None:
            pg.stop()

        base = statistics.mean(x["rate"] for x in results["bare flask"])
        rate = statistics.mean(x["rate"] for x in results[name])
        ratio = rate / base if base else 0.0
        ok = ratio >= TARGET and not any(x["errors"] for x in results[name])
        ok_all &= ok
        # each round's gateway rate over the bare rate just before it: how far the machine's
        # changing speed moves a single pair
        per_round = "/".join(f"{gw['rate'] / b['rate']:.2f}" for b, gw in zip(results["bare flask"], results[name]))
        # where the machine's time went, per request: the bare side's client is a large share
        # of it, which is why the ratio would be lower with a client on another machine
        ms = {(side, k): statistics.mean(x[k] for x in results[side])
              for side in results for k in ("server_ms", "db_ms", "client_ms")}
        cpu = (f"CPU ms a request: gateway {ms[name, 'server_ms']:.2f}"
               + (f" + PostgreSQL {ms[name, 'db_ms']:.2f}" if pg else "")
               + f" + client {ms[name, 'client_ms']:.2f}, bare {ms['bare flask', 'server_ms']:.2f}"
               f" + client {ms['bare flask', 'client_ms']:.2f}")
        parts.append(f"{name} {rate:.1f}/s, bare flask {base:.1f}/s, ratio {ratio:.2f} "
                     f"(rounds {per_round}; {cpu}; target >= {TARGET}) {c.verdict(ok)}")
    print(f"accept_rate: {'; '.join(parts)} [{doc_file.stat().st_size} B JSON, gunicorn {a.workers}x{a.threads} gthread, "
          f"{a.clients} client threads, {rounds}x{duration:g}s]", flush=True)
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    c.run(main)
