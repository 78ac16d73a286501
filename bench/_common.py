"""Shared helpers of the benchmarks (bench/*.py). Not a test, not production code.

What lives here:

* process and temp-dir bookkeeping (:func:`spawn`, :func:`tempdir`, :func:`cleanup`): every
  process a benchmark starts is in its own session (process group) and is stopped by its id
  at exit, on Ctrl-C and on SIGTERM; every temp dir is removed;
* node configuration (:func:`write_node_config`: a TOML file as ``gateway --config`` and
  ``$GATEWAY_CONFIG`` read it), schema upgrade, API keys, blobs, the sample documents and
  valid unified social credit codes (:func:`make_units`);
* gunicorn (:class:`Gunicorn`) with the production settings file ``config/gunicorn.conf.py``
  for both the gateway and the bare Flask baseline (``bench/_bare_app.py``);
* a private PostgreSQL cluster (:class:`PgCluster`, as tests/plugins/postgres.py does it);
* roles run as separate processes (``python bench/_common.py ROLE ...``):
  ``loadgen`` (HTTP load: threads, one ``requests.Session`` each, keep-alive),
  ``peer`` (the simulated SOAP document exchange service, with a timing endpoint),
  ``soap-direct`` (the baseline: ``SoapAdapter.deliver`` called directly with N threads);
* :class:`SoapNode`: the peer + node + sample document setup of soap_e2e and urgency;
* :func:`percentile`.

Clocks: ``time.monotonic()`` is CLOCK_MONOTONIC on Linux, one clock for every process on the
machine, so times taken in the peer process and in the benchmark process are comparable.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PY = sys.executable
VENV_BIN = Path(PY).parent
GUNICORN_CONF = REPO / "config" / "gunicorn.conf.py"
WSDL = "schemas/legacy/docexchange.wsdl"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PREFECTURE = "11522300GDR9YB9550"  # the sending unit (served by the node)
COUNTY_A = "1152230107CTPD8U2P"    # the one recipient of single-recipient documents

# -- bookkeeping -------------------------------------------------------------------------
_PROCS: list[subprocess.Popen] = []
_DIRS: list[Path] = []
_CLEANUPS: list[Any] = []        # run before the processes are stopped
_LATE_CLEANUPS: list[Any] = []   # run after the processes are stopped
_cleaned = False


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the final line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tempdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"gwbench-{prefix}."))
    _DIRS.append(d)
    return d


def keep_dir(d: Path) -> None:
    """Do not remove ``d`` at clean-up (``--keep``: look at logs and databases afterwards)."""
    if d in _DIRS:
        _DIRS.remove(d)


def on_cleanup(fn: Any, *, after_processes: bool = False) -> None:
    """Run ``fn()`` at clean-up (LIFO), before the processes are stopped, or after them with
    ``after_processes`` (e.g. a server they are still connected to); dirs are removed last."""
    (_LATE_CLEANUPS if after_processes else _CLEANUPS).append(fn)


def spawn(cmd: Sequence[str], *, log_file: Path | None = None, env: dict[str, str] | None = None,
          cwd: Path = REPO, stdout: Any = None, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``cmd`` in its own session; it is stopped (by its process group id) at clean-up."""
    with contextlib.ExitStack() as files:  # a log file we open is closed here; the child has its own copy
        out = stdout
        if out is None:
            out = files.enter_context(open(log_file, "ab")) if log_file else subprocess.DEVNULL
        p = subprocess.Popen(list(cmd), cwd=cwd, env={**os.environ, **(env or {})}, stdin=stdin,
                             stdout=out, stderr=subprocess.STDOUT if log_file else None,
                             start_new_session=True)
    _PROCS.append(p)
    return p


def stop(p: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group we created for ``p``; SIGKILL it if it does not go."""
    from adapters.simulators.cluster import stop_process_group

    try:
        stop_process_group(p, timeout)
    finally:
        if p in _PROCS:
            _PROCS.remove(p)


def run(main: Any) -> None:
    """``if __name__ == "__main__": c.run(main)`` in every benchmark: a benchmark that fails
    exits 2, never 1, which means "target missed" (bench/README.md)."""
    try:
        main()
    except Exception:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        sys.exit(2)


def _run_cleanups(fns: list[Any]) -> None:
    for fn in reversed(fns):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            log(f"clean-up step failed: {exc}")
    fns.clear()


def cleanup() -> None:
    """The clean-up steps, then every process we started, then the late clean-up steps,
    then the temp dirs. Runs once (also registered with atexit by :func:`install_cleanup`)."""
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    _run_cleanups(_CLEANUPS)
    for p in reversed(list(_PROCS)):
        try:
            stop(p)
        except Exception as exc:  # noqa: BLE001
            log(f"stopping pid {p.pid} failed: {exc}")
    _run_cleanups(_LATE_CLEANUPS)
    for d in _DIRS:
        shutil.rmtree(d, ignore_errors=True)
    _DIRS.clear()


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """:func:`cleanup` at exit; SIGTERM and SIGINT exit (with 128 + the signal) through it."""
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    if not pred():
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """CPU time (user + system) used so far by process ``pid`` and, with ``children``, by its
    live child processes (e.g. gunicorn's workers), from /proc; 0 for a process that is gone."""
    clk = os.sysconf("SC_CLK_TCK")

    def one(p: int) -> float:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(f[11]) + int(f[12])) / clk

    total = one(pid)
    if children:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        total += sum(cpu_seconds(int(k)) for k in kids)
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from /proc/stat; the
    busy share between two readings is Δbusy / Δtotal (× the number of cores = cores busy)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    clk = os.sysconf("SC_CLK_TCK")
    return (sum(f) - idle) / clk, sum(f) / clk


# -- statistics --------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100), like numpy's default."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- TOML (just enough for a node configuration) ------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict) or isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + to_toml(v, name)
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, name)
    return out


# -- the node ----------------------------------------------------------------------------
def node_config(data_dir: Path, db_url: str, *, peer_url: str = "http://127.0.0.1:9/docexchange",
                worker_threads: int = 8, peer_timeout: float = 15) -> dict[str, Any]:
    """A node serving PREFECTURE with one SOAP adapter and a default route (``units`` empty:
    every recipient unit) to it. Retries are quick so a hiccup does not stall a run."""
    return {
        "node": {"id": "prefecture", "name": "州人民政府办公室", "units": [PREFECTURE],
                 "data_dir": str(data_dir)},
        "database": {"url": db_url, "pool_size": 10},
        "worker": {"threads": worker_threads, "idle_sleep": 0.2, "lease_seconds": 120,
                   "poll_interval": 600,
                   "retry": {"max_attempts": 20, "base_delay": 0.2, "max_delay": 2.0}},
        "adapters": {"docexchange": {"type": "soap", "wsdl": WSDL, "address": peer_url,
                                     "timeout": peer_timeout, "pool_size": max(10, worker_threads),
                                     # the contract's SendDocument takes the body only; the
                                     # benchmarks' documents have 附件, which this peer goes without
                                     "attachments": "omit"}},
        "routes": [{"subsystem": "documents", "units": [], "adapter": "docexchange"}],
    }


def write_node_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text("# written by bench/_common.py\n" + to_toml(raw), encoding="utf-8")
    return path


def prepare_node(path: Path, key_name: str = "基准测试") -> tuple[Any, str]:
    """``gateway db upgrade`` on the configured database, then an admin-ish API key (all
    scopes, clearance 绝密, no webhook). Returns (Node, key); close the node when done."""
    from gateway import config as config_mod
    from gateway import migrate
    from gateway.api.auth import create_key
    from gateway.node import Node

    cfg = config_mod.load(path)
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    key = create_key(node.db, name=key_name, scopes=["*"], clearance="绝密", actor="bench")
    return node, key


def key_id(key: str) -> str:
    return key.split("_", 2)[1]


def store_blob(node: Any, data: bytes, key: str) -> str:
    """Put ``data`` in the node's blob store and table, granted to ``key`` (what POST
    /api/v1/blobs does)."""
    from gateway.models import Blob, BlobGrant

    sha, size = node.blobs.put_bytes(data)
    with node.db.begin() as s:
        if s.get(Blob, sha) is None:
            s.add(Blob(sha256=sha, size=size, uploaded_by=key_id(key)))
        if s.get(BlobGrant, (sha, key_id(key))) is None:
            s.add(BlobGrant(sha256=sha, api_key_id=key_id(key)))
    return sha


def upload_blob(base_url: str, key: str, data: bytes) -> str:
    import requests

    r = requests.post(f"{base_url}/api/v1/blobs", data=data, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    if r.status_code != 201:
        raise RuntimeError(f"blob upload answered {r.status_code}: {r.text[:300]}")
    return r.json()["sha256"]


def body_bytes(size: int, salt: str = "") -> bytes:
    """A deterministic stand-in for an OFD body of ``size`` bytes."""
    import hashlib

    out = bytearray(b"%OFD-1.0\n")
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{salt}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


def make_units(n: int, start: int = 1) -> list[str]:
    """``n`` distinct valid 统一社会信用代码 (organisation code and code check characters)."""
    from gateway.units import make, uscc_problem

    out = []
    for i in range(start, start + n):
        code = make("11522300", f"{i:08d}")
        assert uscc_problem(code) is None, code
        out.append(code)
    return out


def document(body_sha: str, recipients: Sequence[str] = (COUNTY_A,), *, urgency: str = "平件",
             title: str = "关于做好2026年冬季值班工作的通知", **extra: Any) -> dict[str, Any]:
    doc = {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
           "doc_number": "州政办发〔2026〕37号", "title": title, "urgency": urgency,
           "written_date": "2026年11月20日",
           "recipients": [{"unit": u, "copy_type": "主送"} for u in recipients],
           "body": {"sha256": body_sha, "name": "正文.ofd", "media_type": "application/ofd"}}
    doc.update(extra)
    return doc


NOTE_TEXT = ("各县市人民政府，州直各部门：为切实做好冬季值班和突发事件信息报送工作，确保政令畅通、"
             "信息准确，现将有关事项通知如下。一、严格落实值班制度。二、及时准确报送信息。三、加强督促检查。")


def padded_document(body_sha: str, attachment_shas: Sequence[str], target_bytes: int = 20 * 1024) -> bytes:
    """A single-recipient document whose JSON (UTF-8, not ASCII-escaped) is ``target_bytes``
    long, give or take a few bytes. No single field takes 20 KB (``note`` is capped at 2000
    characters, ``title`` at 500), so the bulk is: a 500-character title, a 2000-character
    附注 (``note``, ~6 KB of UTF-8) and as many 附件 (``attachments``, one distinct uploaded
    blob each, 60-character names) as are needed; the last entry's name is trimmed to hit
    the size."""
    title = ("关于做好2026年冬季值班和突发事件信息报送工作的通知" * 20)[:500]
    note = (NOTE_TEXT * 40)[:2000]
    doc = document(body_sha, title=title, note=note, attachments=[])

    def enc(d: dict[str, Any]) -> bytes:
        return json.dumps(d, ensure_ascii=False).encode("utf-8")

    stem = "附件：关于冬季值班安排和应急联络人员名单及值班电话汇总表的说明材料"
    for i, sha in enumerate(attachment_shas):
        if len(enc(doc)) >= target_bytes:
            break
        name = f"{i + 1:02d}{stem * 3}"[:60] + ".pdf"
        doc["attachments"].append({"sha256": sha, "name": name, "media_type": "application/pdf"})
    data = enc(doc)
    if len(data) < target_bytes:
        raise RuntimeError(f"document is only {len(data)} bytes; give more attachment blobs")
    # trim the last attachment's name (3 bytes a character) to land on target_bytes
    last = doc["attachments"][-1]
    while len(enc(doc)) - target_bytes >= 3 and len(last["name"]) > 5:
        last["name"] = last["name"][:-5] + ".pdf"
    return enc(doc)


def accept_direct(node: Any, docs: Sequence[bytes], key: str, batch: int = 200) -> list[str]:
    """Accept documents IN-PROCESS, bypassing HTTP: the same steps as POST /api/v1/documents
    (DocumentIn from JSON, blob sizes, payload.to_envelope, pipeline.accept with the same
    summary and API key id), ``batch`` documents per transaction. For backlogs only."""
    from sqlalchemy import select

    from gateway import xmlsafe
    from gateway.models import Blob
    from gateway.pipeline import accept
    from systems.documents import payload
    from systems.documents.schemas import DocumentIn

    kid = key_id(key)
    actor = f"key:{kid}(基准测试)"
    ids: list[str] = []
    sizes_cache: dict[str, int] = {}
    for start in range(0, len(docs), batch):
        with node.db.begin() as s:
            for raw in docs[start:start + batch]:
                doc = DocumentIn.model_validate_json(raw)
                shas = [doc.body["sha256"]] + [a["sha256"] for a in doc.attachments]
                need = [x for x in shas if x not in sizes_cache]
                if need:
                    sizes_cache.update({b.sha256: b.size for b in s.scalars(select(Blob).where(Blob.sha256.in_(need)))})
                env = payload.to_envelope(doc, message_id=doc.message_id, node_id=node.id,
                                          sizes=sizes_cache, plain=xmlsafe.plain_json(raw))
                summary = {"doc_number": doc.doc_number, "title": doc.title, "doc_type": doc.doc_type}
                res = accept(node, env, actor=actor, api_key_id=kid, summary=summary, session=s)
                ids.append(res.message.id)
    return ids


def outbox_pending(node: Any) -> int:
    from sqlalchemy import func, select

    from gateway.models import OutboxEntry

    with node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(OutboxEntry)
                        .where(OutboxEntry.state.in_(("pending", "claimed")))) or 0


# -- gunicorn ----------------------------------------------------------------------------
class Gunicorn:
    """``gunicorn -c config/gunicorn.conf.py APP`` with the production settings file; bind,
    worker count and threads through the file's own environment variables."""

    def __init__(self, app: str, *, workers: int, threads: int, env: dict[str, str] | None = None,
                 pythonpath: Path | None = None, name: str = "gunicorn", logdir: Path,
                 tree: Path = REPO, conf: Path | None = None) -> None:
        """``tree``: the checkout whose settings file is used, run in it (bench/ab.py); ``env``
        comes last, so it may change the worker count or threads too. ``conf``: another
        settings file instead (bench/stages.py: one that reads the production file too)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"{name}.log"
        cmd = [str(VENV_BIN / "gunicorn"), "-c", str(conf or tree / GUNICORN_CONF.relative_to(REPO))]
        if pythonpath:
            cmd += ["--pythonpath", str(pythonpath)]
        cmd.append(app)
        self.proc = spawn(cmd, log_file=self.log, cwd=tree, env={
            "GATEWAY_BIND": f"127.0.0.1:{self.port}", "GATEWAY_WORKERS": str(workers),
            "GATEWAY_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(env or {})})
        self.name = name

    def wait_ready(self, path: str = "/healthz", timeout: float = 60) -> Gunicorn:
        import requests

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                requests.get(self.url + path, timeout=2)
                return True
            except requests.RequestException:
                return False

        wait_for(up, timeout, f"{self.name} on {self.url}")
        return self

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def stop(self) -> None:
        stop(self.proc)


def gateway_gunicorn(config_path: Path, *, workers: int, threads: int, logdir: Path, name: str = "gateway") -> Gunicorn:
    return Gunicorn("gateway.app:create_app()", workers=workers, threads=threads, name=name, logdir=logdir,
                    env={"GATEWAY_CONFIG": str(config_path)})


def bare_gunicorn(*, workers: int, threads: int, logdir: Path) -> Gunicorn:
    return Gunicorn("_bare_app:create_app()", workers=workers, threads=threads, name="bare-flask",
                    logdir=logdir, pythonpath=BENCH)


# -- PostgreSQL --------------------------------------------------------------------------
class PgCluster:
    """A private cluster (initdb + pg_ctl in a temp dir, 127.0.0.1 only, trust auth). As
    root it runs as the unprivileged user ``gwtest`` (initdb refuses root), like
    tests/plugins/postgres.py. Durability is left at PostgreSQL's defaults (fsync on,
    synchronous_commit on), to compare fairly with SQLite's synchronous=FULL."""

    USER = "gwtest"

    def __init__(self) -> None:
        import glob

        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        cands = [Path(d) for d in dirs] + ([Path(shutil.which("initdb")).parent] if shutil.which("initdb") else [])
        self.bin = next((d for d in reversed(cands) if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.as_root = os.geteuid() == 0
        self.tmp = tempdir("pg")
        self.data = self.tmp / "data"
        self.port = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", self.USER, "--", *cmd]
        return subprocess.run(cmd, cwd=self.tmp, capture_output=True, text=True)

    def start(self) -> str:
        import pwd

        import psycopg

        (self.tmp / "sock").mkdir()
        if self.as_root:
            try:
                pwd.getpwnam(self.USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                                "/nonexistent", "--shell", "/usr/sbin/nologin", self.USER], check=True,
                               capture_output=True)
            subprocess.run(["chown", "-R", f"{self.USER}:", str(self.tmp)], check=True)
            os.chmod(self.tmp, 0o755)
        p = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER, "-E", "UTF8",
                      "--locale=C", "-A", "trust", "--no-sync")
        if p.returncode:
            raise RuntimeError(f"initdb failed: {p.stdout}{p.stderr}")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{self.tmp / 'sock'}'\n"
                       "max_connections = 200\nshared_buffers = 256MB\n")
        on_cleanup(self.stop)
        self.port = free_port()
        p = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.tmp / "server.log"),
                      "-o", f"-p {self.port}", "-w", "-t", "60", "start")
        if p.returncode:
            raise RuntimeError(f"pg_ctl start failed: {p.stdout}{p.stderr}")
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE gateway_bench")
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/gateway_bench"

    def create_database(self, name: str) -> str:
        """Another empty database on this cluster (e.g. one per round); its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql+psycopg://{self.USER}@127.0.0.1:{self.port}/{name}"

    def pid(self) -> int:
        """The postmaster's pid (its children are the backends): ``cpu_seconds(pg.pid())`` is
        the whole server's CPU."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


# -- role: the load generator (its own process) -------------------------------------------
def run_loadgen(url: str, bodies: Sequence[Path], *, key: str | None, threads: int, duration: float | None = None,
                count: int | None = None, warmup: float = 0.0, expect: int = 202,
                content_type: str = "application/json", timeout: float = 120) -> dict[str, Any]:
    """Run the ``loadgen`` role in a separate process and return its JSON result."""
    cmd = [PY, str(BENCH / "_common.py"), "loadgen", "--url", url, "--threads", str(threads),
           "--expect", str(expect), "--content-type", content_type, "--warmup", str(warmup)]
    for b in bodies:
        cmd += ["--body", str(b)]
    if key:
        cmd += ["--key", key]
    if duration is not None:
        cmd += ["--duration", str(duration)]
    if count is not None:
        cmd += ["--count", str(count)]
    return _run_role(cmd, timeout)


def _run_role(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python bench/_common.py ROLE ...`` (``cmd``) to the end; the JSON of its last line."""
    p = spawn(cmd, stdout=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        stop(p)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed (exit {p.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


def _loadgen_main(a: argparse.Namespace) -> None:
    """Threads, each with its own requests.Session (keep-alive), POST the bodies round-robin
    (thread i starts at body i) for ``duration`` seconds after ``warmup``, or ``count``
    requests per body in total, in order (then one thread is the sensible choice)."""
    import requests

    bodies = [Path(b).read_bytes() for b in a.body]
    headers = {"Content-Type": a.content_type}
    if a.key:
        headers["Authorization"] = f"Bearer {a.key}"
    lat: list[list[float]] = [[] for _ in bodies]
    errors: list[str] = []
    ok = [0]
    answered: list[int] = []  # per thread: requests answered or failed, warm-up included
    lock = threading.Lock()
    start_barrier = threading.Barrier(a.threads + 1)
    t = {"measure_from": 0.0, "end": 0.0}
    counter = iter(range(10**12))

    def worker(idx: int) -> None:
        s = requests.Session()
        i = idx
        sent = 0
        start_barrier.wait()
        while True:
            if a.count is not None:
                with lock:
                    n = next(counter)
                if n >= a.count * len(bodies):
                    break
                bi = n % len(bodies)
            else:
                if time.monotonic() >= t["end"]:
                    break
                bi = i % len(bodies)
                i += 1
            t0 = time.monotonic()
            try:
                r = s.post(a.url, data=bodies[bi], headers=headers, timeout=60)
                status, text = r.status_code, (r.text[:300] if r.status_code != a.expect else "")
            except requests.RequestException as exc:
                status, text = -1, f"{type(exc).__name__}: {exc}"[:300]
            t1 = time.monotonic()
            sent += 1
            if a.count is None and (t0 < t["measure_from"] or t1 > t["end"]):
                continue  # warm-up, or finished after the window closed
            with lock:
                if status == a.expect:
                    ok[0] += 1
                    lat[bi].append(t1 - t0)
                else:
                    errors.append(f"{status} {text}")
        s.close()
        answered.append(sent)

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.threads)]
    for th in ths:
        th.start()
    now = time.monotonic()
    t["measure_from"] = now + a.warmup
    t["end"] = now + a.warmup + (a.duration or 0)
    cpu0 = time.process_time()
    start_barrier.wait()
    for th in ths:
        th.join()
    finished = time.monotonic()
    elapsed = (a.duration if a.count is None else finished - now)
    res = {
        "ok": ok[0], "errors": len(errors), "first_errors": errors[:3], "elapsed": elapsed,
        "rate": ok[0] / elapsed if elapsed else 0.0,
        # CPU and wall time of the whole run, warm-up included, and the requests it sent:
        # per request, the client's cost; per second, its share of a core
        "cpu_seconds": time.process_time() - cpu0, "wall": finished - now, "requests": sum(answered),
        "latency": [{"n": len(x), "p50": percentile(x, 50), "p90": percentile(x, 90), "p99": percentile(x, 99),
                     "max": max(x) if x else float("nan"), "mean": sum(x) / len(x) if x else float("nan")}
                    for x in lat],
    }
    print(json.dumps(res))


# -- role: the SOAP peer (its own process) ---------------------------------------------------
class Peer:
    """The simulated document exchange service in its own process (so its CPU and GIL are
    not the benchmark's), with ``GET /_bench/stats`` and ``POST /_bench/times``."""

    def __init__(self, *, delay: float, logdir: Path) -> None:
        self.port = free_port()
        self.proc = spawn([PY, str(BENCH / "_common.py"), "peer", "--port", str(self.port), "--delay", str(delay)],
                          log_file=logdir / "peer.log")
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/docexchange"
        import requests

        self._s = requests.Session()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("the SOAP peer exited; see peer.log")
            try:
                return self._s.get(self.base + "/_bench/stats", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for(up, 30, "the SOAP peer")

    def stats(self) -> dict[str, Any]:
        return self._s.get(self.base + "/_bench/stats", timeout=30).json()

    def times(self, doc_ids: Sequence[str]) -> dict[str, float]:
        return self._s.post(self.base + "/_bench/times", json=list(doc_ids), timeout=30).json()

    def stop(self) -> None:
        self._s.close()
        stop(self.proc)


def _peer_main(a: argparse.Namespace) -> None:
    from werkzeug.wrappers import Request, Response

    from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer

    state = DocExchangeState(response_delay=a.delay)
    server = SoapServiceServer(state, port=a.port)
    inner = server.app

    class WithStats:
        path = inner.path

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            p = environ.get("PATH_INFO", "")
            if p == "/_bench/stats":
                with state._lock:
                    arr = list(state.arrivals.values())
                    body = {"documents": len(state.arrivals), "send_calls": state._calls["SendDocument"],
                            "first": min(arr) if arr else None, "last": max(arr) if arr else None}
                return Response(json.dumps(body), mimetype="application/json")(environ, start_response)
            if p == "/_bench/times":
                ids = json.loads(Request(environ).get_data())
                with state._lock:
                    body = {i: state.arrivals[i] for i in ids if i in state.arrivals}
                return Response(json.dumps(body), mimetype="application/json")(environ, start_response)
            return inner(environ, start_response)

    server.app = WithStats()  # type: ignore[assignment]
    server.start()
    print(f"peer on {server.url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.close()


# -- role: direct SOAP calls (the baseline; its own process) ---------------------------------
def run_soap_direct(peer_url: str, body: Path, doc: Path, *, threads: int, count: int,
                    timeout: float = 600) -> dict[str, Any]:
    cmd = [PY, str(BENCH / "_common.py"), "soap-direct", "--url", peer_url, "--body", str(body),
           "--doc", str(doc), "--threads", str(threads), "--count", str(count)]
    return _run_role(cmd, timeout)


def _soap_direct_main(a: argparse.Namespace) -> None:
    """``count`` SendDocument calls through ``adapters.soap.SoapAdapter.deliver`` (zeep, the
    adapter's own argument mapping, blob read and hash) with ``threads`` threads. Envelopes
    are built before timing; each call has a new message id (so a new doc_id at the peer)."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from adapters.base import AdapterContext, Delivery
    from adapters.soap import SoapAdapter
    from gateway.blobs import BlobStore
    from gateway.envelope import Recipient
    from systems.documents import payload
    from systems.documents.schemas import DocumentIn

    tmp = Path(tempfile.mkdtemp(prefix="gwbench-direct."))
    try:
        blobs = BlobStore(tmp / "blobs")
        data = Path(a.body).read_bytes()
        sha, size = blobs.put_bytes(data)
        doc = DocumentIn.model_validate_json(Path(a.doc).read_bytes())
        state: dict[str, str] = {}
        ctx = AdapterContext(blobs=blobs, state=type("S", (), {"get": lambda s, k, d=None: state.get(k, d),
                                                               "set": lambda s, k, v: state.__setitem__(k, v)})(),
                             base_dir=tmp)
        adapter = SoapAdapter("docexchange", {"type": "soap", "wsdl": WSDL, "address": a.url, "timeout": 15,
                                              "pool_size": max(10, a.threads)}, ctx)
        sizes = {sha: size}
        for att in doc.attachments:
            sizes.setdefault(att["sha256"], 1)
        deliveries = []
        for _ in range(a.count):
            env = payload.to_envelope(doc, message_id=str(uuid.uuid4()), node_id="prefecture", sizes=sizes)
            r = env.recipients[0]
            deliveries.append(Delivery(message_id=env.message_id, recipient=Recipient(r.unit, r.name, r.copy_type,
                                                                                      r.copy_no),
                                       envelope=env, attempt=1))
        adapter.check()  # connection and zeep warmed up, like a worker that has been running
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one(d: Delivery) -> None:
            t0 = time.monotonic()
            try:
                adapter.deliver(d)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(str(exc)[:200])
                return
            with lock:
                lat.append(time.monotonic() - t0)

        t0, cpu0 = time.monotonic(), time.process_time()
        with ThreadPoolExecutor(a.threads) as pool:
            list(pool.map(one, deliveries))
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        adapter.close()
        print(json.dumps({"ok": len(lat), "errors": len(errors), "first_errors": errors[:3], "elapsed": elapsed,
                          "cpu_seconds": cpu,
                          "rate": len(lat) / elapsed, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                          "doc_ids": [d.remote_ref for d in deliveries]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the setup of the SOAP delivery benchmarks (soap_e2e, urgency) --------------------------
class SoapNode:
    """The SOAP peer in its own process (response delay ``delay``); a fresh SQLite node in
    ``tmp`` whose default route goes to it (worker ``worker_threads``) and its API key; a
    16 KB body stored as a blob (``sha``) and a 1-recipient 平件 document with it (``doc``,
    JSON), both also written to ``tmp`` for the direct baseline. ``node`` stays open: close
    it when done."""

    def __init__(self, tmp: Path, *, delay: float, worker_threads: int) -> None:
        self.tmp = tmp
        self.peer = Peer(delay=delay, logdir=tmp)
        self.conf = write_node_config(tmp / "node.toml", node_config(
            tmp / "var", f"sqlite:///{tmp / 'var' / 'gateway.db'}", peer_url=self.peer.url,
            worker_threads=worker_threads))
        self.node, self.key = prepare_node(self.conf)
        body = body_bytes(16 * 1024, "body")
        (tmp / "body.ofd").write_bytes(body)
        self.sha = store_blob(self.node, body, self.key)
        self.doc = json.dumps(document(self.sha), ensure_ascii=False).encode()
        (tmp / "doc.json").write_bytes(self.doc)

    def soap_direct(self, *, threads: int, count: int) -> dict[str, Any]:
        """The baseline (:func:`run_soap_direct`) with this body and document; raises if any
        call failed."""
        res = run_soap_direct(self.peer.url, self.tmp / "body.ofd", self.tmp / "doc.json", threads=threads,
                              count=count)
        if res["errors"]:
            raise RuntimeError(f"direct calls failed: {res['first_errors']}")
        return res

    def start_worker(self) -> subprocess.Popen:
        """``gateway --config X worker``; its output goes to ``tmp/worker.log``."""
        return spawn([str(VENV_BIN / "gateway"), "--config", str(self.conf), "worker"],
                     log_file=self.tmp / "worker.log", env={"PYTHONUNBUFFERED": "1"})


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench/_common.py")
    sub = ap.add_subparsers(dest="role", required=True)
    lg = sub.add_parser("loadgen")
    lg.add_argument("--url", required=True)
    lg.add_argument("--body", action="append", required=True)
    lg.add_argument("--key")
    lg.add_argument("--threads", type=int, default=8)
    lg.add_argument("--duration", type=float)
    lg.add_argument("--count", type=int)
    lg.add_argument("--warmup", type=float, default=0.0)
    lg.add_argument("--expect", type=int, default=202)
    lg.add_argument("--content-type", default="application/json")
    pe = sub.add_parser("peer")
    pe.add_argument("--port", type=int, required=True)
    pe.add_argument("--delay", type=float, default=0.0)
    sd = sub.add_parser("soap-direct")
    sd.add_argument("--url", required=True)
    sd.add_argument("--body", required=True)
    sd.add_argument("--doc", required=True)
    sd.add_argument("--threads", type=int, default=8)
    sd.add_argument("--count", type=int, default=100)
    a = ap.parse_args()
    if a.role == "loadgen":
        if (a.duration is None) == (a.count is None):
            ap.error("give exactly one of --duration or --count")
        _loadgen_main(a)
    elif a.role == "peer":
        _peer_main(a)
    else:
        _soap_direct_main(a)


if __name__ == "__main__":
    main()
