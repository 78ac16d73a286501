"""Scheduled jobs: configuration checks, ``gateway sync``, the per-job lock, and one run per
tick with two real scheduler processes on one database (SQLite and PostgreSQL)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from adapters.base import Adapter, DeliveryResult, Health, register as register_adapter
from gateway import audit, migrate, scheduler
from gateway import config as config_mod
from gateway.cli import main
from gateway.config import ConfigError, ScheduleConfig
from gateway.models import AuditEntry, JobRun
from gateway.node import Node
from gateway.runtime import Runtime
from tests.plugins.gatewaynode import node_config

ROOT = Path(__file__).resolve().parent.parent


@register_adapter("test-broken-poll")
class BrokenPollAdapter(Adapter):
    """A legacy system that cannot be reached when polled."""

    def deliver(self, delivery):  # type: ignore[no-untyped-def]
        return DeliveryResult(remote_id="never")

    def poll(self):  # type: ignore[no-untyped-def]
        raise ConnectionError("connection refused")

    def check(self) -> Health:
        return Health(False, "down")


@pytest.fixture
def test_jobs():  # type: ignore[no-untyped-def]
    """Register throwaway jobs for one test: ``test_jobs(name, fn)``."""
    names: list[str] = []

    def add(name: str, fn: Any) -> None:
        scheduler.register(name, fn, help=f"test job {name}")
        names.append(name)

    yield add
    for name in names:
        scheduler.unregister(name)


def _toml(tmp_path: Path, database_url: str, body: str = "") -> Path:
    p = tmp_path / "node.toml"
    p.write_text(f'[node]\nid = "county-a"\ndata_dir = "{tmp_path / "var"}"\n'
                 f'[database]\nurl = "{database_url}"\n' + body, encoding="utf-8")
    return p


def _runs(node: Node, job: str) -> list[JobRun]:
    with node.db.sessions() as s:
        return list(s.scalars(select(JobRun).where(JobRun.job == job).order_by(JobRun.tick)))


def _audit(node: Node, obj: str) -> list[AuditEntry]:
    with node.db.sessions() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.object == obj).order_by(AuditEntry.seq)))


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize("body, key, expected", [
    ('[schedules.nope]\ncron = "*/5 * * * *"\n', "schedules.nope", "no job named nope; expected one of"),
    ('[schedules.receipts]\ncron = "*/5 * *"\n', "schedules.receipts.cron", "expected 5 fields"),
    ('[schedules.receipts]\ncron = "61 * * * *"\n', "schedules.receipts.cron", "not a valid cron expression"),
    ('[schedules.receipts]\ncron = "0 0 31 2 *"\n', "schedules.receipts.cron", "not a valid cron expression"),
    ('[schedules.receipts]\ncron = "*/5 * * * *"\ntimezone = "Mars/Olympus_Mons"\n',
     "schedules.receipts.timezone", "is not a time zone; expected an IANA time zone name"),
])
def test_schedule_errors_name_the_file_the_key_and_the_expectation(tmp_path, body, key, expected):
    conf = _toml(tmp_path, f"sqlite:///{tmp_path}/gateway.db", body)
    cfg = config_mod.load(conf)
    with pytest.raises(ConfigError) as err:
        scheduler.validate(cfg)
    assert f"{conf}: {key}: " in str(err.value)
    assert expected in str(err.value)
    if "no job named" in expected:
        assert "receipts" in str(err.value)  # the jobs there are
    # the same check guards the scheduler and `gateway sync`
    node = Node(cfg)
    with pytest.raises(ConfigError):
        scheduler.Scheduler(node)
    node.close()
    r = CliRunner().invoke(main, ["-c", str(conf), "sync", "receipts"])
    assert r.exit_code == 1 and f"{conf}: {key}: " in r.output and "Traceback" not in r.output


def test_good_schedules_pass_and_ticks_follow_the_time_zone(tmp_path):
    cfg = config_mod.from_mapping({"schedules": {
        "receipts": {"cron": "0 9 * * 1-5"},  # 09:00 China Standard Time on weekdays
    }}, source="test")
    scheduler.validate(cfg)
    s = scheduler._Schedule("receipts", cfg.schedules["receipts"], cfg.node.timezone)
    friday_noon_utc = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert s.next_after(friday_noon_utc) == datetime(2026, 1, 5, 1, 0, tzinfo=UTC)  # Monday 09:00 +08:00
    every_second = scheduler._Schedule("x", ScheduleConfig(cron="* * * * * *", timezone="UTC"), "Asia/Shanghai")
    t = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert every_second.next_after(t) == t + timedelta(seconds=1)  # strictly after
    assert every_second.next_after(t + timedelta(microseconds=300)) == t + timedelta(seconds=1)


def test_a_schedule_is_read_in_the_node_time_zone_unless_it_names_its_own(tmp_path):
    """"Every day at 15:00" (the duty reports' hour) is 15:00 in [node] timezone, China by
    default, whatever the server's own TZ; a schedule that names a zone is read in that one."""
    china = datetime(2026, 11, 30, 7, 30, tzinfo=UTC)  # 15:30 in Beijing, the last day of the month
    for node_tz, own, expected in [
            (None, None, datetime(2026, 12, 1, 7, 0, tzinfo=UTC)),  # 15:00 +08:00 the next day
            ("UTC", None, datetime(2026, 11, 30, 15, 0, tzinfo=UTC)),
            ("UTC", "Asia/Shanghai", datetime(2026, 12, 1, 7, 0, tzinfo=UTC))]:
        cfg = config_mod.from_mapping({"node": {"timezone": node_tz} if node_tz else {}, "schedules": {
            "receipts": {"cron": "0 15 * * *", **({"timezone": own} if own else {})}}}, source="test")
        scheduler.validate(cfg)
        node = Node(cfg)
        try:
            [s] = scheduler.Scheduler(node).schedules.values()
        finally:
            node.close()
        assert s.next_after(china) == expected, (node_tz, own)
    conf = _toml(tmp_path, f"sqlite:///{tmp_path}/gateway.db",
                 '[schedules.receipts]\ncron = "0 15 * * *"\n').read_text(encoding="utf-8")
    path = tmp_path / "utc.toml"
    path.write_text(conf.replace("[node]\n", '[node]\ntimezone = "UTC"\n', 1), encoding="utf-8")
    migrate.upgrade(f"sqlite:///{tmp_path}/gateway.db")
    r = CliRunner().invoke(main, ["-c", str(path), "sync", "--list"])
    assert r.exit_code == 0, r.output
    assert "0 15 * * * (UTC)" in r.output


def test_runtime_runs_the_scheduler_only_where_the_worker_runs_and_a_schedule_is_enabled(tmp_path):
    url = f"sqlite:///{tmp_path}/gateway.db"
    on = node_config(tmp_path, url, schedules={"receipts": {"cron": "*/5 * * * *"}})
    no_worker = node_config(tmp_path, url, schedules={"receipts": {"cron": "*/5 * * * *"}},
                            worker={"enabled": False})
    disabled = node_config(tmp_path, url, schedules={"receipts": {"cron": "*/5 * * * *", "enabled": False}})
    for cfg, kwargs, expected in [(on, {}, True), (on, {"scheduler": False}, False), (no_worker, {}, False),
                                  (disabled, {}, False)]:
        node = Node(cfg)
        try:
            assert isinstance(Runtime(node, **kwargs).scheduler, scheduler.Scheduler) is expected
        finally:
            node.close()


def test_registry_last_registration_wins_and_names_are_checked(test_jobs):
    test_jobs("test-twice", lambda node: {"v": 1})
    test_jobs("test-twice", lambda node: {"v": 2})
    assert [j for j in scheduler.jobs() if j.name == "test-twice"][0].fn(None) == {"v": 2}
    assert "receipts" in [j.name for j in scheduler.jobs()]
    with pytest.raises(ValueError):
        scheduler.register("Bad Name", lambda node: {})
    with pytest.raises(scheduler.UnknownJob, match="no job named nope; expected one of .*receipts"):
        scheduler.get("nope")


# -- gateway sync --------------------------------------------------------------------------
def test_sync_receipts_records_a_manual_run_and_an_audit_entry(tmp_path, database_url):
    conf = _toml(tmp_path, database_url, '[adapters.rec]\ntype = "recording"\n'
                                         '[adapters.down]\ntype = "test-broken-poll"\n'
                                         '[schedules.receipts]\ncron = "*/10 * * * *"\n')
    migrate.upgrade(database_url)
    r = CliRunner().invoke(main, ["-c", str(conf), "sync", "receipts"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    # one unreachable adapter shows in the detail; the run itself is ok
    assert json.loads(lines[0]) == {"job": "receipts", "outcome": "ok",
                                    "detail": {"down": {"error": 1}, "rec": {}}}
    node = Node(config_mod.load(conf))
    try:
        [run] = _runs(node, "receipts")
        assert (run.trigger, run.outcome, run.detail) == ("manual", "ok", {"down": {"error": 1}, "rec": {}})
        assert run.finished_at is not None and run.finished_at >= run.started_at
        assert run.tick.tzinfo is not None
        [entry] = _audit(node, "job:receipts")
        assert (entry.action, entry.outcome) == ("job.run", "ok") and entry.actor.startswith("cli:")
        assert json.loads(entry.detail)["run"] == run.id
        with node.db.sessions() as s:
            assert audit.verify(s).ok

        listed = CliRunner().invoke(main, ["-c", str(conf), "sync", "--list"])
        assert listed.exit_code == 0, listed.output
        line = [ln for ln in listed.stdout.splitlines() if ln.startswith("receipts\t")][0]
        assert "*/10 * * * * (Asia/Shanghai)" in line and "last run " in line and line.split("\t")[2].endswith(" ok")
    finally:
        node.close()


def test_a_failing_job_is_recorded_as_failed_and_exits_1_without_a_traceback(tmp_path, database_url, test_jobs):
    def explode(node: Node) -> dict[str, Any]:
        raise RuntimeError("the legacy directory service said no")

    test_jobs("test-explode", explode)
    conf = _toml(tmp_path, database_url)
    migrate.upgrade(database_url)
    r = CliRunner().invoke(main, ["-c", str(conf), "sync", "test-explode"])
    assert r.exit_code == 1
    assert "Traceback" not in r.stdout
    [line] = r.stdout.strip().splitlines()
    assert json.loads(line) == {"job": "test-explode", "outcome": "failed", "detail": {
        "error": "RuntimeError", "message": "the legacy directory service said no"}}
    node = Node(config_mod.load(conf))
    try:
        [run] = _runs(node, "test-explode")
        assert (run.trigger, run.outcome) == ("manual", "failed")
        assert "Traceback" not in json.dumps(run.detail)
        [entry] = _audit(node, "job:test-explode")
        assert entry.outcome == "failed" and "said no" in entry.detail

        listed = CliRunner().invoke(main, ["-c", str(conf), "sync", "--list"])
        line = [ln for ln in listed.stdout.splitlines() if ln.startswith("test-explode\t")][0]
        assert line.split("\t")[1] == "—" and line.split("\t")[2].endswith(" failed")
    finally:
        node.close()


def test_sync_of_an_unknown_job_is_a_clear_error_listing_the_jobs(tmp_path):
    conf = _toml(tmp_path, f"sqlite:///{tmp_path}/gateway.db")
    r = CliRunner().invoke(main, ["-c", str(conf), "sync", "nope"])
    assert r.exit_code == 2
    assert "no job named 'nope'; expected one of" in r.output and "receipts" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["-c", str(conf), "sync"])
    assert r.exit_code == 2 and "give a JOB to run, or --list" in r.output


# -- the per-job lock ----------------------------------------------------------------------
def test_a_scheduled_run_is_skipped_while_another_run_of_the_job_holds_the_lock(tmp_path, database_url,
                                                                                test_jobs):
    started, release = threading.Event(), threading.Event()

    def slow(node: Node) -> dict[str, Any]:
        started.set()
        if not release.wait(120):
            raise TimeoutError("never released")
        return {"done": True}

    test_jobs("test-slow", slow)
    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    node, other = Node(cfg), Node(cfg)  # two engines: the lock is not shared by a connection or a file handle
    results: list[scheduler.RunResult] = []
    t = threading.Thread(target=lambda: results.append(scheduler.run_job(node, "test-slow", instance="one")))
    t.start()
    try:
        assert started.wait(60), "the manual run did not start"
        tick = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        skipped = scheduler.run_job(other, "test-slow", trigger="schedule", tick=tick, instance="two")
        assert (skipped.outcome, skipped.detail) == ("skipped", {"reason": "busy"})
        assert [r.trigger for r in _runs(other, "test-slow")] == ["manual"]  # nothing recorded
        assert _audit(other, "job:test-slow") == []

        busy = scheduler.run_job(other, "test-slow", trigger="manual", instance="two", wait=0.5)
        assert busy.outcome == "failed" and "already running" in busy.detail["message"]
    finally:
        release.set()
        t.join(60)
    assert [r.outcome for r in results] == ["ok"]

    ran = scheduler.run_job(other, "test-slow", trigger="schedule", tick=tick, instance="two")
    assert ran.outcome == "ok"
    again = scheduler.run_job(node, "test-slow", trigger="schedule", tick=tick, instance="one")
    assert (again.outcome, again.detail) == ("skipped", {"reason": "taken"})
    assert [(r.trigger, r.outcome) for r in _runs(node, "test-slow")] == [("manual", "ok"), ("schedule", "ok")]
    assert len(_audit(node, "job:test-slow")) == 2
    node.close()
    other.close()


def test_scheduler_starts_at_the_next_tick_yields_to_a_held_lock_and_stops_promptly(tmp_path, database_url,
                                                                                      test_jobs):
    test_jobs("test-every-second", lambda node: {"ok": True})
    cfg = node_config(tmp_path, database_url, schedules={"test-every-second": {"cron": "* * * * * *",
                                                                                "timezone": "UTC"}})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    started = datetime.now(UTC)
    sched = scheduler.Scheduler(node, instance_id="solo")
    sched.busy_patience = 0.3
    sched.start()
    try:
        def wait_for_runs(n: int) -> list[JobRun]:
            deadline = time.monotonic() + 90
            while len(runs := _runs(node, "test-every-second")) < n:
                assert time.monotonic() < deadline, f"fewer than {n} runs"
                time.sleep(0.1)
            return runs

        first = wait_for_runs(2)
        assert first[0].tick > started  # no replay
        with scheduler.job_lock(node, "test-every-second", wait=60):
            held = len(_runs(node, "test-every-second"))
            time.sleep(2.5)  # ticks come due; the scheduler may not run them while the lock is held
            assert len(_runs(node, "test-every-second")) == held
        wait_for_runs(held + 1)  # and it goes on afterwards
    finally:
        t0 = time.monotonic()
        sched.stop()
        assert time.monotonic() - t0 < 15
    rows = _runs(node, "test-every-second")
    assert {(r.trigger, r.outcome, r.instance) for r in rows} == {("schedule", "ok", "solo")}
    node.close()


# -- one run per tick across processes -----------------------------------------------------
CHILD = r"""
import json, os, sys, time
from pathlib import Path

from gateway import config as config_mod, scheduler
from gateway.node import Node

raw, attempts, stop_file, instance = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
scheduler.register("test-tick", lambda node: {"pid": os.getpid()}, "returns its process id")

real_run_job = scheduler.run_job

def run_job(*args, **kwargs):  # every attempt of this process, to its own file
    result = real_run_job(*args, **kwargs)
    with attempts.open("a") as f:
        f.write(json.dumps({"tick": result.tick.isoformat(), "outcome": result.outcome,
                            "reason": result.detail.get("reason")}) + "\n")
    return result

scheduler.run_job = run_job
node = Node(config_mod.from_mapping(raw, source="child"))
sched = scheduler.Scheduler(node, instance_id=instance).start()
Path(str(attempts) + ".ready").write_text("ready")
deadline = time.monotonic() + 300
while not stop_file.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
sched.stop()
node.close()
"""


def test_two_scheduler_processes_run_each_tick_once(tmp_path, database_url):
    migrate.upgrade(database_url)
    raw = {"node": {"id": "prefecture", "data_dir": str(tmp_path / "var")},
           "database": {"url": database_url},
           "schedules": {"test-tick": {"cron": "* * * * * *", "timezone": "UTC"}}}
    stop_file = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before_start = datetime.now(UTC)
    procs = {}
    for name in ("a", "b"):
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(raw), str(tmp_path / f"{name}.jsonl"), str(stop_file), name],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node = Node(config_mod.from_mapping(raw, source="test"))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{n}.jsonl.ready").exists() for n in procs):
            dead = [n for n, p in procs.items() if p.poll() is not None]
            assert not dead, f"scheduler process {dead[0]} exited: {procs[dead[0]].communicate()[1]}"
            assert time.monotonic() < deadline, "the scheduler processes did not start"
            time.sleep(0.1)
        both_running = datetime.now(UTC)
        time.sleep(6)
        # on a slow machine, wait (generously) until both ran together for several ticks
        deadline = time.monotonic() + 120
        while len([r for r in _runs(node, "test-tick") if r.tick > both_running]) < 6:
            assert time.monotonic() < deadline, "too few ticks ran"
            time.sleep(0.2)
    finally:
        stop_file.write_text("stop")
        outputs = {n: p.communicate(timeout=120) for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, f"process {n}: {outputs[n][1]}"

    rows = _runs(node, "test-tick")
    ticks = [r.tick for r in rows]
    assert len(ticks) == len(set(ticks)) >= 4
    assert {r.outcome for r in rows} == {"ok"} and {r.trigger for r in rows} == {"schedule"}
    assert {r.instance for r in rows} <= {"a", "b"}
    assert ticks[0] > before_start  # no replay of ticks before the schedulers started
    gaps = [(b - a).total_seconds() for a, b in zip(ticks, ticks[1:])]
    assert all(g == 1 for g in gaps[1:-1]), f"ticks missing in {[t.isoformat() for t in ticks]}"

    # both processes tried the same ticks; exactly one of them ran each
    attempts: dict[str, dict[datetime, set[str]]] = {}
    for n in procs:
        seen: dict[datetime, set[str]] = {}
        for line in (tmp_path / f"{n}.jsonl").read_text().splitlines():
            a = json.loads(line)
            seen.setdefault(datetime.fromisoformat(a["tick"]), set()).add(a["outcome"])
        attempts[n] = seen
    assert len(attempts["a"]) >= 3 and len(attempts["b"]) >= 3
    by_tick = {r.tick: r for r in rows}
    contested = set(attempts["a"]) & set(attempts["b"])
    assert len(contested) >= 3
    for tick in contested:
        winners = [n for n in procs if "ok" in attempts[n][tick]]
        assert winners == [by_tick[tick].instance], (tick, attempts["a"][tick], attempts["b"][tick])
    for n in procs:
        for tick, outcomes in attempts[n].items():
            assert outcomes <= {"ok", "skipped"}
            if "ok" in outcomes:
                assert by_tick[tick].instance == n
                assert by_tick[tick].detail["pid"] == procs[n].pid
    with node.db.sessions() as s:
        assert audit.verify(s).ok  # two processes appended to one chain
        assert s.scalar(select(AuditEntry.seq).order_by(AuditEntry.seq.desc()).limit(1)) == len(rows)
    node.close()


def test_a_run_left_running_by_a_dead_process_is_marked_abandoned_by_the_next_run(tmp_path, database_url):
    conf = _toml(tmp_path, database_url, '[adapters.rec]\ntype = "recording"\n')
    migrate.upgrade(database_url)
    node = Node(config_mod.load(conf))
    try:
        with node.db.begin() as s:  # what a process killed in the middle of a run leaves behind
            s.add(JobRun(job="receipts", tick=datetime(2026, 11, 26, 8, 0, tzinfo=UTC), trigger="schedule",
                         instance="gone:1234", outcome="running", detail={}))
        result = scheduler.run_job(node, "receipts", trigger="manual")
        assert result.outcome == "ok"
        runs = {r.instance: r for r in _runs(node, "receipts")}
        assert runs["gone:1234"].outcome == "failed" and runs["gone:1234"].detail["error"] == "Abandoned"
        assert runs["gone:1234"].finished_at is not None
        assert [e.outcome for e in _audit(node, "job:receipts")].count("abandoned") == 1
    finally:
        node.close()
