"""Soak: ``gateway serve`` (embedded default) under a steady mixed load for --minutes,
sampling every --interval s the RSS, fds and threads of each process of the node, its TCP
connections, and the sizes of the database, WAL, blob store, logs and simulator folders.

Load (--threads client threads, keep-alive sessions): upload a small body and an attachment
to /api/v1/blobs, send a document to one recipient behind each adapter (SOAP, SFTP, exchange
box) with a webhook key (a local receiver counts the webhooks), GET it, list, recall one in
ten, and send some bad requests (4xx). Not a test; progress on stderr; one final line on
stdout: documents sent, documents/s, and first-sample / last-sample figures.

    .venv/bin/python bench/soak.py --minutes 20 --csv /tmp/soak.csv
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

UNITS = {"soap": "1152230107CTPD8U2P", "sftp": "11522302GRALUMYP76", "box": "11522300QNNHM83X1E"}
SENDER = "11522300GDR9YB9550"


class _Hook(http.server.BaseHTTPRequestHandler):
    count = 0

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        _Hook.count += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


def _tree_size(p: Path) -> tuple[int, int]:
    size = files = 0
    if p.exists():
        for root, _dirs, names in os.walk(p):
            for n in names:
                try:
                    size += os.lstat(os.path.join(root, n)).st_size
                    files += 1
                except OSError:
                    pass
    return size, files


def _procs(root_pid: int) -> list[int]:
    """``root_pid`` and its descendants, parents first (gunicorn arbiter, then its worker)."""
    out = [root_pid]
    for pid in out:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids if int(k) not in out]
    return out


def _proc_stat(pid: int) -> tuple[int, int, int]:
    rss = threads = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0, 0, 0
    return rss, fds, threads


def _tcp(ports: dict[str, int]) -> dict[str, int]:
    out = subprocess.run(["ss", "-tanH"], capture_output=True, text=True).stdout.splitlines()
    res = {}
    for name, port in ports.items():
        res[name] = sum(1 for ln in out if f"127.0.0.1:{port} " in ln and "ESTAB" in ln)
    res["timewait"] = sum(1 for ln in out if "TIME-WAIT" in ln)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--interval", type=float, default=30)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--pause", type=float, default=0.05, help="seconds between a client's documents")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--dir", type=Path)
    a = ap.parse_args()
    import requests

    c.install_cleanup()

    work = a.dir or c.tempdir("soak")
    work.mkdir(parents=True, exist_ok=True)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
    port = c.free_port()
    log_path = work / "serve.log"
    p = c.spawn([str(c.VENV_BIN / "gateway"), "serve", "--bind", f"127.0.0.1:{port}"],
                cwd=work, log_file=log_path)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    else:
        raise SystemExit("gateway serve did not become ready")
    admin = (work / "var" / "bootstrap-api-key").read_text().strip()
    out = subprocess.run([str(c.VENV_BIN / "gateway"), "keys", "create", "--name", "soak",
                          "--scope", "documents:send", "--scope", "documents:read", "--scope", "documents:recall",
                          "--scope", "blobs:write", "--clearance", "机密", "--unit", SENDER,
                          "--webhook-url", hook_url], cwd=work, capture_output=True, text=True)
    key = next((w for w in out.stdout.split() if len(w) > 30), admin)
    c.log(f"key: {'soak' if key != admin else 'admin'} ({out.stderr.strip()[:200]})")
    stop = threading.Event()
    stats = {"docs": 0, "err": 0, "4xx": 0, "recall": 0, "get": 0, "list": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {key}"
        rnd = random.Random(i)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                body = os.urandom(rnd.randint(500, 4000))
                att = os.urandom(rnd.randint(200, 20000))
                shas = []
                for b in (body, att):
                    r = s.post(base + "/api/v1/blobs", data=b, headers={"Content-Type": "application/octet-stream"}, timeout=30)
                    r.raise_for_status()
                    shas.append(r.json()["sha256"])
                target = ["soap", "sftp", "box"][n % 3]
                doc = {"sender_unit": SENDER, "issuer": "州人民政府办公室", "doc_type": "通知",
                       "doc_number": f"州政办发〔2026〕{(i + 1) * 100000 + n}号", "title": f"关于测试的通知 {i}-{n}",
                       "urgency": "平件", "written_date": "2026年11月20日",
                       "recipients": [{"unit": UNITS[target], "copy_type": "主送"}],
                       "body": {"sha256": shas[0], "name": "正文.ofd"},
                       "attachments": [] if target == "soap" else [{"sha256": shas[1], "name": "附件1.pdf"}]}
                r = s.post(base + "/api/v1/documents", json=doc, headers={"Idempotency-Key": f"soak-{i}-{n}-{time.time()}"}, timeout=30)
                if r.status_code != 202:
                    c.log(f"send {r.status_code} {r.text[:300]}")
                    with lock:
                        stats["err"] += 1
                    time.sleep(1)
                    continue
                mid = r.json()["id"]
                with lock:
                    stats["docs"] += 1
                s.get(base + f"/api/v1/documents/{mid}", timeout=30).raise_for_status()
                with lock:
                    stats["get"] += 1
                if n % 5 == 0:
                    s.get(base + "/api/v1/documents?limit=20", timeout=30).raise_for_status()
                    with lock:
                        stats["list"] += 1
                if n % 10 == 0 and target == "soap":
                    r = s.post(base + f"/api/v1/documents/{mid}/recall", headers={"Idempotency-Key": f"rc-{mid}"}, timeout=30)
                    with lock:
                        stats["recall"] += 1
                if n % 4 == 0:  # bad requests
                    codes = [s.post(base + "/api/v1/documents", data="{not json", headers={"Content-Type": "application/json"}, timeout=30).status_code,
                             s.get(base + "/api/v1/documents/nonexistent-id", timeout=30).status_code,
                             requests.get(base + "/api/v1/documents", timeout=30).status_code,
                             s.post(base + "/api/v1/documents", json={"title": "x"}, timeout=30).status_code]
                    with lock:
                        stats["4xx"] += sum(1 for x in codes if 400 <= x < 500)
            except Exception as e:  # noqa: BLE001
                with lock:
                    stats["err"] += 1
                c.log(f"client {i}: {e!r}"[:300])
                time.sleep(1)
            time.sleep(a.pause)

    for i in range(a.threads):
        threading.Thread(target=client, args=(i,), daemon=True).start()
    var = work / "var"
    ports: dict[str, int] = {"api": port}
    rows = []
    t0 = time.monotonic()
    end = t0 + a.minutes * 60
    header = None
    if a.csv:
        a.csv.write_text("")
    while True:
        pids = _procs(p.pid)
        row: dict[str, object] = {"t": round(time.monotonic() - t0), "docs": stats["docs"], "err": stats["err"],
                                  "4xx": stats["4xx"], "hooks": _Hook.count}
        for j, pid in enumerate(pids):
            rss, fds, thr = _proc_stat(pid)
            row[f"p{j}_rss_kb"], row[f"p{j}_fds"], row[f"p{j}_thr"] = rss, fds, thr
        row.update({f"tcp_{k}": v for k, v in _tcp(ports).items()})
        row["tcp_estab_all"] = sum(1 for ln in subprocess.run(["ss", "-tanH", "state", "established"], capture_output=True, text=True).stdout.splitlines() if "127.0.0.1" in ln)
        for f in sorted(var.glob("*.db*")) + sorted(var.glob("*.sqlite*")):
            row[f.name] = f.stat().st_size
        for name in ("blobs", "simulators", "logs", "archive", "tmp"):
            size, files = _tree_size(var / name)
            row[f"{name}_bytes"], row[f"{name}_files"] = size, files
        row["var_bytes"], row["var_files"] = _tree_size(var)
        row["serve_log"] = log_path.stat().st_size
        rows.append(row)
        if a.csv:
            with open(a.csv, "a") as csvf:
                if header is None:
                    header = list(row)
                    csvf.write(",".join(header) + "\n")
                csvf.write(",".join(str(row.get(h, "")) for h in header) + "\n")
        c.log(json.dumps(row))
        if time.monotonic() >= end:
            break
        time.sleep(a.interval)
    stop.set()
    time.sleep(2)
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    dur = float(str(last["t"])) - float(str(first["t"])) or 1.0
    docs = int(str(last["docs"])) - int(str(first["docs"])) or 1
    rss_per_doc = (int(str(last.get("p1_rss_kb", 0))) - int(str(first.get("p1_rss_kb", 0)))) * 1024 / docs
    print(f"soak: {last['docs']} documents in {last['t']} s ({docs / dur:.2f}/s after warm-up), errors {last['err']}, "
          f"webhooks {last['hooks']}, RSS p0 {first.get('p0_rss_kb')}->{last.get('p0_rss_kb')} kB, "
          f"p1 {first.get('p1_rss_kb')}->{last.get('p1_rss_kb')} kB ({rss_per_doc:.0f} B/document), fds p1 {first.get('p1_fds')}->{last.get('p1_fds')}, "
          f"threads p1 {first.get('p1_thr')}->{last.get('p1_thr')}, var {first['var_bytes']}->{last['var_bytes']} bytes")
    c.cleanup()


if __name__ == "__main__":
    c.run(main)
