"""Scheduled jobs (``[schedules.JOB] cron = "…"``) and ``gateway sync JOB``.

A *job* is a function ``fn(node) -> dict`` registered by name (:func:`register`); its dict
becomes the ``detail`` of the run. Every run is recorded in ``job_runs`` and in the audit log.

Once per tick across instances: every instance computes the same ticks (croniter, in the
schedule's time zone, compared in UTC) and tries to run each one. Two things keep it to one:

* the row ``job_runs(job, tick)`` is UNIQUE and is inserted and committed *before* the job
  runs; an instance whose insert conflicts knows another one has the tick and skips it;
* a run holds a per-job lock for its whole duration (PostgreSQL: a session advisory lock on
  a dedicated connection; SQLite: ``flock`` on ``<data_dir>/job-<name>.lock``), so a manual
  run and a scheduled one, or a slow run and the next tick, never overlap. The lock is taken
  first, then the row is inserted.

Nothing the scheduler keeps in memory matters for correctness: any number of instances may
run against one database, and instances may come and go.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import logging
import os
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter
from sqlalchemy import literal_column, select, text
from sqlalchemy.exc import IntegrityError

from adapters.base import ConfigError as AdapterConfigError, DeliveryError
from gateway import audit
from gateway.config import Config, ConfigError, ScheduleConfig, timezone_problem, zone
from gateway.db import outage, outage_text
from gateway.models import JobRun

if TYPE_CHECKING:
    from gateway.node import Node

log = logging.getLogger("gateway.scheduler")

JobFn = Callable[["Node"], Mapping[str, Any] | None]

#: modules that register jobs when imported (optional: a missing one is not an error)
PLUGIN_MODULES = ("gateway.federation.jobs",)

#: how long a manual run waits for a running one of the same job
MANUAL_WAIT = 60.0

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


# -- registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str
    fn: JobFn
    help: str = ""


_registry: dict[str, Job] = {}
_registry_lock = threading.Lock()
_plugins_loaded = False


def register(name: str, fn: JobFn, help: str = "") -> JobFn:
    """Register (or replace: the last registration wins) the job ``name``. Returns ``fn``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a job name; expected 1-64 lowercase letters, digits, '-' or '_', "
                         f"starting with a letter")
    with _registry_lock:
        _registry[name] = Job(name, fn, help)
    return fn


def unregister(name: str) -> None:
    """Remove a job (tests register throwaway jobs)."""
    with _registry_lock:
        _registry.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only the plugin module itself (or its package) being absent is fine; a module it
            # imports being missing is a real error.
            parts = module.split(".")
            if exc.name not in {".".join(parts[:i]) for i in range(2, len(parts) + 1)}:
                raise
    _plugins_loaded = True


def jobs() -> list[Job]:
    """Every registered job, by name."""
    _load_plugins()
    with _registry_lock:
        return sorted(_registry.values(), key=lambda j: j.name)


def get(name: str) -> Job:
    """The job ``name``; :class:`UnknownJob` (a KeyError) if there is none."""
    _load_plugins()
    with _registry_lock:
        job = _registry.get(name)
    if job is None:
        raise UnknownJob(name)
    return job


class UnknownJob(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no job named {self.name}; expected one of {', '.join(j.name for j in jobs()) or '(none)'}"


def _receipts(node: Node) -> dict[str, Any]:
    from gateway import inbound

    # {"adapter": {"error": 1}} marks an adapter that could not be polled; the run is still ok
    return inbound.collect_all(node)


register("receipts", _receipts, "poll every adapter once for receipts and inbound messages")


def _blobs(node: Node) -> dict[str, Any]:
    from gateway import retention

    return retention.run(node)


register("blobs", _blobs, "remove stored content no message names, unused for [api] unclaimed_upload_days")


def _prune(node: Node) -> dict[str, Any]:
    from gateway import prune

    return prune.run(node)


register("prune", _prune, "remove outbox rows done for [worker] keep_done_days, Idempotency-Keys older "
                          "than [api] idempotency_days, the keys of legacy items not seen for [worker] "
                          "keep_ingested_days, the records of peers' items not sent again for "
                          "keep_peer_items_days and job runs older than keep_job_runs_days")


# -- configuration -------------------------------------------------------------------------
CRON_EXPECTED = ('expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, '
                 'e.g. "*/5 * * * *" or "30 0 2 * * *"')


def _cron(expr: str) -> croniter:
    return croniter(expr, datetime.now(UTC), second_at_beginning=True)


#: the runs of the receipts schedule looked at for its longest pause (see validate)
_GAPS = 60


def validate(config: Config) -> None:
    """Check every ``[schedules.X]``: a registered job, a cron expression, an IANA time zone.
    Raises :class:`ConfigError` naming the file and the key."""
    known = [j.name for j in jobs()]
    for name, sc in config.schedules.items():
        where = f"{config.source}: schedules.{name}"
        if name not in known:
            raise ConfigError(f"{where}: no job named {name}; expected one of {', '.join(known)}")
        fields = sc.cron.split()
        if len(fields) not in (5, 6):
            raise ConfigError(f"{where}.cron: {sc.cron!r} has {len(fields)} fields; {CRON_EXPECTED}")
        try:
            _cron(sc.cron).get_next(datetime)
        except Exception as exc:  # noqa: BLE001 - croniter raises several kinds
            raise ConfigError(f"{where}.cron: {sc.cron!r} is not a valid cron expression ({exc}); "
                              f"{CRON_EXPECTED}") from None
        problem = None if sc.timezone is None else timezone_problem(sc.timezone)
        if problem:
            raise ConfigError(f"{where}.timezone: {problem}")
    receipts, keep = config.schedules.get("receipts"), config.worker.keep_ingested_days
    if receipts is not None and receipts.enabled and keep:
        # an item still at its source (its acknowledgement failed) keeps its key only while the
        # collection sees it again (gateway.prune): the runs must come well within the time kept
        it = _cron(receipts.cron)
        times = [it.get_next(datetime) for _ in range(_GAPS + 1)]
        longest = max(b - a for a, b in zip(times, times[1:]))
        if 2 * longest > timedelta(days=keep):
            raise ConfigError(f"{config.source}: schedules.receipts.cron: {receipts.cron!r} leaves up to "
                              f"{longest.total_seconds() / 86400:.1f} days between runs, too long for "
                              f"[worker] keep_ingested_days = {keep}; expected runs at least twice in that "
                              f"time (raise keep_ingested_days, or run receipts more often)")


def enabled_schedules(config: Config) -> dict[str, ScheduleConfig]:
    return {name: sc for name, sc in config.schedules.items() if sc.enabled}


# -- one run -------------------------------------------------------------------------------
def default_instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RunResult:
    """What :func:`run_job` did. ``outcome`` is ok, failed or skipped (nothing recorded:
    another instance has the tick, ``detail["reason"] == "taken"``, or another run of the job
    holds its lock, ``"busy"``)."""

    job: str
    tick: datetime
    trigger: str
    instance: str
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def summary(self) -> dict[str, Any]:
        return {"job": self.job, "outcome": self.outcome, "detail": self.detail}


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for the job ``name``."""
    digest = hashlib.sha256(f"gateway.job:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class JobBusy(Exception):
    """Another run of the job holds its lock."""


@contextmanager
def job_lock(node: Node, name: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the job's lock for the block. Raises :class:`JobBusy` if it is still held by
    another run after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    if node.db.postgres:
        key = lock_key(name)
        conn = node.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                if time.monotonic() >= deadline:
                    raise JobBusy(name)
                time.sleep(0.25)
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                except Exception:  # the session lock must not outlive us in the pool
                    log.warning("releasing the lock of job %s failed; dropping the connection", name,
                                exc_info=True)
                    conn.invalidate()
        finally:
            conn.close()
        return
    fd = os.open(node.data_dir / f"job-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise JobBusy(name) from None
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _jsonable(value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        value = {"result": value}
    return json.loads(json.dumps(dict(value), ensure_ascii=False, default=str))  # type: ignore[no-any-return]


#: a literal, not a parameter: the partial index ix_job_runs_running (these rows only) serves
#: it in every plan (PostgreSQL's generic plan of a prepared statement, which psycopg makes of
#: one run five times, never proves a partial index's condition from a parameter)
_RUNNING = JobRun.outcome == literal_column("'running'")


def _tick_taken(node: Node, name: str, tick: datetime) -> bool:
    with node.db.sessions() as s:
        return s.scalar(select(JobRun.id).where(JobRun.job == name, JobRun.tick == tick)) is not None


def run_job(node: Node, job: str, *, trigger: str = "manual", tick: datetime | None = None,
            instance: str | None = None, actor: str | None = None, wait: float | None = None) -> RunResult:
    """Run ``job`` once and record it.

    ``trigger="schedule"`` needs the ``tick`` (UTC) it belongs to; if another instance has
    that tick already, or another run of the job holds its lock, nothing is recorded and the
    outcome is ``skipped``. ``trigger="manual"`` uses the current time as its tick and waits
    up to ``wait`` seconds (default 60) for a running one, then fails.

    A job's exception is the run's ``failed`` outcome (type and message in ``detail``, the
    traceback in the log); it is not raised. Raises :class:`UnknownJob`.
    """
    spec = get(job)
    if trigger not in ("schedule", "manual"):
        raise ValueError(f"trigger must be schedule or manual, not {trigger!r}")
    instance = instance or default_instance()
    actor = actor or f"{'scheduler' if trigger == 'schedule' else 'manual'}:{instance}"
    if trigger == "manual":
        now = datetime.now(UTC)
        # never a whole second, so a manual run cannot take a schedule tick's (job, tick) row
        tick = now if now.microsecond else now.replace(microsecond=1)
        wait = MANUAL_WAIT if wait is None else wait
    elif tick is None:
        raise ValueError("a scheduled run needs its tick")
    else:
        tick = tick.astimezone(UTC)
        wait = wait or 0.0

    def skipped(reason: str) -> RunResult:
        return RunResult(job, tick, trigger, instance, "skipped", {"reason": reason})

    if trigger == "schedule" and _tick_taken(node, job, tick):
        log.debug("job %s tick %s: taken by another instance", job, tick.isoformat())
        return skipped("taken")
    try:
        with job_lock(node, job, wait):
            return _run_locked(node, spec, trigger, tick, instance, actor)
    except JobBusy:
        if trigger == "schedule":
            log.info("job %s tick %s: skipped, another run of the job is in progress", job, tick.isoformat())
            return skipped("busy")
        msg = f"job {job} is already running (another run holds its lock); gave up after {wait:g} s"
        log.warning(msg)
        return RunResult(job, tick, trigger, instance, "failed", {"error": "Busy", "message": msg})


def _run_locked(node: Node, spec: Job, trigger: str, tick: datetime, instance: str, actor: str) -> RunResult:
    started = datetime.now(UTC)
    try:
        with node.db.begin() as s:
            # We hold the job's lock, so no run of it is alive anywhere: a row still 'running'
            # belongs to a process that died mid-run. Say so instead of leaving it running.
            for stale in s.scalars(select(JobRun).where(JobRun.job == spec.name, _RUNNING)):
                stale.outcome, stale.finished_at = "failed", started
                stale.detail = {"error": "Abandoned", "message": "the process running it ended before it finished"}
                audit.append(s, actor=actor, action="job.run", obj=f"job:{spec.name}", outcome="abandoned",
                             detail={"run": stale.id, "instance": stale.instance, "tick": stale.tick.isoformat()})
            row = JobRun(job=spec.name, tick=tick, trigger=trigger, instance=instance, outcome="running",
                         detail={}, started_at=started)
            s.add(row)
            s.flush()
            run_id = row.id
    except IntegrityError:
        if not _tick_taken(node, spec.name, tick):
            raise  # some other constraint: a bug, not a race
        log.debug("job %s tick %s: taken by another instance", spec.name, tick.isoformat())
        return RunResult(spec.name, tick, trigger, instance, "skipped", {"reason": "taken"})

    log.info("job %s (%s, tick %s) started", spec.name, trigger, tick.isoformat())
    outcome, detail = "ok", {}
    try:
        detail = _jsonable(spec.fn(node))
    except Exception as exc:
        if (isinstance(exc, _EXPECTED_FAILURES) or type(exc).__name__ in _EXPECTED_BY_NAME
                or outage(exc) is not None):
            # a peer down, a setting missing …: the message says it all (the run's detail too)
            log.error("job %s (%s, tick %s) failed: %s", spec.name, trigger, tick.isoformat(), exc)
        else:  # a bug: the traceback is what finds it
            log.exception("job %s (%s, tick %s) failed", spec.name, trigger, tick.isoformat())
        outcome, detail = "failed", {"error": type(exc).__name__, "message": str(exc)[:2000]}
    except BaseException as exc:  # interrupted (Ctrl-C, shutdown): record it, then go on stopping
        _finish(node, spec.name, run_id, trigger, tick, instance, actor, "failed",
                {"error": type(exc).__name__, "message": "interrupted"})
        raise
    finished = _finish(node, spec.name, run_id, trigger, tick, instance, actor, outcome, detail)
    log.info("job %s (%s, tick %s): %s", spec.name, trigger, tick.isoformat(), outcome)
    return RunResult(spec.name, tick, trigger, instance, outcome, detail, run_id, started, finished)


#: failures of a job that are about the world, not the code: logged without a traceback
_EXPECTED_FAILURES: tuple[type[Exception], ...] = (DeliveryError, ConfigError, AdapterConfigError, OSError)
#: the same for the federation's own (the scheduler does not import the federation package)
_EXPECTED_BY_NAME = frozenset({"DirectoryError", "DirectoryRejected", "FerryFailed", "TransferError"})


def _finish(node: Node, name: str, run_id: int, trigger: str, tick: datetime, instance: str, actor: str,
            outcome: str, detail: dict[str, Any]) -> datetime:
    finished = datetime.now(UTC)
    with node.db.begin() as s:
        row = s.get(JobRun, run_id)
        if row is not None:
            row.outcome, row.detail, row.finished_at = outcome, detail, finished
        info: dict[str, Any] = {"run": run_id, "trigger": trigger, "tick": tick.isoformat(), "instance": instance}
        if outcome == "failed":
            info.update(error=detail.get("error"), message=detail.get("message"))
        audit.append(s, actor=actor, action="job.run", obj=f"job:{name}", outcome=outcome, detail=info)
    return finished


def last_runs(node: Node, names: list[str]) -> dict[str, JobRun]:
    """The newest run of each of the jobs ``names`` that has run."""
    out: dict[str, JobRun] = {}
    with node.db.sessions() as s:
        for name in names:
            row = s.scalars(select(JobRun).where(JobRun.job == name)
                            .order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(1)).first()
            if row is not None:
                out[name] = row
    return out


# -- the scheduler -------------------------------------------------------------------------
class _Schedule:
    def __init__(self, name: str, sc: ScheduleConfig, node_timezone: str) -> None:
        self.name, self.cron, self.tz = name, sc.cron, zone(sc.timezone or node_timezone)

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``, in UTC."""
        it = croniter(self.cron, t.astimezone(self.tz), second_at_beginning=True)
        nxt: datetime = it.get_next(datetime)
        return nxt.astimezone(UTC)


_STOP: Any = object()


class Scheduler:
    """Runs the node's enabled ``[schedules]`` in background threads.

    One thread computes the ticks and sleeps until the earliest is due; each job has its own
    runner thread that runs that job's due ticks in order, so a slow job only delays its own
    ticks. The first run after start is at the next tick (no replay of the time the process
    was down). A tick is run late if the process fell behind, but not if it is more than
    :attr:`misfire_grace` seconds late. When another run of the job holds its lock, the tick
    is tried again for up to :attr:`busy_patience` seconds (never past the job's next tick),
    then given up: another run was in progress the whole time. The retries matter when
    instances run slightly out of step: the lock may be held by another instance finishing
    the *previous* tick, and this tick must not be lost to that.
    """

    #: a tick more than this many seconds late is not run any more (logged)
    misfire_grace = 60.0
    #: longest sleep of the tick thread, so a wall-clock jump is noticed
    max_sleep = 30.0
    #: how long a tick whose job lock is busy is tried again, and the first pause between
    #: tries (doubling)
    busy_patience = 10.0
    busy_retry = 0.1

    def __init__(self, node: Node, instance_id: str | None = None) -> None:
        validate(node.config)
        self.node = node
        self.instance = instance_id or default_instance()
        self.schedules = {name: _Schedule(name, sc, node.config.node.timezone)
                          for name, sc in enabled_schedules(node.config).items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queues: dict[str, queue.Queue[Any]] = {}
        self._runners: list[threading.Thread] = []

    def start(self) -> Scheduler:
        if self._thread is not None:
            return self
        self._stop.clear()
        for name in self.schedules:
            q = self._queues[name] = queue.Queue()
            t = threading.Thread(target=self._runner, args=(name, q), name=f"job-{name}", daemon=True)
            t.start()
            self._runners.append(t)
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler %s started: %s", self.instance,
                 ", ".join(f"{n} ({s.cron})" for n, s in self.schedules.items()) or "no schedules")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop ticking; wait up to ``timeout`` seconds for runs in progress to finish."""
        self._stop.set()
        for q in self._queues.values():
            q.put(_STOP)
        deadline = time.monotonic() + timeout
        for t in [self._thread, *self._runners]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    log.warning("scheduler thread %s still running after %g s", t.name, timeout)
        self._thread, self._runners, self._queues = None, [], {}

    # the tick thread
    def _loop(self) -> None:
        now = datetime.now(UTC)
        nxt = {name: s.next_after(now) for name, s in self.schedules.items()}
        while nxt and not self._stop.is_set():
            now = datetime.now(UTC)
            delay = (min(nxt.values()) - now).total_seconds()
            if delay > 0:
                self._stop.wait(min(delay, self.max_sleep))
                continue
            oldest = now - timedelta(seconds=self.misfire_grace)
            for name, s in self.schedules.items():
                tick = nxt[name]
                if tick < oldest:  # far behind (suspended, clock jumped): no replay
                    log.warning("job %s: ticks from %s were missed (more than %g s late)", name,
                                tick.isoformat(), self.misfire_grace)
                    tick = s.next_after(oldest)
                while tick <= now:
                    self._queues[name].put(tick)
                    tick = s.next_after(tick)
                nxt[name] = tick

    # a job's runner thread
    def _runner(self, name: str, q: queue.Queue[Any]) -> None:
        sched = self.schedules[name]
        while True:
            tick = q.get()
            if tick is _STOP or self._stop.is_set():
                return
            late = (datetime.now(UTC) - tick).total_seconds()
            if late > self.misfire_grace:
                log.warning("job %s tick %s not run: %.0f s late", name, tick.isoformat(), late)
                continue
            try:
                give_up = min(sched.next_after(tick), tick + timedelta(seconds=self.busy_patience))
                self._run_tick(name, tick, give_up)
            except Exception as exc:  # the runner must survive a database outage
                if outage(exc) is None:
                    log.exception("job %s tick %s: the run could not be recorded", name, tick.isoformat())
                else:  # the next tick runs once the database is back (a row left running: Abandoned)
                    log.warning("job %s tick %s: not run, the database is unavailable (%s)", name,
                                tick.isoformat(), outage_text(exc))

    def _run_tick(self, name: str, tick: datetime, give_up: datetime) -> RunResult:
        pause = self.busy_retry
        while True:
            result = run_job(self.node, name, trigger="schedule", tick=tick, instance=self.instance)
            if result.outcome != "skipped" or result.detail.get("reason") != "busy":
                return result
            # Another run holds the lock. It may be an earlier tick of an instance running
            # behind this one: try again for a while (backing off, so a long run costs a few
            # tries, not dozens).
            left = (give_up - datetime.now(UTC)).total_seconds()
            if left <= 0 or self._stop.wait(min(left, pause * (0.5 + random.random()))):
                return result
            pause *= 2
