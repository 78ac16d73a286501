"""Fan-out: accept latency of one document to 200 recipient units versus the same document
to 1 unit, through POST /api/v1/documents (202). Target: p50 and p99 of the 200-unit
document at most 3x those of the 1-unit document.

The 200 units are valid 统一社会信用代码 made with ``gateway.units.check_character``; the
node's route table has one default route (``units = []``) to a SOAP adapter, so every unit
routes; no delivery worker runs (accept cost only). The gateway runs under gunicorn with
config/gunicorn.conf.py on SQLite. One client thread sends the two documents alternately
(1, 200, 1, 200, ...), so both see the same machine noise; latency is per request, sequential.

    .venv/bin/python bench/fanout.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

TARGET = 3.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--count", type=int, help="requests per document kind (default 200, --quick 30)")
    ap.add_argument("--units", type=int, default=200, help="recipients of the fan-out document (default 200)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    n = a.count or (30 if a.quick else 200)
    c.install_cleanup()

    tmp = c.tempdir("fanout")
    conf = c.write_node_config(tmp / "node.toml", c.node_config(tmp / "var", f"sqlite:///{tmp / 'var' / 'gateway.db'}"))
    node, key = c.prepare_node(conf)
    node.close()
    g = c.gateway_gunicorn(conf, workers=a.workers, threads=a.threads, logdir=tmp).wait_ready()
    sha = c.upload_blob(g.url, key, c.body_bytes(16 * 1024, "body"))
    units = c.make_units(a.units)
    one = tmp / "one.json"
    many = tmp / "many.json"
    one.write_bytes(json.dumps(c.document(sha, [c.COUNTY_A]), ensure_ascii=False).encode())
    many.write_bytes(json.dumps(c.document(sha, units), ensure_ascii=False).encode())

    url = g.url + "/api/v1/documents"
    c.run_loadgen(url, [one, many], key=key, threads=1, count=5)  # warm-up
    res = c.run_loadgen(url, [one, many], key=key, threads=1, count=n, timeout=1800)
    if res["errors"]:
        raise RuntimeError(f"errors: {res['first_errors']}")
    l1, lm = res["latency"]
    r50, r99 = lm["p50"] / l1["p50"], lm["p99"] / l1["p99"]
    ok = r50 <= TARGET and r99 <= TARGET
    print(f"fanout: accept latency {a.units} units p50 {lm['p50'] * 1000:.1f} ms, p99 {lm['p99'] * 1000:.1f} ms; "
          f"1 unit p50 {l1['p50'] * 1000:.1f} ms, p99 {l1['p99'] * 1000:.1f} ms; ratio p50 {r50:.1f}x, "
          f"p99 {r99:.1f}x (target <= {TARGET:g}x) {c.verdict(ok)} [n={n} each, sequential, alternating, "
          f"SQLite, gunicorn {a.workers}x{a.threads} gthread]", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    c.run(main)
