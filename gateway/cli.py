"""The ``gateway`` command line (click)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from typing import Any, TextIO

import click

from gateway import config as config_mod
from gateway.config import Config, ConfigError


class Ctx:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._cfg: Config | None = None

    @property
    def embedded(self) -> bool:
        return self.config_path is None

    def cfg(self) -> Config:
        if self._cfg is None:
            from gateway import scheduler

            try:
                cfg = config_mod.load(self.config_path)
                scheduler.validate(cfg)  # [schedules] name jobs that exist, with valid cron
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            self._cfg = cfg
        return self._cfg

    def node(self, check_adapters: bool = False):  # type: ignore[no-untyped-def]
        """The node; ``check_adapters``: also build every adapter now (commands that deliver
        or serve), so that a wrong adapter setting stops them at once, naming the key."""
        from gateway.node import Node

        try:
            n = Node(self.cfg())
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if check_adapters:
            try:
                n.check_adapters()
            except ConfigError as exc:
                n.close()
                raise click.ClickException(str(exc)) from None
        return n


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(help="电子政务内网集成网关 — e-government intranet integration gateway.\n\n"
                  "Without --config (or $GATEWAY_CONFIG) commands use the embedded default: "
                  "SQLite in ./var and simulated legacy systems.")
@click.option("--config", "-c", "config_path", envvar="GATEWAY_CONFIG", type=click.Path(dir_okay=False),
              help="node configuration (TOML)")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    if config_path is None and os.environ.get("GATEWAY_CONFIG") == "" and ctx.invoked_subcommand != "demo":
        # click takes an empty variable for an unset one: a unit file whose variable came out
        # empty would start the embedded default, simulated legacy systems and all
        raise click.UsageError("GATEWAY_CONFIG is set but empty; give it the path of the node's TOML file, or "
                               "unset it to run the embedded default")
    ctx.obj = Ctx(config_path)


# -- db ------------------------------------------------------------------------------------
@main.group(help="Database schema.")
def db() -> None:
    pass


@db.command("upgrade", help="Apply Alembic migrations up to the newest schema.")
@pass_ctx
def db_upgrade(c: Ctx) -> None:
    from gateway import migrate

    try:
        url = c.cfg().database_url()
    except ConfigError as exc:  # its variable unset, or a driver other than psycopg 3
        raise click.ClickException(str(exc)) from None
    try:
        before = migrate.upgrade(url)
    except migrate.NewerSchema as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the database cannot be reached, created or read
        raise click.ClickException(f"{c.cfg().source}: database.url: cannot migrate the database at "
                                   f"{_safe_url(url)}: {_reason(exc)}") from None
    head = migrate.head()
    if before != head:  # the schema changed: in the audit log, which exists from now on
        from gateway import audit as audit_mod
        from gateway.db import Database

        db = Database(url, 1)
        try:
            with db.begin() as s:
                audit_mod.append(s, actor=f"cli:{_user()}", action="schema.upgrade", obj="database",
                                 detail={"from": before, "to": head})
        finally:
            db.dispose()
    click.echo(f"database at {_safe_url(url)} is at the newest schema (revision {head})")


@db.command("downgrade", help="Step the schema down to REVISION, the newest revision of the older version to run "
                              "again (a rollback; stop every process of the node and take a backup first).")
@click.argument("revision")
@pass_ctx
def db_downgrade(c: Ctx, revision: str) -> None:
    from gateway import audit as audit_mod
    from gateway import migrate
    from gateway.db import Database

    try:
        url = c.cfg().database_url()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        before = migrate.downgrade(url, revision)
    except (migrate.NewerSchema, migrate.BadRevision) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the database cannot be reached or read
        raise click.ClickException(f"{c.cfg().source}: database.url: cannot migrate the database at "
                                   f"{_safe_url(url)}: {_reason(exc)}") from None
    db = Database(url, 1)
    try:  # the audit log is part of every revision
        with db.begin() as s:
            audit_mod.append(s, actor=f"cli:{_user()}", action="schema.downgrade", obj="database",
                             detail={"from": before, "to": revision})
    finally:
        db.dispose()
    click.echo(f"database at {_safe_url(url)} is at schema revision {revision} (was {before}); "
               f"start the version whose newest revision that is")


def _reason(exc: BaseException) -> str:
    """An exception as one line: the driver's own message, without SQLAlchemy's SQL and
    background links."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {text}"[:400]


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- keys ----------------------------------------------------------------------------------
@main.group(help="API keys of calling systems.")
def keys() -> None:
    pass


@keys.command("create", help="Create an API key; the key is printed once and stored only hashed.")
@click.option("--name", required=True, help="who the key is for, e.g. 州政府办OA")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="documents:send, documents:read, documents:recall, blobs:write, admin or *")
@click.option("--clearance", default="非密", show_default=True, help="highest 密级 the key may send or read")
@click.option("--unit", "units", multiple=True, help="a unit (统一社会信用代码) the key may send for")
@click.option("--webhook-url", help="where status changes are POSTed (signed)")
@click.option("--upload-quota", metavar="SIZE|none|default",
              help="new content the key may upload in any 24 hours, e.g. 20GiB, or none for no limit "
                   "(default: the node's [api] upload_quota_bytes_per_day)")
@pass_ctx
def keys_create(c: Ctx, name: str, scopes: tuple[str, ...], clearance: str, units: tuple[str, ...],
                webhook_url: str | None, upload_quota: str | None) -> None:
    from gateway.api.auth import create_key

    quota = None if upload_quota is None else _quota_value(upload_quota, "--upload-quota")
    n = c.node()
    _require_schema(n)
    served = n.config.node.units
    foreign = [u for u in units if served and u not in served]
    if foreign:
        raise click.BadParameter(f"{foreign[0]} is not a unit of node {n.id} (its units: {', '.join(served)})",
                                 param_hint="--unit")
    try:
        key = create_key(n.db, name=name, scopes=list(scopes), clearance=clearance, units=list(units),
                         webhook_url=webhook_url, actor=f"cli:{_user()}", upload_quota=quota)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)


@keys.command("revoke", help="Revoke an API key by its id (the part after gw_).")
@click.argument("key_id")
@pass_ctx
def keys_revoke(c: Ctx, key_id: str) -> None:
    from gateway.api.auth import revoke_key

    n = c.node()
    _require_schema(n)
    if not revoke_key(n.db, key_id, actor=f"cli:{_user()}"):
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"revoked {key_id}")


def _quota_value(text: str, param: str) -> int | None:
    """An upload quota as given on the command line: a size, ``none`` (0: no limit) or
    ``default`` (None: the node's)."""
    from gateway.api.auth import parse_size

    word = text.strip().lower()
    if word == "none":
        return 0
    if word == "default":
        return None
    words = "none (no limit) or default (the node's)"
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc}; or {words}", param_hint=param) from None
    if size == 0:  # in the configuration 0 means no limit: here that is said in words
        raise click.BadParameter(f"{text!r} is no bytes at all; expected a size such as 20GiB, or {words}",
                                 param_hint=param)
    return size


def _shown_quota(quota: int | None, node_default: int) -> str:
    from gateway.api.auth import shown_size

    if quota is None:
        return f"node default ({shown_size(node_default)}/day)" if node_default else "node default (none)"
    return f"{shown_size(quota)}/day" if quota else "none"


@keys.command("quota", help="Set an API key's own daily upload quota: a SIZE such as 20GiB, none (no "
                            "limit) or default (the node's [api] upload_quota_bytes_per_day). In force "
                            "within seconds; audited.")
@click.argument("key_id")
@click.argument("value", metavar="SIZE|none|default")
@pass_ctx
def keys_quota(c: Ctx, key_id: str, value: str) -> None:
    from gateway.api.auth import set_upload_quota

    quota = _quota_value(value, "VALUE")
    n = c.node()
    _require_schema(n)
    try:
        before = set_upload_quota(n.db, key_id, quota, actor=f"cli:{_user()}")
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    node_default = n.config.api.upload_quota_bytes_per_day
    click.echo(f"{key_id}: upload quota {_shown_quota(quota, node_default)} "
               f"(was {_shown_quota(before, node_default)})")


@keys.command("list", help="List API keys (never their secrets).")
@pass_ctx
def keys_list(c: Ctx) -> None:
    from sqlalchemy import select

    from gateway.envelope import CLASSIFICATION_LEVEL
    from gateway.models import ApiKey

    names = {level: name for name, level in CLASSIFICATION_LEVEL.items()}
    n = c.node()
    _require_schema(n)
    with n.db.sessions() as s:
        for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            state = "revoked" if k.revoked_at else "active"
            quota = _shown_quota(k.upload_quota_bytes_per_day, n.config.api.upload_quota_bytes_per_day)
            click.echo(f"{k.id}  {state:7}  clearance={names.get(k.clearance, k.clearance)}  "
                       f"scopes={','.join(k.scopes)}  upload-quota={quota}  {k.name}")


def _user() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


def _require_schema(n) -> None:  # type: ignore[no-untyped-def]
    from gateway import migrate

    if n.config.simulators:
        migrate.upgrade(n.config.database_url())
        return
    try:
        ok = migrate.current_is_head(n.db.engine)
    except migrate.NewerSchema as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"cannot reach the database: {_reason(exc)}") from None
    if not ok:
        raise click.ClickException("the database schema is not current; run 'gateway db upgrade' first")


# -- adapters ------------------------------------------------------------------------------
@main.group(help="Legacy-system adapters.")
def adapters() -> None:
    pass


_NO_ADAPTERS = "no adapters configured"
_EMBEDDED_ADAPTERS = " (the embedded default configures them at 'gateway serve'; give --config FILE)"


@adapters.command("list", help="Configured adapters and their types; checks their settings (local files, "
                               "secrets) without contacting anything, and exits 1 naming the first wrong one.")
@pass_ctx
def adapters_list(c: Ctx) -> None:
    cfg = c.cfg()
    if not c.embedded:  # also with no adapter: the node's own files (the metrics token) are read
        c.node(check_adapters=True).close()
    if not cfg.adapters:
        click.echo(_NO_ADAPTERS + (_EMBEDDED_ADAPTERS if c.embedded else ""))
        return
    for name, a in sorted(cfg.adapters.items()):
        click.echo(f"{name}\t{a.get('type')}")


@adapters.command("check", help="Ask each adapter (or one) whether its legacy system answers.")
@click.argument("name", required=False)
@pass_ctx
def adapters_check(c: Ctx, name: str | None) -> None:
    if not c.cfg().adapters:
        click.echo(_NO_ADAPTERS + (_EMBEDDED_ADAPTERS if c.embedded else ""))
        return
    if name is not None and name not in c.cfg().adapters:
        raise click.BadParameter(f"no adapter named {name!r} is configured; expected one of "
                                 f"{', '.join(sorted(c.cfg().adapters))}", param_hint="NAME")
    n = c.node()
    names = [name] if name else n.adapter_names()
    bad = 0
    for a in names:
        try:
            h = n.adapter(a).check()
            ok, msg, ms = h.ok, h.message, h.latency_ms
        except Exception as exc:  # noqa: BLE001
            ok, msg, ms = False, f"{type(exc).__name__}: {exc}", None
        bad += not ok
        click.echo(f"{a}\t{'OK  ' if ok else 'FAIL'}\t{'' if ms is None else f'{ms:.0f} ms'}\t{msg}")
    n.close()
    if bad:
        sys.exit(1)


# -- audit ---------------------------------------------------------------------------------
@main.group(help="The hash-chained audit log.")
def audit() -> None:
    pass


@audit.command("verify", help="Recompute the chain; exit 1 on any altered, removed or reordered entry.")
@click.option("--expect-head", help="SEQ:HASH recorded earlier (detects removal of the newest entries)")
@pass_ctx
def audit_verify(c: Ctx, expect_head: str | None) -> None:
    from gateway import audit as audit_mod

    if expect_head is not None and re.fullmatch(r"[0-9]{1,19}:[0-9a-f]{64}", expect_head) is None:
        raise click.BadParameter(f"{expect_head!r}: expected SEQ:HASH as 'gateway audit verify' printed it, "
                                 f"e.g. 1234:{'0' * 64}", param_hint="--expect-head")
    n = c.node()
    _require_schema(n)
    with n.db.sessions() as s:
        r = audit_mod.verify(s, expect_head)
    if r.ok:
        click.echo(f"audit log intact: {r.entries} entries, head {r.head}")
        return
    click.echo(f"AUDIT LOG BROKEN{'' if r.seq is None else f' at entry {r.seq}'}: {r.problem}", err=True)
    sys.exit(1)


def _when(value: str | None, option: str) -> Any:
    """--since / --until: an ISO 8601 date or time; without an offset it is UTC."""
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected an ISO 8601 date or time, e.g. 2026-06-01, "
                                 f"2026-06-01T08:00 (UTC) or 2026-06-01T08:00+08:00", param_hint=option) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@audit.command("export", help="Write audit entries as JSON lines, oldest first: seq, at (UTC), actor, action, "
                              "object, outcome, detail (the JSON text the hash covers), prev_hash and hash, so "
                              "that 'gateway audit verify-export' (or any SHA-256 tool) can prove the lines "
                              "unaltered. Filters combine; ACTOR, ACTION and OUTCOME match exactly, or as a "
                              "prefix when they end in '*'. Streams: any size of log. The export itself is "
                              "audited (audit.export).")
@click.option("--since", help="entries at or after this time (ISO 8601; UTC unless an offset is given)")
@click.option("--until", help="entries before this time")
@click.option("--actor", help="e.g. cli:zhang, key:4f2a…(州OA), node:county-a, job:prune, or key:*")
@click.option("--action", help="e.g. document.read, api.refuse, or admin.*")
@click.option("--outcome", help="e.g. ok, rejected, forbidden-scope")
@click.option("--message", "message_id", help="the entries about this message and its copies")
@click.option("--from-seq", type=click.IntRange(1, 2**63 - 1), help="entries numbered this or more")
@click.option("--to-seq", type=click.IntRange(1, 2**63 - 1), help="entries numbered this or less")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="write to this file (made mode 0600) instead of standard output")
@pass_ctx
def audit_export(c: Ctx, since: str | None, until: str | None, actor: str | None, action: str | None,
                 outcome: str | None, message_id: str | None, from_seq: int | None, to_seq: int | None,
                 output: str | None) -> None:
    from gateway import audit as audit_mod

    f = audit_mod.Filters(since=_when(since, "--since"), until=_when(until, "--until"), actor=actor,
                          action=action, outcome=outcome, message=message_id, from_seq=from_seq, to_seq=to_seq)
    if f.since and f.until and f.since >= f.until:
        raise click.BadParameter(f"--since {since} is not before --until {until}: nothing could match",
                                 param_hint="--since/--until")
    if from_seq and to_seq and from_seq > to_seq:
        raise click.BadParameter(f"--from-seq {from_seq} is after --to-seq {to_seq}: nothing could match",
                                 param_hint="--from-seq/--to-seq")
    for name, value in (("--actor", actor), ("--action", action), ("--outcome", outcome),
                        ("--message", message_id)):
        if value is not None and not value.strip("*"):
            raise click.BadParameter("is empty; leave the option out to take every entry", param_hint=name)
    n = c.node()
    _require_schema(n)
    count = 0
    try:
        with contextlib.ExitStack() as files:
            out: TextIO = sys.stdout
            if output:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                out = files.enter_context(open(fd, "w", encoding="utf-8", newline="\n"))
            with n.db.sessions() as s:
                for e in audit_mod.export(s, f):
                    out.write(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n")
                    count += 1
            out.flush()
        given = {k: v for k, v in (("since", since), ("until", until), ("actor", actor), ("action", action),
                                   ("outcome", outcome), ("message", message_id), ("from_seq", from_seq),
                                   ("to_seq", to_seq)) if v is not None}
        with n.db.begin() as s:  # who read the log, which part, where it went
            audit_mod.append(s, actor=f"cli:{_user()}", action="audit.export", obj="audit_log",
                             detail={"filters": given, "entries": count,
                                     "to": os.path.abspath(output) if output else "stdout"})
    except OSError as exc:
        raise click.ClickException(f"{output or 'standard output'}: cannot write: {exc.strerror or exc}") from None
    finally:
        n.close()
    click.echo(f"{count} entr{'y' if count == 1 else 'ies'} exported", err=True)


@audit.command("verify-export", help="Check a file 'gateway audit export' wrote, without the node: each entry's "
                                     "hash matches its content, and each entry that follows the one before it "
                                     "(seq + 1) carries that entry's hash. Exit 1 on the first problem.")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--expect-head", help="SEQ:HASH recorded off the node (from 'gateway audit verify'): the export "
                                    "must hold that entry, unaltered")
def audit_verify_export(file: Any, expect_head: str | None) -> None:
    from gateway import audit as audit_mod

    if expect_head is not None and re.fullmatch(r"[0-9]{1,19}:[0-9a-f]{64}", expect_head) is None:
        raise click.BadParameter(f"{expect_head!r}: expected SEQ:HASH as 'gateway audit verify' printed it, "
                                 f"e.g. 1234:{'0' * 64}", param_hint="--expect-head")
    try:
        r = audit_mod.check_export(iter(file), expect_head)
    except UnicodeDecodeError:
        raise click.ClickException(f"{file.name}: not UTF-8 text; expected the JSON lines of "
                                   f"'gateway audit export'") from None
    if r.problem:
        where = f" line {r.line}" if r.line else ""
        click.echo(f"EXPORT BROKEN: {file.name}{where}: {r.problem}", err=True)
        sys.exit(1)
    linked = "one linked run" if r.runs == 1 else f"{r.runs} linked runs (the filters left gaps)"
    click.echo(f"export intact: {r.entries} entries in {linked}"
               + (f", first {r.first}, last {r.last}" if r.entries else ""))


@main.group(help="The blob store: bodies and attachments (正文与附件).")
def blobs() -> None:
    pass


@blobs.command("unclaimed", help="What the blobs job would remove: stored content no message names and "
                                 "not used for DAYS days (default: [api] unclaimed_upload_days). It records "
                                 "which contents stored messages name, as the job does, and removes nothing.")
@click.option("--days", type=click.IntRange(1, 3650), help="the retention to try (default: the node's)")
@pass_ctx
def blobs_unclaimed(c: Ctx, days: int | None) -> None:
    from datetime import UTC, datetime

    from gateway import retention
    from gateway.api.auth import shown_size

    n = c.node()
    _require_schema(n)
    days = days or n.config.api.unclaimed_upload_days
    if not days:
        n.close()
        raise click.UsageError("the node keeps unclaimed content ([api] unclaimed_upload_days = 0); "
                               "give --days N to see what a retention of N days would remove")
    try:
        out = retention.preview(n, days)
    finally:
        n.close()
    click.echo(f"{out['count']} stored contents ({shown_size(out['bytes'])}) are named by no message and unused "
               f"for {days} days: the blobs job would remove them" + (":" if out["first"] else "."))
    for sha, mtime, size in out["first"]:
        when = datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds")
        click.echo(f"  {sha}  {size:>12} bytes  last used {when}")
    if out["count"] > len(out["first"]):
        click.echo(f"  … and {out['count'] - len(out['first'])} more")


# -- outbox --------------------------------------------------------------------------------
@main.group(help="The outbox: dead letters (死信), the work the delivery worker gave up on, and putting "
                 "it back in the queue once the cause is fixed.")
def outbox() -> None:
    pass


_KIND = click.Choice(["deliver", "forward", "recall", "webhook", "status"])


@outbox.command("list", help="Dead-lettered outbox rows, oldest first: number, kind, target (adapter, peer node "
                             "or webhook), message and unit, attempts, when it died, and the last error.")
@click.option("--kind", type=_KIND, help="only this kind of work")
@click.option("--target", help="only rows for this adapter or peer node")
@click.option("--message", "message_id", help="only rows of this message id")
@click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True, help="rows shown")
@pass_ctx
def outbox_list(c: Ctx, kind: str | None, target: str | None, message_id: str | None, limit: int) -> None:
    from gateway import deadletter

    n = c.node()
    _require_schema(n)
    try:
        rows, total = deadletter.dead_letters(n.db, kind=kind, target=target, message_id=message_id, limit=limit)
    finally:
        n.close()
    for r in rows:
        when = r.finished_at.isoformat(timespec="seconds") if r.finished_at else "-"
        error = " ".join((r.last_error or "").split())
        click.echo(f"{r.id}  {r.kind:7}  {r.target}  {r.message_id or '-'}  {r.unit or '-'}  "
                   f"attempts={r.attempts}  died={when}  {error[:160]}")
    more = f" ({len(rows)} shown; --limit for more)" if total > len(rows) else ""
    hint = " Once the cause is fixed: gateway outbox retry ID… (or --all)." if total else ""
    click.echo(f"{total} dead-lettered row{'s' if total != 1 else ''}{more}.{hint}")


@outbox.command("retry", help="Put dead-lettered rows back in the queue: the rows numbered ID (all of them or "
                              "none), or with --all every dead row (narrowed by --kind, --target, --message). "
                              "Each gets a fresh retry budget, its failed copies become queued again (callers' "
                              "webhooks are told), and each is audited (admin.outbox.retry).")
@click.argument("ids", nargs=-1, type=click.IntRange(1))
@click.option("--all", "all_rows", is_flag=True, help="every dead row the filters match")
@click.option("--kind", type=_KIND, help="with --all: only this kind of work")
@click.option("--target", help="with --all: only rows for this adapter or peer node")
@click.option("--message", "message_id", help="with --all: only rows of this message id")
@click.option("--dry-run", is_flag=True, help="say what would be put back; change nothing")
@pass_ctx
def outbox_retry(c: Ctx, ids: tuple[int, ...], all_rows: bool, kind: str | None, target: str | None,
                 message_id: str | None, dry_run: bool) -> None:
    from gateway import deadletter

    if bool(ids) == all_rows:
        raise click.UsageError("name the rows to retry (their numbers, from `gateway outbox list`) or give "
                               "--all, not both")
    if ids and (kind or target or message_id):
        raise click.UsageError("--kind, --target and --message narrow --all; rows named by number are taken "
                               "as they are")
    n = c.node()
    _require_schema(n)
    try:
        out = deadletter.requeue(n.db, ids=list(ids) or None, kind=kind, target=target, message_id=message_id,
                                 actor=f"cli:{_user()}", dry_run=dry_run)
    except deadletter.RetryRefused as exc:
        raise click.ClickException("nothing was retried: " + "; ".join(
            f"row {i}: {why}" for i, why in exc.problems.items())) from None
    finally:
        n.close()
    verb = "would be put back" if dry_run else "put back in the queue"
    click.echo(f"{len(out.ids)} row{'s' if len(out.ids) != 1 else ''} {verb}"
               f"{' (' + ', '.join(map(str, out.ids)) + ')' if out.ids else ''}; "
               f"{out.copies} cop{'ies' if out.copies != 1 else 'y'} failed → queued")
    for i, why in out.skipped.items():
        click.echo(f"row {i} left dead: {why}", err=True)


# -- report --------------------------------------------------------------------------------
@main.group(help="Reports for assessment (考核).")
def report() -> None:
    pass


@report.command("sign-for", help="Timeliness of sign-for (签收及时性) per receiving unit, for the documents "
                                 "delivered between --from and --to (days in the node's time zone, [node] timezone, "
                                 "China time by default; both included; default: the last 30 days): copies "
                                 "delivered, signed, signed within --within hours, "
                                 "returned, still waiting, and the median and 90th percentile of the hours to 签收.")
@click.option("--from", "start", type=click.DateTime(["%Y-%m-%d"]), help="first day, e.g. 2026-11-01")
@click.option("--to", "end", type=click.DateTime(["%Y-%m-%d"]), help="last day, e.g. 2026-11-30")
@click.option("--within", type=click.FloatRange(0, 24 * 366, min_open=True), default=24.0, show_default=True,
              help="hours from delivery within which a 签收 counts as in time")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per unit, one per line")
@pass_ctx
def report_sign_for(c: Ctx, start: Any, end: Any, within: float, as_json: bool) -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.config import zone
    from systems.documents import assessment, rules

    tz_name = c.cfg().node.timezone
    tz = zone(tz_name)
    now = datetime.now(UTC)
    today = now.astimezone(tz).date()
    first = start.date() if start else today - timedelta(days=29)
    last = end.date() if end else today
    for day, hint in ((first, "--from"), (last, "--to")):
        if day.year not in rules.YEARS:  # the calendar's edges have no day after or UTC time
            raise click.BadParameter(f"{day}: expected a day of the years {rules.YEARS.start}-{rules.YEARS.stop - 1}",
                                     param_hint=hint)
    if last < first:
        raise click.BadParameter(f"{last} is before --from {first}", param_hint="--to")
    since = datetime.combine(first, datetime.min.time(), tz)
    until = datetime.combine(last + timedelta(days=1), datetime.min.time(), tz)
    n = c.node()
    _require_schema(n)
    try:
        rows = assessment.sign_for(n.db, since, until, within, now)
    finally:
        n.close()
    if as_json:
        for r in rows:
            click.echo(json.dumps(r.as_dict(), ensure_ascii=False))
        return
    shown = "China time" if tz_name == "Asia/Shanghai" else tz_name
    click.echo(f"签收及时性 sign-for timeliness, documents delivered {first} – {last} ({shown}); "
               f"in time: within {within:g} h")
    cells = assessment.table(rows)
    widths = [max(_width(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        click.echo("  ".join(v + " " * (w - _width(v)) for v, w in zip(row, widths)).rstrip())
    if not rows:
        click.echo("(no copy was delivered in this period)")


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: CJK characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


# -- sync ----------------------------------------------------------------------------------
@main.command(help="Run a scheduled job now (JOB), or list the jobs with their schedules and last runs "
                   "(--list). Built-in job: receipts (poll every adapter once). Prints one line of JSON "
                   "(job, outcome, detail); exits 1 if the run failed.")
@click.argument("job", required=False)
@click.option("--list", "list_jobs", is_flag=True, help="list the jobs, their schedules and last runs")
@pass_ctx
def sync(c: Ctx, job: str | None, list_jobs: bool) -> None:
    from datetime import UTC

    from gateway import scheduler

    if list_jobs == (job is not None):
        raise click.UsageError("give a JOB to run, or --list")
    try:
        scheduler.validate(c.cfg())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    known = [j.name for j in scheduler.jobs()]
    if job is not None and job not in known:
        raise click.BadParameter(f"no job named {job!r}; expected one of {', '.join(known)}", param_hint="JOB")
    n = c.node()
    _require_schema(n)
    if job is None:
        last = scheduler.last_runs(n, known)
        for j in scheduler.jobs():
            sc = n.config.schedules.get(j.name)
            when = "—" if sc is None else (f"{sc.cron} ({sc.timezone or n.config.node.timezone})"
                                           + ("" if sc.enabled else " disabled"))
            run = last.get(j.name)
            ran = "never run" if run is None else (
                f"last run {run.started_at.astimezone(UTC).isoformat(timespec='seconds')} {run.outcome}")
            click.echo(f"{j.name}\t{when}\t{ran}\t{j.help}")
        n.close()
        return
    try:
        result = scheduler.run_job(n, job, trigger="manual", actor=f"cli:{_user()}")
    finally:
        n.close()
    click.echo(json.dumps(result.summary(), ensure_ascii=False))
    if result.outcome == "failed":
        sys.exit(1)


# -- worker --------------------------------------------------------------------------------
@main.command(help="Run the delivery worker and the collector only (scale-out next to gunicorn).")
@click.option("--once", is_flag=True, help="deliver what is due, poll once, then exit")
@pass_ctx
def worker(c: Ctx, once: bool) -> None:
    import signal
    import threading

    from gateway import inbound
    from gateway.runtime import Runtime
    from gateway.worker import Worker

    if c.embedded:
        raise click.ClickException("'gateway worker' needs --config; the embedded default runs everything "
                                   "in 'gateway serve'")
    from gateway import logs

    logs.setup()
    n = c.node(check_adapters=True)
    _require_schema(n)
    n.record_config("worker")
    if once:
        Worker(n).drain()
        inbound.collect_all(n)
        n.close()
        return
    rt = Runtime(n).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    click.echo(f"worker {rt.worker.id if rt.worker else ''} running; Ctrl-C to stop")
    done.wait()
    rt.stop()
    n.close()


# -- serve ---------------------------------------------------------------------------------
@main.command(help="Run the node: HTTP API, delivery worker and collector in one process tree.")
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to listen on")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="request threads")
@pass_ctx
def serve(c: Ctx, bind: str, threads: int) -> None:
    from gateway import migrate, serve as serve_mod

    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise click.BadParameter(f"{bind!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
                                 param_hint="--bind")
    from gateway.gunicorn_worker import read_timeout

    read_timeout()  # a bad GATEWAY_READ_TIMEOUT stops here, named, not in every worker start

    cfg = c.cfg()
    sims: Any = None
    if c.embedded:
        from adapters.simulators import embedded  # the one place production loads simulators

        sims = embedded.plan(cfg, api_port=int(bind.rsplit(":", 1)[1]))
        cfg = sims.config
        migrate.upgrade(cfg.database_url())
        key = embedded.bootstrap_key(cfg)
        click.echo("嵌入式默认配置 (embedded default): SQLite in ./var, simulated legacy systems")
        if key:
            # the key itself is never printed: stdout often ends up in a log
            click.echo(f"管理员 API 密钥已写入 (admin API key written to) {cfg.data_dir / 'bootstrap-api-key'} (mode 0600)")
    else:
        # a wrong adapter setting or an old schema stops the start here, once, not in a worker
        n = c.node(check_adapters=True)
        try:
            _require_schema(n)
        finally:
            n.close()
    state: dict[str, Any] = {}

    def factory():  # type: ignore[no-untyped-def]
        from gateway.app import create_app
        from gateway.node import Node

        n = Node(cfg)
        try:
            current = c.embedded or migrate.current_is_head(n.db.engine)
        except migrate.NewerSchema as exc:
            raise SystemExit(str(exc)) from None
        if not current:
            raise SystemExit("the database schema is not current; run 'gateway db upgrade' first")
        state["node"] = n
        from gateway.app import record_config

        record_config(n, "serve")
        return create_app(node=n)

    def post_worker_init(_w: Any) -> None:
        from gateway.runtime import Runtime

        if sims is not None:
            sims.start()
        state["runtime"] = Runtime(state["node"]).start()

    def worker_exit(_s: Any, _w: Any) -> None:
        if "runtime" in state:
            state["runtime"].stop()
        if sims is not None:
            sims.stop()

    click.echo(f"API on http://{bind}/api/v1/docs")
    from gateway import logs

    logs.setup()
    serve_mod.run(factory, bind=bind, threads=threads, post_worker_init=post_worker_init,
                  worker_exit=worker_exit)


# -- demo ----------------------------------------------------------------------------------
@main.command(help="A self-contained scenario on simulated legacy systems. Part 1: one node sends a "
                   "document to recipients behind SOAP, SFTP and the XML exchange box. Part 2: a "
                   "prefecture and two county nodes (separate processes on loopback); the prefecture "
                   "sends to units at both counties, county A to county B (relayed). Each prints every "
                   "recipient's 签收. Exit 0 only if every recipient signed for it.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 3600),
              help="seconds to wait for every 签收, per part")
@click.option("--part", type=click.Choice(["all", "adapters", "nodes"]), default="all", show_default=True,
              help="run both parts, or only one")
def demo(timeout: float, part: str) -> None:
    from adapters.simulators import demo as demo_mod
    from adapters.simulators import demo_nodes

    rc = 0
    if part in ("all", "adapters"):
        click.echo("== 一、单节点：三种遗留系统 (one node, three legacy systems) ==")
        rc |= demo_mod.run(timeout=timeout, echo=click.echo)
    if part in ("all", "nodes"):
        click.echo("\n== 二、跨节点：州节点与两个县节点 (across nodes: prefecture and two counties) ==")
        rc |= demo_nodes.run(timeout=timeout, echo=click.echo)
    sys.exit(rc)


# -- federation -------------------------------------------------------------------------------
@main.group(help="Node-to-node federation.")
def federation() -> None:
    pass


@federation.command("key", help="Print this node's public key, in the form a peer pins it "
                                "([peers.<this node>] public_key = \"…\"). Creates the key pair on first use.")
@pass_ctx
def federation_key(c: Ctx) -> None:
    from gateway.federation import keys

    cfg = c.cfg()
    try:
        click.echo(keys.public_text(keys.own_key(cfg, actor=f"cli:{_user()}")))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@federation.command("ping", help="Send a signed request to a peer (or every peer) and show whether it "
                                 "accepts this node's signature.")
@click.argument("peer", required=False)
@pass_ctx
def federation_ping(c: Ctx, peer: str | None) -> None:
    n = c.node()
    if not n.config.peers:
        n.close()
        click.echo("no peers configured ([peers.NODE_ID] in the configuration file)")
        return
    if peer and peer not in n.config.peers:
        n.close()
        raise click.ClickException(f"{peer!r} is not one of [peers] ({', '.join(sorted(n.config.peers))})")
    names = [peer] if peer else sorted(n.config.peers)
    bad = 0
    for name in names:
        try:
            answer = n.federation.client.get_json(name, "/ping")
            click.echo(f"{name}\tOK  \tit knows us as {answer.get('peer')}")
        except Exception as exc:  # noqa: BLE001 - report every peer
            bad += 1
            click.echo(f"{name}\tFAIL\t{exc}")
    n.close()
    if bad:
        sys.exit(1)


# -- ferry ---------------------------------------------------------------------------------
@main.group(help="Ferry links (网闸): recover from a file the isolation device lost.")
def ferry() -> None:
    pass


@ferry.command("resend", help="Write the kept copies of files SEQ (to --to) for PEER into its ferry_out again, "
                              "e.g. when the receiver's ferry-in says waiting_for a file the device lost. The "
                              "receiver archives a file it already has, so resending too many does no harm.")
@click.argument("peer")
@click.argument("seq", type=click.IntRange(1))
@click.option("--to", "last", type=click.IntRange(1), help="the last file to send again (default: SEQ alone)")
@pass_ctx
def ferry_resend(c: Ctx, peer: str, seq: int, last: int | None) -> None:
    from adapters.base import DeliveryError
    from gateway.federation import ferry as ferry_mod

    n = c.node()
    _require_schema(n)
    try:
        names = ferry_mod.resend(n, peer, seq, last, actor=f"cli:{_user()}")
    except (ferry_mod.FerryFailed, OSError, DeliveryError, ConfigError) as exc:  # a folder or SFTP server unreachable
        raise click.ClickException(str(exc)) from None
    finally:
        n.close()
    for name in names:
        click.echo(f"written again: {name}")


@ferry.command("skip", help="On the receiving node: give up on file SEQ from PEER, the one ferry-in is waiting "
                            "for, so that the files after it are imported. Its items are lost here unless the "
                            "file turns up after all. Use only when the sender cannot resend it.")
@click.argument("peer")
@click.argument("seq", type=click.IntRange(1))
@click.option("--reason", required=True, help="why (goes into the audit log), e.g. 网闸故障，原文件已丢失")
@click.option("--force", is_flag=True, help="skip it although no later file has arrived (the sender says it is gone)")
@pass_ctx
def ferry_skip(c: Ctx, peer: str, seq: int, reason: str, force: bool) -> None:
    from gateway.federation import ferry as ferry_mod

    n = c.node()
    _require_schema(n)
    try:
        name = ferry_mod.skip(n, peer, seq, reason, actor=f"cli:{_user()}", force=force)
    except ferry_mod.FerryFailed as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        n.close()
    click.echo(f"skipped: {name}; the next ferry-in imports the files after it")


if __name__ == "__main__":
    main()
