"""PostgreSQL for the tests: a real, private server, never a mock and never skipped.

``tests/run`` starts a private cluster on 127.0.0.1 and exports ``GATEWAY_TEST_DATABASE_URL``.
When pytest is run bare (``.venv/bin/pytest``) the ``postgres_url`` fixture starts one the same
way for the session. Tests take ``database_url`` and run twice, on SQLite and on PostgreSQL,
each time on a fresh, empty database.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

ENV_VAR = "GATEWAY_TEST_DATABASE_URL"
PG_USER = "gwtest"  # unprivileged owner of the cluster when running as root (initdb refuses root)
PG_DB = "gateway_test"


def _pg_bin() -> Path | None:
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: [int(x) if x.isdigit() else x for x in Path(d).parent.name.split(".")],
    )
    for d in reversed(dirs):
        if os.access(f"{d}/initdb", os.X_OK) and os.access(f"{d}/pg_ctl", os.X_OK):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """initdb + pg_ctl in a temp dir, listening on 127.0.0.1 only, trust auth, no fsync
    (``durable``: PostgreSQL's own defaults, fsync and synchronous_commit on, for the tests
    that crash it)."""

    def __init__(self, pg_bin: Path, durable: bool = False) -> None:
        self.pg_bin = pg_bin
        self.durable = durable
        self.as_root = os.geteuid() == 0
        self.tmp = Path(tempfile.mkdtemp(prefix="gwtest-pg."))
        self.data = self.tmp / "data"
        self.port = 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, cwd=self.tmp, capture_output=True, text=True)

    def _check(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode != 0:
            log = self.tmp / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{tail}")

    def start(self) -> str:
        (self.tmp / "sock").mkdir()
        if self.as_root:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--user-group", "--no-create-home",
                     "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_USER],
                    check=False, capture_output=True,
                )
                pwd.getpwnam(PG_USER)  # KeyError here means useradd really failed
            subprocess.run(["chown", "-R", f"{PG_USER}:", str(self.tmp)], check=True)
        self._check("initdb", self._run(
            str(self.pg_bin / "initdb"), "-D", str(self.data), "-U", PG_USER, "-E", "UTF8",
            "--locale=C", "-A", "trust", "--no-sync",
        ))
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.tmp / 'sock'}'\n"
                + ("" if self.durable else "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
                + "max_connections = 200\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost  all all 127.0.0.1/32 trust\n"
        )
        for attempt in range(3):
            self.port = _free_port()
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                break
            self._stop_server()  # in case it came up after pg_ctl gave up waiting
            if attempt == 2:
                self._check("pg_ctl start", proc)
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DB)))
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{PG_DB}"

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(self.pg_bin / "pg_ctl"), "-D", str(self.data), *args)

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        return self._pg_ctl("-l", str(self.tmp / "server.log"), "-o", f"-p {self.port}", "-w", "-t", "60", "start")

    def crash(self) -> None:
        """Stop the server the way a crash would: every server process quits at once, without
        a checkpoint and without writing out what sits in its shared buffers (WAL buffers
        included); the next start recovers from the WAL on disk."""
        self._check("pg_ctl stop -m immediate", self._pg_ctl("-m", "immediate", "-w", "stop"))

    def start_again(self) -> None:
        """Start the server after :meth:`crash`, on the same port (crash recovery)."""
        self._check("pg_ctl start", self._pg_ctl_start())

    def _stop_server(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        self._stop_server()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of the session's PostgreSQL database (the cluster of tests/run, or our own)."""
    url = os.environ.get(ENV_VAR)
    if url:
        yield url
        return
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.fail(
            f"PostgreSQL server binaries (initdb, pg_ctl) not found and {ENV_VAR} is not set: "
            "run tests/run, which installs PostgreSQL and starts a private cluster",
            pytrace=False,
        )
    cluster = PrivateCluster(pg_bin)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _libpq(url: URL) -> str:
    """SQLAlchemy URL -> libpq URI for psycopg.connect."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgresql"],
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for this test as a SQLAlchemy URL string; runs on both backends."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    session_url = make_url(request.getfixturevalue("postgres_url"))
    name = f"gw_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_libpq(session_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield session_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(session_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
