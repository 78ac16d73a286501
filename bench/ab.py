"""A/B of two gateway servers that differ in one thing (the code, a setting, the database),
for a change worth a few percent: accept_rate's ratio moves by ±0.05 from run to run with the
machine's phase, which hides it. Not a target.

Each side is a node of its own (its own SQLite file, or its own database on one private
PostgreSQL cluster) under gunicorn with its tree's ``config/gunicorn.conf.py``, and gets
accept_rate's document (20 KB of JSON, one recipient) from 8 client threads. The load goes to
one side at a time, in short slices, in the order A B, B A, A B …, so that a drift in the
machine's speed falls on both sides alike. Per slice: the accepts a second, and the CPU a
request of the side's gunicorn workers (and, on PostgreSQL, of the whole PostgreSQL server;
only one side is loaded at a time). Prints the means and B/A.

    # code: a checkout of another revision (git worktree add /tmp/rev-b REV)
    .venv/bin/python bench/ab.py --b-tree /tmp/rev-b [--backend postgresql]
    # a setting (the environment of B's gunicorn)
    .venv/bin/python bench/ab.py --b-env GATEWAY_THREADS=4
    # the database (SQL run on B's database after its migrations)
    .venv/bin/python bench/ab.py --backend postgresql --b-sql "ALTER TABLE messages ..."

A tree is run with ``PYTHONPATH`` set to it and as gunicorn's working directory, so that its
``gateway``, ``systems`` and ``adapters`` (and its migrations, schemas and gunicorn settings)
are used, with this checkout's virtual environment.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


class Side:
    def __init__(self, name: str, tree: Path, env: dict[str, str], sql: list[str], url: str, tmp: Path,
                 workers: int, threads: int) -> None:
        self.name, self.tree = name, tree
        d = tmp / name
        d.mkdir()
        conf = c.write_node_config(d / "node.toml", c.node_config(d / "var", url))
        self.env = {"PYTHONPATH": str(tree), **env}
        self._gateway("db", "upgrade", conf=conf)
        if sql:
            import psycopg  # only PostgreSQL takes --sql (checked in main)

            with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
                for statement in sql:
                    try:
                        conn.execute(statement)  # type: ignore[arg-type]
                    except psycopg.Error as exc:
                        raise SystemExit(f"ab: --{name}-sql {statement!r}: {exc}") from None
        out = self._gateway("keys", "create", "--name", f"ab-{name}", "--scope", "*", "--clearance", "绝密",
                            conf=conf)
        self.key = next(w for w in out.split() if w.startswith("gw_"))
        self.server = c.Gunicorn("gateway.app:create_app()", workers=workers, threads=threads, name=f"gateway-{name}",
                                 logdir=tmp, tree=tree, env={"GATEWAY_CONFIG": str(conf), **self.env}).wait_ready()
        self.url = self.server.url
        body = c.upload_blob(self.url, self.key, c.body_bytes(64 * 1024, "body"))
        atts = [c.upload_blob(self.url, self.key, c.body_bytes(2048, f"att{i}")) for i in range(99)]
        self.doc = d / "doc.json"
        self.doc.write_bytes(c.padded_document(body, atts))
        self.slices: list[tuple[float, float, float]] = []

    def _gateway(self, *args: str, conf: Path) -> str:
        p = subprocess.run([str(c.VENV_BIN / "gateway"), "--config", str(conf), *args], cwd=self.tree,
                           env={**os.environ, **self.env}, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"ab: side {self.name}: gateway {' '.join(args)} failed:\n{p.stderr[-2000:]}")
        return p.stdout

    def load(self, seconds: float, clients: int, warmup: float, pg_pid: int | None) -> str:
        pg0 = c.cpu_seconds(pg_pid) if pg_pid else 0.0
        cpu0 = c.cpu_seconds(self.server.proc.pid)
        r = c.run_loadgen(self.url + "/api/v1/documents", [self.doc], key=self.key, threads=clients,
                          duration=seconds, warmup=warmup)
        cpu1 = c.cpu_seconds(self.server.proc.pid)
        pg1 = c.cpu_seconds(pg_pid) if pg_pid else 0.0
        if r["errors"]:
            raise SystemExit(f"ab: side {self.name}: {r['errors']} errors, e.g. {r['first_errors'][:1]}")
        n = r["requests"]  # the CPU counted is the whole slice's, warm-up included: so are these
        self.slices.append((r["rate"], (cpu1 - cpu0) / n * 1000, (pg1 - pg0) / n * 1000))
        return f"{r['rate']:.0f}/s, CPU ms a request {self.slices[-1][1]:.2f}" + (
            f" + PostgreSQL {self.slices[-1][2]:.2f}" if pg_pid else "")

    def means(self) -> tuple[float, float, float]:
        return tuple(statistics.mean(s[i] for s in self.slices) for i in range(3))  # type: ignore[return-value]


def _env(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise SystemExit(f"ab: {flag} {p!r}: expected NAME=VALUE")
        out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    for side in ("a", "b"):
        ap.add_argument(f"--{side}-tree", type=Path, default=c.REPO, help="the checkout side %s runs (default: this one)" % side.upper())
        ap.add_argument(f"--{side}-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of side %s's gunicorn (repeatable)" % side.upper())
        ap.add_argument(f"--{side}-sql", action="append", default=[], metavar="SQL",
                        help="PostgreSQL: run on side %s's database after its migrations (repeatable)" % side.upper())
    ap.add_argument("--slices", type=int, default=10, help="slices per side (default 10)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds measured per slice (default 5)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    if (a.a_sql or a.b_sql) and a.backend != "postgresql":
        raise SystemExit("ab: --a-sql/--b-sql need --backend postgresql")
    for tree in (a.a_tree, a.b_tree):
        if not (tree / "gateway" / "app.py").is_file() or not (tree / "config" / "gunicorn.conf.py").is_file():
            raise SystemExit(f"ab: {tree}: not a checkout of this project (no gateway/app.py or config/gunicorn.conf.py)")
    envs = {name: _env(getattr(a, f"{name}_env"), f"--{name}-env") for name in ("a", "b")}
    c.install_cleanup()
    tmp = c.tempdir("ab")
    pg = c.PgCluster() if a.backend == "postgresql" else None
    if pg is not None:
        pg.start()
    sides = []
    for name in ("a", "b"):
        url = (pg.create_database(f"ab_{name}") if pg is not None
               else f"sqlite:///{tmp / name / 'var' / 'gateway.db'}")
        sides.append(Side(name, getattr(a, f"{name}_tree").resolve(), envs[name], getattr(a, f"{name}_sql"), url, tmp,
                          a.workers, a.threads))
    for s in sides:  # warm both (first requests, caches, the first WAL pages), not counted
        c.run_loadgen(s.url + "/api/v1/documents", [s.doc], key=s.key, threads=a.clients, duration=3)
    pg_pid = pg.pid() if pg is not None else None
    for i in range(a.slices):
        for s in (sides if i % 2 == 0 else sides[::-1]):
            c.log(f"slice {i + 1}/{a.slices} {s.name.upper()}: {s.load(a.seconds, a.clients, 0.5, pg_pid)}")
    (ra, ca, pa), (rb, cb, pb) = sides[0].means(), sides[1].means()
    db = " + PostgreSQL {:.3f}" if pg is not None else ""
    print(f"ab ({a.backend}, {a.slices} slices of {a.seconds:g} s each, alternating): "
          f"A {ra:.0f}/s, CPU ms a request {ca:.3f}{db.format(pa)}; B {rb:.0f}/s, {cb:.3f}{db.format(pb)}; "
          f"B/A rate {rb / ra:.3f}, CPU {(cb + pb) / (ca + pa):.3f} "
          f"[A {sides[0].tree} {' '.join(a.a_env + a.a_sql)}; B {sides[1].tree} {' '.join(a.b_env + a.b_sql)}]",
          flush=True)


if __name__ == "__main__":
    main()
