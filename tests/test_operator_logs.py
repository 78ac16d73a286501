"""The node's own log lines reach the operator: the INFO lines docs/operating.md points to
(``gateway.scheduler`` and the like), with time, level and logger name, on stderr."""
from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway import logs


@contextmanager
def bare_logging() -> Iterator[logging.Logger]:
    """Logging as a fresh process has it: no handler on the root logger (pytest's own
    capture handlers are set aside meanwhile)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in logs.OURS}
    root.handlers = []
    try:
        yield root
    finally:
        for h in root.handlers:
            h.close()
        root.handlers, root.level = handlers, level
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def test_setup_logs_the_gateways_info_with_time_level_and_name_but_not_other_libraries_info(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with bare_logging():
        logs.setup()
        logging.getLogger("gateway.scheduler").info("job receipts (schedule): ok")
        logging.getLogger("adapters.sftp").info("sftp drop: delivered GW_x.xml")
        logging.getLogger("paramiko.transport").info("Connected (version 2.0)")
        logging.getLogger("zeep.transports").warning("a library warning")
    err = out.getvalue().splitlines()
    assert len(err) == 3, err
    assert "[INFO] gateway.scheduler: job receipts (schedule): ok" in err[0]
    assert err[0].startswith("[20") and f"[{os.getpid()}]" in err[0]
    assert "[INFO] adapters.sftp: sftp drop: delivered GW_x.xml" in err[1]
    assert "[WARNING] zeep.transports: a library warning" in err[2]


def test_a_message_cannot_forge_a_line_but_a_traceback_keeps_its_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with bare_logging():
        logs.setup()
        log = logging.getLogger("adapters.sftp")
        log.info("sftp drop: %s changed", "HZ_x.xml\n[2026-11-28 00:00:00 +0000] [1] [INFO] forged\x1b[2J")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("poll failed")
    err = out.getvalue().splitlines()
    assert "HZ_x.xml\\n[2026-11-28 00:00:00 +0000] [1] [INFO] forged\\x1b[2J changed" in err[0]
    assert err[1].endswith("[ERROR] adapters.sftp: poll failed") and err[2] == "Traceback (most recent call last):"
    assert err[-1] == "ValueError: boom"


def test_a_librarys_traceback_of_a_database_outage_is_one_line(monkeypatch, tmp_path):
    """SQLAlchemy's pool logs a traceback for each connection it cannot reset while the
    database restarts: one line each instead, naming the error (gateway.db.outage)."""
    import sqlite3

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with bare_logging():
        logs.setup()
        try:
            sqlite3.connect(tmp_path / "no-such-folder" / "gateway.db")  # SQLITE_CANTOPEN: the database is away
        except sqlite3.OperationalError:
            logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception during reset or similar",
                                                                       exc_info=True)
        try:
            raise ValueError("boom")
        except ValueError:  # anything else keeps its traceback
            logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("something else", exc_info=True)
    err = out.getvalue().splitlines()
    assert err[0].endswith("[ERROR] sqlalchemy.pool.impl.QueuePool: Exception during reset or similar: "
                           "OperationalError: unable to open database file"), err
    assert err[1].endswith("something else") and err[2] == "Traceback (most recent call last):"


def test_setup_leaves_a_logging_configured_already_alone():
    with bare_logging() as root:
        mine = logging.NullHandler()
        root.addHandler(mine)
        logs.setup()
        assert root.handlers == [mine]


def test_gateway_worker_logs_that_its_scheduler_started(tmp_path: Path):
    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "county-a"\ndata_dir = "{tmp_path / "var"}"\n'
                    '[schedules.blobs]\ncron = "30 3 * * *"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    up = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(conf), "db", "upgrade"], cwd=tmp_path,
                        capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 0, up.stderr
    p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(conf), "worker"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    assert p.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None and not any("scheduler " in x for x in lines):
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        reader.join(timeout=10)
    err = "".join(lines)
    assert "[INFO] gateway.scheduler: scheduler " in err and "blobs (30 3 * * *)" in err, err


def test_gunicorn_settings_set_up_the_nodes_log_lines():
    root = Path(__file__).resolve().parent.parent
    code = ("import logging, runpy; runpy.run_path('config/gunicorn.conf.py'); "
            "logging.getLogger('gateway.scheduler').info('scheduler x started')")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[INFO] gateway.scheduler: scheduler x started" in r.stderr, r.stderr
