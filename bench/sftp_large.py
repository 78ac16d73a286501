"""One large document through the SFTP drop: a 1 GiB attachment (``--quick``: 100 MiB)
uploaded to the API, sent as a document to a unit behind the ``sftp`` adapter, delivered by
``gateway worker`` to a private OpenSSH server, versus a direct paramiko put of the same
number of bytes to the same server. Also the gateway's peak memory.

Everything runs on 127.0.0.1 and is started here:

* a private OpenSSH ``sshd`` (``tests.plugins.sshd.PrivateSshd``: its own config, ed25519
  host and client keys, ``internal-sftp`` rooted at a temp data folder);
* the API: ``gunicorn -c config/gunicorn.conf.py 'gateway.app:create_app()'`` with
  ``GATEWAY_CONFIG``, ``GATEWAY_BIND`` and ``GATEWAY_WORKERS`` (default 2, one per core);
* the delivery worker: ``python -m gateway.cli --config X worker`` (2 threads, idle_sleep
  0.05 s, poll_interval and lease long enough that nothing but the delivery runs).

The node is SQLite in a temp data dir; its route sends unit 1152230107CTPD8U2P to the
``sftp`` adapter ``drop`` (root ``<data root>/drop``). The unit's ``inbox/`` is created here
beforehand (the legacy system owns its folders; the adapter never creates them).

Measured in one run (MB = 10^6 bytes throughout, also for memory):

1. Gateway. The attachment (random bytes in a temp file) is POSTed to ``/api/v1/blobs`` by
   streaming (``requests`` with a file object), a small body likewise; then
   ``POST /api/v1/documents`` with the body and the attachment. The outbox row is polled
   (SQLite, read-only, every 20 ms) and the unit's inbox on the local data root (every 5-10 ms):
   *delivery time* = from the worker claiming the delivery to ``GW_<ref>.xml.ok`` appearing
   (SSH connect, checks, streaming ``.part``, stat, rename, ``.ok``). Throughput = archive
   file bytes (base64 inline, ~1.37x the attachment) / delivery time; the attachment bytes
   per second are printed too. The ``.part`` → ``.ok`` transfer-only figure is on stderr.
2. Baseline, same server, a file of exactly the archive's size (the delivered archive
   itself, so it is in the page cache as the gateway's blob was): ``SFTPClient.put`` with
   paramiko defaults (plain ``Transport(sock)``: Nagle on, paramiko's cipher order), timed
   from TCP connect to ``put`` returning (it stats the file); then the same with
   ``TCP_NODELAY`` on the socket as a second line. The plain put runs twice (before and
   after the TCP_NODELAY put; ``--baseline-runs``) and its mean is the baseline.
3. Ratio gateway / plain direct put; target >= 0.9.
4. Peak RSS: ``VmHWM`` of every gunicorn worker (the one that received the upload is found
   by its ``/proc/<pid>/io`` write count) and of the ``gateway worker`` process, read before
   anything is stopped; ``VmRSS`` is sampled every 0.25 s as well. Target: each < 150 MB.

``os.sync()`` runs before each timed transfer so write-back of the previous phase's data
does not land in the next one. Progress goes to stderr; stdout carries one final line.
Exit status: 0 both targets met, 1 a target missed, 2 the benchmark itself failed.

    .venv/bin/python bench/sftp_large.py [--quick] [--size-mb N] [--workers N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (process/temp-dir bookkeeping and clean-up are shared)
    COUNTY_A, GUNICORN_CONF, PREFECTURE, PY, VENV_BIN, cleanup, free_port, install_cleanup, log, on_cleanup,
    prepare_node, spawn, tempdir, wait_for,
)

# PREFECTURE sends; COUNTY_A is the recipient, behind the SFTP drop
ADAPTER = "drop"
SUB = "drop"                       # the adapter's root below the sshd data root
MIB = 1024 * 1024
MB = 1_000_000
RATIO_TARGET = 0.9
RSS_TARGET_MB = 150.0


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def synced(what: str) -> None:
    t0 = time.monotonic()
    os.sync()
    log(f"sync before {what}: {time.monotonic() - t0:.1f} s")


# -- /proc ---------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes (0 if the process is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as fh:
            return {k: int(v) for k, v in (line.split(":") for line in fh)}
    except (OSError, ValueError):
        return {}


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return sorted(out)


class RssSampler:
    """Samples VmRSS of the watched processes every ``interval`` seconds (peak per pid);
    ``pids`` is called each time, so recycled gunicorn workers are followed."""

    def __init__(self, pids: Callable[[], dict[int, str]], interval: float = 0.25) -> None:
        self._pids = pids
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, role in self._pids().items():
                rss = proc_status(pid)["VmRSS"]  # 0 if it vanished since the listing
                self.role[pid] = role
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the pieces ------------------------------------------------------------------------------
def start_sshd() -> Any:
    """The private OpenSSH server of the tests (tests/plugins/sshd.py), stopped at clean-up."""
    from tests.plugins import sshd as sshd_mod

    binary = sshd_mod._find_sshd()
    if binary is None:
        raise RuntimeError("OpenSSH server (/usr/sbin/sshd) is not installed (apt-get install openssh-server)")
    server = sshd_mod.PrivateSshd(binary)
    on_cleanup(server.stop, after_processes=True)  # after our processes, so their SSH sessions end first
    try:
        return server.start()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pytest.fail's Failed is a BaseException
        raise RuntimeError(f"private sshd did not start: {exc}") from None


def write_attachment(path: Path, size: int) -> str:
    """``size`` random bytes (os.urandom in 4 MiB pieces) to ``path``; returns the SHA-256."""
    digest = hashlib.sha256()
    block = 4 * MIB
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = os.urandom(min(block, left))
            digest.update(piece)
            fh.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string here


def write_config(path: Path, *, data_dir: Path, ep: Any, threads: int) -> None:
    root = f"{ep.remote_root.rstrip('/')}/{SUB}"
    path.write_text(f"""# written by bench/sftp_large.py
[node]
id = "prefecture"
name = "州人民政府办公室"
units = [{toml_str(PREFECTURE)}]
data_dir = {toml_str(str(data_dir))}

[database]
url = {toml_str(f"sqlite:///{data_dir / 'gateway.db'}")}

[worker]
threads = {threads}
idle_sleep = 0.05
lease_seconds = 7200
poll_interval = 3600

[worker.retry]
max_attempts = 3
base_delay = 1.0
max_delay = 5.0

[adapters.{ADAPTER}]
type = "sftp"
host = {toml_str(ep.host)}
port = {ep.port}
username = {toml_str(ep.username)}
private_key_file = {toml_str(str(ep.client_key_path))}
host_key = {toml_str(ep.host_key_line)}
root = {toml_str(root)}
connect_timeout = 10
so_timeout = 300

[[routes]]
subsystem = "documents"
units = [{toml_str(COUNTY_A)}]
adapter = {toml_str(ADAPTER)}
""", encoding="utf-8")


class Api:
    def __init__(self, conf: Path, *, workers: int, threads: int | None, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / "gunicorn.log"
        gunicorn = VENV_BIN / "gunicorn"
        if not gunicorn.exists():
            gunicorn = Path(shutil.which("gunicorn") or "gunicorn")
        env = {"GATEWAY_CONFIG": str(conf), "GATEWAY_BIND": f"127.0.0.1:{self.port}",
               "GATEWAY_WORKERS": str(workers), "PYTHONUNBUFFERED": "1"}
        if threads:
            env["GATEWAY_THREADS"] = str(threads)
        self.workers = workers
        self.proc = spawn([str(gunicorn), "-c", str(GUNICORN_CONF), "gateway.app:create_app()"],
                          log_file=self.log, env=env)

    def wait_ready(self, timeout: float = 90) -> None:
        import requests

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {tail(self.log)}")
            try:
                return requests.get(self.url + "/healthz", timeout=2).ok
            except requests.RequestException:
                return False

        wait_for(up, timeout, f"gunicorn on {self.url}")
        wait_for(lambda: len(self.worker_pids()) >= self.workers, 30, "the gunicorn workers")

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid) if self.proc.poll() is None else []


def start_worker(conf: Path, logdir: Path) -> tuple[subprocess.Popen, Path]:
    log_file = logdir / "worker.log"
    p = spawn([PY, "-m", "gateway.cli", "--config", str(conf), "worker"], log_file=log_file,
              env={"PYTHONUNBUFFERED": "1"})

    def running() -> bool:
        if p.poll() is not None:
            raise RuntimeError(f"gateway worker exited: {tail(log_file)}")
        return "running" in tail(log_file, 100_000)

    wait_for(running, 90, "gateway worker to report running")
    return p, log_file


def upload(url: str, key: str, path: Path) -> dict[str, Any]:
    import requests

    with open(path, "rb") as fh:  # a file object: requests streams it with a Content-Length
        r = requests.post(f"{url}/api/v1/blobs", data=fh, timeout=(10, 1800),
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    if r.status_code != 201:
        raise RuntimeError(f"blob upload answered {r.status_code}: {r.text[:500]}")
    return r.json()


def post_document(url: str, key: str, body_sha: str, att_sha: str) -> str:
    import requests

    doc = {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
           "doc_number": "州政办发〔2026〕37号", "title": "关于报送2026年冬季值班视频会议录像资料的通知",
           "urgency": "平件", "written_date": "2026年11月20日",
           "recipients": [{"unit": COUNTY_A, "copy_type": "主送"}],
           "body": {"sha256": body_sha, "name": "正文.ofd", "media_type": "application/ofd"},
           "attachments": [{"sha256": att_sha, "name": "附件1：值班视频会议录像.bin",
                            "media_type": "application/octet-stream"}]}
    r = requests.post(f"{url}/api/v1/documents", json=doc, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"bench-{uuid.uuid4()}"})
    if r.status_code != 202:
        raise RuntimeError(f"document answered {r.status_code}: {r.text[:500]}")
    return r.json()["id"]


def watch_delivery(db_path: Path, message_id: str, final: Path, *, worker: subprocess.Popen, worker_log: Path,
                   timeout: float) -> dict[str, float]:
    """Times (monotonic) of: claimed (outbox row, polled every 20 ms), .part first seen,
    final name seen, .ok seen (inbox polled every 5 ms, every 10 ms once .part is there).
    Raises if the attempt fails or the worker dies."""
    part, ok = Path(f"{final}.part"), Path(f"{final}.ok")
    t: dict[str, float] = {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None, timeout=5)
    q = ("SELECT o.state, o.attempts, o.last_error FROM outbox o JOIN deliveries d ON o.delivery_id = d.id "
         "WHERE d.message_id = ? AND o.kind = 'deliver'")
    deadline = time.monotonic() + timeout
    next_db = next_progress = 0.0
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"no {ok.name} after {timeout:.0f} s; worker log: {tail(worker_log)}")
            if "part" not in t and part.exists():
                t["part"] = now
            if "final" not in t and final.exists():
                t["final"] = now
            if ok.exists():
                t["ok"] = now
                t.setdefault("final", now)
                break
            if now >= next_db:
                # 20 ms until the claim is seen; then only failures are looked for, rarely,
                # so the watcher takes no CPU worth mentioning from the worker and sshd
                next_db = now + (0.02 if "claimed" not in t else 0.25)
                row = conn.execute(q, (message_id,)).fetchone()
                if row is not None:
                    state, attempts, err = row
                    if state != "pending" and "claimed" not in t:
                        t["claimed"] = now
                    if attempts and state != "done":
                        raise RuntimeError(f"the delivery attempt failed ({state}): {err}")
                if worker.poll() is not None:
                    raise RuntimeError(f"the gateway worker exited: {tail(worker_log)}")
            if now >= next_progress:
                if next_progress and "part" in t:
                    try:
                        log(f"  … {part.stat().st_size / MB:,.0f} MB of .part written, "
                            f"{now - t['part']:.0f} s")
                    except FileNotFoundError:
                        pass
                next_progress = now + 5.0
            time.sleep(0.005 if "part" not in t else 0.01)
    finally:
        conn.close()
    return t


def direct_put(ep: Any, src: Path, remote_path: str, *, nodelay: bool) -> dict[str, Any]:
    """``SFTPClient.put`` with paramiko defaults on a new connection; timed from TCP connect."""
    import paramiko

    from adapters.sftp import parse_public_key

    host_key = parse_public_key(ep.host_key_line)
    pkey = paramiko.PKey.from_path(ep.client_key_path)
    size = src.stat().st_size
    t0 = time.monotonic()
    sock = socket.create_connection((ep.host, ep.port), timeout=10)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    try:
        transport.connect(hostkey=host_key, username=ep.username, pkey=pkey)
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        t1 = time.monotonic()
        attrs = sftp.put(str(src), remote_path)  # confirm=True: stats the file afterwards
        t2 = time.monotonic()
        cipher = f"{transport.local_cipher}/{transport.local_mac}"
        sftp.close()
    finally:
        transport.close()
    if attrs.st_size != size:
        raise RuntimeError(f"direct put: the server has {attrs.st_size} bytes, expected {size}")
    return {"total": t2 - t0, "transfer": t2 - t1, "connect": t1 - t0, "size": size, "cipher": cipher,
            "rate": size / (t2 - t0), "transfer_rate": size / (t2 - t1)}


def check_archive(path: Path, attachment_size: int) -> None:
    """Cheap sanity checks of the delivered archive (header, tail, plausible size)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(200)
        fh.seek(max(0, size - 200))
        end = fh.read()
    if not head.startswith(b'<?xml version="1.0" encoding="GB18030"?>'):
        raise RuntimeError(f"{path.name}: not a GB18030 archive: {head[:80]!r}")
    if not end.rstrip().endswith(b"</archive>"):
        raise RuntimeError(f"{path.name}: does not end with </archive>: {end[-80:]!r}")
    b64 = 4 * ((attachment_size + 2) // 3)
    if not b64 < size < b64 + 64 * 1024:
        raise RuntimeError(f"{path.name}: {size} bytes is implausible for {attachment_size} attachment bytes")


# -- main ------------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> int:
    from adapters.base import remote_ref

    size = (a.size_mb if a.size_mb is not None else (100 if a.quick else 1024)) * MIB
    plain_runs = a.baseline_runs or 2
    t_begin = time.monotonic()
    tmp = tempdir("sftp-large")
    log(f"sftp_large: {size / MIB:g} MiB attachment; temp {tmp}; {shutil.disk_usage(tmp).free / 1e9:.0f} GB free")

    t0 = time.monotonic()
    att = tmp / "attachment.bin"
    att_sha = write_attachment(att, size)
    body = tmp / "body.ofd"
    body.write_bytes(b"%OFD-1.0\n" + "关于报送2026年冬季值班视频会议录像资料的通知 正文".encode() * 200)
    log(f"attachment written ({size / MB:,.0f} MB) in {time.monotonic() - t0:.1f} s")

    ep = start_sshd()
    data_root = Path(ep.data_root)
    inbox = data_root / SUB / COUNTY_A / "inbox"
    inbox.mkdir(parents=True)  # the legacy system's folder: the adapter never creates it
    bench_dir = data_root / SUB / "bench"
    bench_dir.mkdir()
    log(f"private sshd on {ep.host}:{ep.port}, data root {data_root}")

    conf = tmp / "node.toml"
    data_dir = tmp / "var"
    write_config(conf, data_dir=data_dir, ep=ep, threads=a.worker_threads)
    node, key = prepare_node(conf, "基准测试 sftp_large")  # schema upgrade, an API key with every scope
    node.close()
    api = Api(conf, workers=a.workers, threads=a.threads, logdir=tmp)
    worker, worker_log = start_worker(conf, tmp)
    api.wait_ready()
    gw_pids = api.worker_pids()
    log(f"gunicorn master {api.proc.pid}, workers {gw_pids}; gateway worker {worker.pid}")

    listed = {"at": 0.0, "pids": gw_pids}

    def watched() -> dict[int, str]:
        # re-list gunicorn's workers (a /proc scan, ~3 ms) only every 5 s
        if time.monotonic() - listed["at"] > 5.0:
            listed["pids"], listed["at"] = api.worker_pids(), time.monotonic()
        out = {pid: "api" for pid in listed["pids"]}
        if worker.poll() is None:
            out[worker.pid] = "worker"
        return out

    idle = {pid: proc_status(pid) for pid in watched()}
    log("idle RSS: " + ", ".join(f"{role} {pid} {idle[pid]['VmRSS'] / MB:.0f} MB"
                                 for pid, role in watched().items() if pid in idle))
    sampler = RssSampler(watched).start()
    on_cleanup(sampler.stop, after_processes=True)

    # 1. the gateway path
    io_before = {pid: proc_io(pid).get("wchar", 0) for pid in api.worker_pids()}
    synced("the upload")
    t0 = time.monotonic()
    res = upload(api.url, key, att)
    t_up = time.monotonic() - t0
    if res["sha256"] != att_sha or res["size"] != size:
        raise RuntimeError(f"upload answered {res}, expected sha256 {att_sha} size {size}")
    body_sha = upload(api.url, key, body)["sha256"]
    io_after = {pid: proc_io(pid).get("wchar", 0) for pid in api.worker_pids()}
    receivers = [pid for pid in io_after if io_after[pid] - io_before.get(pid, 0) >= size]
    log(f"upload: {size / MB:,.0f} MB in {t_up:.1f} s ({size / MB / t_up:.1f} MB/s incl. fsync), "
        f"received by gunicorn worker {receivers or '?'}")

    synced("the delivery")
    t0 = time.monotonic()
    mid = post_document(api.url, key, body_sha, res["sha256"])
    t_accepted = time.monotonic()
    final = inbox / f"GW_{remote_ref(mid, COUNTY_A)}.xml"
    log(f"document {mid} accepted in {(t_accepted - t0) * 1000:.0f} ms; watching {final.name}")
    t = watch_delivery(data_dir / "gateway.db", mid, final, worker=worker, worker_log=worker_log,
                       timeout=max(600.0, size / (2 * MB)))
    hwm = {pid: proc_status(pid)["VmHWM"] for pid in watched()}
    roles = watched()
    sampler.stop()
    archive_size = final.stat().st_size
    check_archive(final, size)
    if "claimed" not in t:  # claimed and delivered between two 20 ms polls: impossible at this size
        raise RuntimeError("never saw the outbox row claimed")
    start = min(t["claimed"], t.get("part", t["claimed"]))
    gw_time = t["ok"] - start
    gw_rate = archive_size / gw_time
    att_rate = size / gw_time
    xfer = t["ok"] - t["part"] if "part" in t else float("nan")
    log(f"gateway: archive {archive_size / MB:,.1f} MB; accept→claim {(t['claimed'] - t_accepted) * 1000:.0f} ms, "
        f"claim→.part {(t.get('part', start) - start) * 1000:.0f} ms, .part→.ok {xfer:.2f} s, "
        f"claim→.ok {gw_time:.2f} s: {gw_rate / MB:.1f} MB/s of archive, {att_rate / MB:.1f} MB/s of attachment "
        f"(transfer only .part→.ok: {archive_size / xfer / MB:.1f} MB/s)")
    for pid, role in sorted(roles.items(), key=lambda x: x[1]):
        mark = " (received the upload)" if pid in receivers else ""
        log(f"  {role} pid {pid}{mark}: VmHWM {hwm[pid] / MB:.1f} MB, sampled VmRSS peak "
            f"{sampler.peak.get(pid, 0) / MB:.1f} MB, idle VmRSS {idle.get(pid, {}).get('VmRSS', 0) / MB:.1f} MB")
    api_pids = [p for p, r in roles.items() if r == "api"]
    api_peak = max(hwm[p] for p in api_pids)
    worker_peak = hwm.get(worker.pid, 0)
    if not api_pids or not worker_peak:
        raise RuntimeError("could not read the gateway's memory figures")

    # 2. the baselines: the same bytes with paramiko's SFTPClient.put to the same server
    remote_bench = f"{ep.remote_root.rstrip('/')}/{SUB}/bench"
    plain: list[dict[str, Any]] = []
    nodelay: dict[str, Any] | None = None
    order = ["plain", "nodelay"] + ["plain"] * (plain_runs - 1)
    for i, kind in enumerate(order):
        name = f"direct-{i}-{kind}.bin"
        synced(f"direct put {i + 1}/{len(order)}")
        r = direct_put(ep, final, f"{remote_bench}/{name}", nodelay=(kind == "nodelay"))
        (bench_dir / name).unlink()
        log(f"direct put ({'TCP_NODELAY' if kind == 'nodelay' else 'paramiko defaults'}, {r['cipher']}): "
            f"{r['size'] / MB:,.1f} MB in {r['total']:.2f} s = {r['rate'] / MB:.1f} MB/s "
            f"(connect {r['connect'] * 1000:.0f} ms; transfer only {r['transfer_rate'] / MB:.1f} MB/s)")
        if kind == "plain":
            plain.append(r)
        else:
            nodelay = r
    assert nodelay is not None
    direct_rate = sum(r["rate"] for r in plain) / len(plain)
    direct_xfer = sum(r["transfer_rate"] for r in plain) / len(plain)
    ratio = gw_rate / direct_rate
    log(f"transfer-only ratio (.part→.ok vs put after connect): {archive_size / xfer / direct_xfer:.2f}")

    rate_ok = ratio >= RATIO_TARGET
    rss_ok = api_peak / MB < RSS_TARGET_MB and worker_peak / MB < RSS_TARGET_MB
    plain_note = f"mean of {len(plain)}" if len(plain) > 1 else "1 run"
    log(f"total run time {time.monotonic() - t_begin:.0f} s")
    print(f"sftp_large: {size / MIB:g} MiB attachment, archive {archive_size / MIB:.0f} MiB; "
          f"gateway {gw_rate / MB:.1f} MB/s ({att_rate / MB:.1f} MB/s of attachment, claim→.ok {gw_time:.1f} s), "
          f"direct put {direct_rate / MB:.1f} MB/s ({plain_note}), direct put TCP_NODELAY "
          f"{nodelay['rate'] / MB:.1f} MB/s (ratio {ratio:.2f}, target >= {RATIO_TARGET}) {'PASS' if rate_ok else 'FAIL'}; "
          f"peak RSS api {api_peak / MB:.0f} MB, worker {worker_peak / MB:.0f} MB "
          f"(target < {RSS_TARGET_MB:.0f} MB) {'PASS' if rss_ok else 'FAIL'}", flush=True)
    return 0 if rate_ok and rss_ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 MiB attachment (a smoke check, < 60 s)")
    ap.add_argument("--size-mb", type=int, help="attachment size in MiB (default 1024, --quick 100)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers (GATEWAY_WORKERS, default 2)")
    ap.add_argument("--threads", type=int, help="gunicorn threads per worker (GATEWAY_THREADS; default: the file's)")
    ap.add_argument("--worker-threads", type=int, default=2, help="gateway worker threads (default 2)")
    ap.add_argument("--baseline-runs", type=int, help="plain direct puts, before and after the TCP_NODELAY one (default 2)")
    a = ap.parse_args()
    if a.size_mb is not None and a.size_mb <= 0:
        ap.error("--size-mb must be positive")
    install_cleanup()
    code = 2
    try:
        code = run(a)
    except SystemExit as exc:  # SIGINT / SIGTERM (see _common.install_cleanup)
        log(f"interrupted (exit {exc.code}); cleaning up")
        raise
    except Exception as exc:  # noqa: BLE001
        log(f"FAILED: {type(exc).__name__}: {exc}")
        print(f"sftp_large: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        code = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()
    sys.exit(code)


if __name__ == "__main__":
    main()
