"""Where an accept's CPU goes, step by step, under accept_rate's load; and the same for the
bare Flask app. Not a target: a map for deciding what is worth making cheaper.

Both servers run under the production gunicorn settings (config/gunicorn.conf.py, read by
bench/_stages_conf.py), with timers put into each worker after its start-up
(bench/_stages_hook.py): around the request thread's whole handling of a request, Flask's
part, the view, the access log and, in the gateway, each step of POST /api/v1/documents. A
timer counts the CPU time of its own thread only (``time.thread_time``), callees included, so
time spent waiting for the GIL, a lock or the disk is charged to nobody, and the figures hold
in a slow phase of the machine as in a fast one (they all grow, about alike). Each server
gets accept_rate's document (20 KB of JSON, one recipient) from 8 client threads, first for a
warm-up that is left out, then for the measured seconds.

Group commit: the thread that leads a group runs every queued accept's statements and the
commit, so "commit a group" and "WAL fsync" are paid by leaders for the whole group; per
request they are the group's cost shared out. "group commit" is every caller's time inside
``Database.write``: leading, and the little that waiting costs.

    .venv/bin/python bench/stages.py [--backend postgresql] [--seconds 12]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

#: (timer, depth, what it covers); the timers are set in _stages_hook.install
STAGES = [
    ("handle", 0, "a request thread's whole work for one request (gunicorn: read, parse, answer)"),
    ("wsgi", 1, "Flask: request and response objects, routing, the view"),
    ("view", 2, "the endpoint's function"),
    ("auth", 3, "API key and scope"),
    ("body + model", 3, "reading the body, JSON and the request model (pydantic)"),
    ("blob grants", 3, "the body and attachments were uploaded with this key"),
    ("envelope", 3, "the canonical envelope from the model"),
    ("accept", 3, "gateway.pipeline.accept"),
    ("routes", 4, "route per recipient"),
    ("rows + XML", 4, "the rows to store, the envelope's XML and the audit record"),
    ("group commit", 4, "Database.write: leading a group, or waiting for one"),
    ("commit a group", 5, "a leader: BEGIN, every unit, COMMIT (shared out per request)"),
    ("statements", 6, "one accept's statements"),
    ("WAL fsync", 5, "a leader: the WAL made durable (SQLite)"),
    ("202 answer", 3, "the answer's fields"),
    ("202 answer JSON", 3, "the answer written as JSON"),
    ("access log", 1, "gunicorn's access log line"),
]


def snapshot(folder: Path) -> dict[str, dict]:
    """Every worker's last totals, by pid."""
    out = {}
    for f in folder.glob("*.json"):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):  # renamed into place, so only a vanished file
            continue
    return out


def per_request(before: dict[str, dict], after: dict[str, dict]) -> tuple[int, dict[str, float], dict[str, float]]:
    """(requests, µs a request, calls a request) of each timer between two snapshots."""
    seconds: dict[str, float] = {}
    calls: dict[str, float] = {}
    for pid, b in after.items():
        a = before.get(pid, {"seconds": {}, "calls": {}})
        for k, v in b["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v - a["seconds"].get(k, 0.0)
        for k, v in b["calls"].items():
            calls[k] = calls.get(k, 0) + v - a["calls"].get(k, 0)
    n = int(calls.get("handle", 0))
    if n <= 0:
        raise RuntimeError("no request was timed; look at the server's log")
    return n, {k: v / n * 1e6 for k, v in seconds.items()}, {k: v / n for k, v in calls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--seconds", type=float, default=12.0, help="measured load per server (default 12)")
    ap.add_argument("--warmup", type=float, default=3.0, help="load left out first (default 3)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    c.install_cleanup()
    tmp = c.tempdir("stages")
    conf = c.BENCH / "_stages_conf.py"

    def server(app: str, name: str, env: dict[str, str], pythonpath: Path | None = None) -> tuple[c.Gunicorn, Path]:
        folder = tmp / f"timers-{name}"
        folder.mkdir()
        g = c.Gunicorn(app, workers=a.workers, threads=a.threads, name=name, logdir=tmp, conf=conf,
                       pythonpath=pythonpath, env={"STAGES_DIR": str(folder),
                                                   "STAGES_BASE_CONF": str(c.GUNICORN_CONF), **env})
        return g.wait_ready(), folder

    bare, bare_dir = server("_bare_app:create_app()", "bare-flask", {}, pythonpath=c.BENCH)
    pg = None
    if a.backend == "postgresql":
        pg = c.PgCluster()
        url = pg.start()
    else:
        url = f"sqlite:///{tmp / 'node' / 'var' / 'gateway.db'}"
    (tmp / "node").mkdir()
    node_conf = c.write_node_config(tmp / "node" / "node.toml", c.node_config(tmp / "node" / "var", url))
    node, key = c.prepare_node(node_conf)
    node.close()
    gw, gw_dir = server("gateway.app:create_app()", f"gateway-{a.backend}", {"GATEWAY_CONFIG": str(node_conf)})
    body = c.upload_blob(gw.url, key, c.body_bytes(64 * 1024, "body"))
    atts = [c.upload_blob(gw.url, key, c.body_bytes(2048, f"att{i}")) for i in range(99)]
    doc = tmp / "doc.json"
    doc.write_bytes(c.padded_document(body, atts))

    results = {}
    for name, srv, folder, k in (("bare", bare, bare_dir, None), ("gateway", gw, gw_dir, key)):
        url_docs = srv.url + "/api/v1/documents"
        c.run_loadgen(url_docs, [doc], key=k, threads=a.clients, duration=a.warmup)
        before = snapshot(folder)
        watched = [srv.proc.pid] + ([pg.pid()] if pg is not None and k else [])
        cpu0 = [c.cpu_seconds(p) for p in watched]
        res = c.run_loadgen(url_docs, [doc], key=k, threads=a.clients, duration=a.seconds)
        cpu1 = [c.cpu_seconds(p) for p in watched]
        if res["errors"]:
            raise RuntimeError(f"{name}: {res['errors']} errors, e.g. {res['first_errors']}")
        n, us, calls = per_request(before, snapshot(folder))
        process_ms = [(y - x) / res["requests"] * 1000 for x, y in zip(cpu0, cpu1)]
        results[name] = (n, us, calls, process_ms, res["rate"])
        c.log(f"{name}: {res['rate']:.0f}/s; {n} requests timed; process CPU ms a request "
              + " + ".join(f"{x:.2f}" for x in process_ms))
    gw.stop()
    bare.stop()
    if pg is not None:
        pg.stop()

    _, g_us, g_calls, g_ms, g_rate = results["gateway"]
    _, b_us, _, b_ms, b_rate = results["bare"]
    print(f"{'step (thread CPU µs a request)':44s} {'gateway':>8s} {'calls':>6s} {'bare':>8s}", file=sys.stderr)
    for stage, depth, what in STAGES:
        if stage not in g_us and stage not in b_us:
            continue
        label = "  " * depth + stage
        gv = f"{g_us[stage]:8.0f} {g_calls[stage]:6.2f}" if stage in g_us else f"{'':8s} {'':6s}"
        bv = f"{b_us[stage]:8.0f}" if stage in b_us else ""
        print(f"{label:44s} {gv} {bv:>8s}   {what}", file=sys.stderr)
    g_out, b_out = g_us["handle"] - g_us["view"], b_us["handle"] - b_us["view"]
    print(f"{'outside the view':44s} {g_out:8.0f} {'':6s} {b_out:8.0f}", file=sys.stderr)
    steps = ", ".join(f"{s} {g_us[s]:.0f}" for s in ("body + model", "accept", "group commit", "rows + XML",
                                                   "envelope", "202 answer", "auth", "blob grants") if s in g_us)
    db = f" + PostgreSQL {g_ms[1]:.2f}" if len(g_ms) > 1 else ""
    print(f"stages ({a.backend}): thread CPU µs a request: gateway {g_us['handle']:.0f} (view {g_us['view']:.0f}: "
          f"{steps}; outside the view {g_out:.0f}), bare flask {b_us['handle']:.0f} (view {b_us['view']:.0f}; "
          f"outside the view {b_out:.0f}); process CPU ms a request: gateway {g_ms[0]:.2f}{db}, bare "
          f"{b_ms[0]:.2f}; {g_rate:.0f}/s against {b_rate:.0f}/s [not a target; {a.seconds:g} s each after "
          f"{a.warmup:g} s warm-up, gunicorn {a.workers}x{a.threads}, {a.clients} client threads]", flush=True)


if __name__ == "__main__":
    c.run(main)
