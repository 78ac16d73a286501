"""Ferry links (网闸): batches carried as signed files instead of HTTP.

Between networks joined only by an isolation device (网闸) a node cannot call its peer. A peer
with ``link = "ferry"`` gets its items (forwards, status reports, recalls: the batch items of
:mod:`gateway.federation.batch`) written into *ferry files* by the ``ferry-out`` job; the
device carries the files across; the peer's ``ferry-in`` job verifies and imports them.
Statuses come back the same way, on the return ferry, as items like any other.

Where: ``[peers.X] ferry_out`` (files for X are written there) and ``ferry_in`` (files from X
arrive there), each a local folder (a path, e.g. the share the device copies) or a folder on
an SFTP server (a table: host, port, username, private_key_file, host_key or
known_hosts_file, path). One direction is enough for a one-way link.

A ferry file ``<from>_<to>_<sequence:10 digits>.ferry`` is a POSIX tar with, in this order:

* ``manifest.json``: ``{"format": "egov-gateway-ferry", "version": 1, "from", "to",
  "sequence", "created", "algorithm", "items": {"count", "first_seq", "last_seq", "size",
  "sha256"}, "blobs": [{"sha256", "size"}, ...]}`` (compact JSON, UTF-8);
* ``items.jsonl``: one batch item per line, in queue order;
* ``blobs/<sha256>``: every body and attachment the items' envelopes reference, in the
  manifest's order — the receiver can fetch nothing back across the device.

Beside it, ``<name>.sig`` holds the detached signature of the exact bytes of
``manifest.json`` made with the sending node's key (Ed25519 or SM2):
``{"format": "egov-gateway-ferry-signature", "version": 1, "node", "algorithm",
"manifest_sha256", "signature": <base64>}``. Each is written as ``<name>.part``, flushed to
disk (fsync; ``fsync@openssh.com`` over SFTP) and renamed into place, the ``.sig`` last: a
``.ferry`` without its ``.sig`` is not complete and is left alone.

The receiver takes the complete files of a peer in the order of their sequence and checks
the signature against the peer's pinned key, ``from``/``to``, every size and SHA-256 while
streaming (blobs are staged in the blob store's temporary folder and put in place only when
the whole file is good). Anything wrong rejects the whole file: nothing from it is applied,
it is moved to ``failed/`` beside a ``.error`` note, and ``ferry.reject`` is audited. A good
file is applied with :func:`gateway.federation.batch.apply_items` (its per-sender cursor
makes items applied before no-ops), recorded as an ingested item (sender, sequence, manifest
SHA-256: the same file is never imported twice) and moved to ``archive/``.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import paramiko
from cryptography.exceptions import InvalidSignature
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters import sftp as sftp_adapter
from adapters.base import AdapterContext, DeliveryError, PermanentError, RetryableError
from adapters.base import ConfigError as AdapterConfigError
from gateway.durable import fsync_dir
from gateway import audit
from gateway.blobs import BlobStore
from gateway.config import ConfigError, FerrySftpConfig
from gateway.envelope import Envelope, EnvelopeError
from gateway.federation import batch, keys, require_peers
from gateway.models import AdapterState, IngestedItem, OutboxEntry
from gateway.node import DbStateStore, Node
from gateway.scheduler import register
from gateway.worker import Job, Outcome, Worker

log = logging.getLogger("gateway.federation.ferry")

FORMAT = "egov-gateway-ferry"
SIG_FORMAT = "egov-gateway-ferry-signature"
VERSION = 1
EXT = ".ferry"
SIG_EXT = ".sig"
PART_EXT = ".part"
ERROR_EXT = ".error"
ARCHIVE = "archive"
FAILED = "failed"

_ID = r"[a-z][a-z0-9-]{1,31}"  # a node id (no "_": the name splits unambiguously)
NAME_RE = re.compile(rf"(?P<sender>{_ID})_(?P<recipient>{_ID})_(?P<seq>[0-9]{{10}})\.ferry")
_SHA = re.compile(r"[0-9a-f]{64}")

#: items per file (the same as an HTTP batch) and bytes of items.jsonl per file
MAX_ITEMS = batch.BATCH_SIZE
MAX_ITEMS_BYTES = 64 * 1024 * 1024
#: what a receiver accepts at most
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SIG_BYTES = 64 * 1024
READ_LIMIT_ITEMS = 4 * MAX_ITEMS_BYTES
CHUNK = 1024 * 1024
#: bytes asked of an SFTP server at once when reading (pipelined 32 KiB requests)
SFTP_WINDOW = 4 * 1024 * 1024

#: how long ferry-out holds the rows it is writing into a file
HOLD = timedelta(days=1)

_DESCRIBE = sftp_adapter._describe
#: errors of a location itself (disk, network): the run for that peer stops, nothing is judged
_LOCATION_ERRORS = (OSError, EOFError, paramiko.SSHException)


class FileRejected(Exception):
    """A ferry file that is wrong: the whole file is refused (``reason`` says why)."""


class FerryFailed(Exception):
    """``ferry-in`` imported nothing and refused files or could not read a location."""


# -- where files are -----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    mtime: float


class Location:
    """A folder that ferry files are written to or taken from."""

    where = ""

    def entries(self) -> dict[str, Entry]:
        """Regular files directly in the folder (symlinks and folders are never followed)."""
        raise NotImplementedError

    def open_read(self, name: str, size: int) -> Any:
        """A context manager giving a binary stream of the file ``name`` (``size`` as listed)."""
        raise NotImplementedError

    def read_small(self, name: str, limit: int) -> bytes:
        raise NotImplementedError

    def write(self, name: str, produce: Callable[[IO[bytes]], None]) -> int:
        """Write ``name`` as ``name.part`` with what ``produce`` writes, make it durable, then
        rename it into place. Returns the bytes written."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def move(self, name: str, folder: str, note: str | None = None) -> str:
        """Move ``name`` and its ``.sig`` into ``folder`` (``archive`` or ``failed``, beside
        ``.error`` with ``note``); returns the name it got there (a free one)."""
        raise NotImplementedError


class _Counting:
    def __init__(self, fh: Any) -> None:
        self.fh, self.n = fh, 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _free_name(name: str, taken: Callable[[str], bool]) -> str:
    """``name``, or a new name beside it when the name, its .sig or its .error note is taken
    there (a note left by a move cut short, or a link planted under its name: the note is
    created O_EXCL over SFTP, and would fail there for good)."""
    if not any(taken(name + ext) for ext in ("", SIG_EXT, ERROR_EXT)):
        return name
    stem = name.removesuffix(EXT)
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}{EXT}"


class FolderLocation(Location):
    """A folder: the one the isolation device reads from or writes to (usually a mounted share,
    never created here: a share that is not mounted would leave files on a local disk the
    device never sees, and a run would report them written), or, with ``create``, one of the
    node's own (the kept copies), made when first needed."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        self.where = str(path)
        self.create = create

    def _there(self) -> None:
        if self.create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise RetryableError(f"the ferry folder {self.path} does not exist or is not a folder (is the "
                                 f"isolation device's share mounted?)", code="unreachable")

    def entries(self) -> dict[str, Entry]:
        self._there()
        out: dict[str, Entry] = {}
        with os.scandir(self.path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out[e.name] = Entry(e.name, st.st_size, st.st_mtime)
        return out

    @contextmanager
    def open_read(self, name: str, size: int) -> Iterator[IO[bytes]]:
        with open(self.path / name, "rb", buffering=CHUNK) as fh:
            yield fh

    def read_small(self, name: str, limit: int) -> bytes:
        with open(self.path / name, "rb") as fh:
            return fh.read(limit + 1)

    def write(self, name: str, produce: Callable[[IO[bytes]], None]) -> int:
        self._there()
        part = self.path / (name + PART_EXT)
        try:
            with open(part, "wb") as fh:
                counter = _Counting(fh)
                produce(counter)  # type: ignore[arg-type]
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, self.path / name)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        fsync_dir(self.path)
        return counter.n

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def move(self, name: str, folder: str, note: str | None = None) -> str:
        dst = self.path / folder
        dst.mkdir(exist_ok=True)
        target = _free_name(name, lambda n: (dst / n).exists())
        if note is not None:
            (dst / (target + ERROR_EXT)).write_text(note, encoding="utf-8")
        os.replace(self.path / name, dst / target)
        if (self.path / (name + SIG_EXT)).exists():
            os.replace(self.path / (name + SIG_EXT), dst / (target + SIG_EXT))
        fsync_dir(dst)
        fsync_dir(self.path)
        return target


class _SftpReader:
    """Sequential reads of a remote file in windows of :data:`SFTP_WINDOW` bytes, each
    fetched with pipelined requests; memory is about one window."""

    def __init__(self, fh: paramiko.SFTPFile, size: int) -> None:
        self.fh, self.size, self.pos, self.buf = fh, size, 0, b""

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self.pos + len(self.buf)
        while len(self.buf) < n and self.pos < self.size:
            want = min(max(n - len(self.buf), SFTP_WINDOW), self.size - self.pos)
            data = b"".join(self.fh.readv([(self.pos, want)]))
            if not data:
                break
            self.pos += len(data)
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class SftpLocation(Location):
    """A folder on an SFTP server, reached through :class:`adapters.sftp.SftpAdapter` (its
    pinned host key, key authentication, TCP_NODELAY, timeouts)."""

    def __init__(self, sftp: paramiko.SFTPClient, root: str, where: str) -> None:
        self.sftp, self.root, self.where = sftp, root, where

    def _path(self, *parts: str) -> str:
        for p in parts:
            if not sftp_adapter._safe_component(p):
                raise PermanentError(f"refusing the name {p!r}", code="bad-name")
        return posixpath.join(self.root, *parts)

    def entries(self) -> dict[str, Entry]:
        sftp_adapter._makedirs(self.sftp, self.root)
        out: dict[str, Entry] = {}
        for a in self.sftp.listdir_attr(self.root):
            name = a.filename
            if not isinstance(name, str) or not sftp_adapter._safe_component(name):
                log.warning("ferry %s: skipping suspicious name %r", self.where, name)
                continue
            if stat.S_ISREG(a.st_mode or 0):  # lstat attributes: a symlink is never followed
                out[name] = Entry(name, int(a.st_size or 0), float(a.st_mtime or 0))
        return out

    @contextmanager
    def open_read(self, name: str, size: int) -> Iterator[Any]:
        fh = self.sftp.open(self._path(name), "rb")
        try:
            yield _SftpReader(fh, size)
        finally:
            fh.close()

    def read_small(self, name: str, limit: int) -> bytes:
        with self.sftp.open(self._path(name), "rb") as fh:
            return fh.read(limit + 1)

    def write(self, name: str, produce: Callable[[IO[bytes]], None]) -> int:
        sftp = self.sftp
        sftp_adapter._makedirs(sftp, self.root)
        part, final = self._path(name + PART_EXT), self._path(name)
        sftp_adapter._remove_quietly(sftp, part)
        # unbuffered: each write goes out as pipelined 32 KiB requests, memory is one chunk
        # "x": O_CREAT|O_EXCL, never written through a symlink planted under the name
        fh = sftp.open(part, "wxb", bufsize=0)
        try:
            fh.set_pipelined(True)
            counter = _Counting(fh)
            produce(counter)  # type: ignore[arg-type]
            sftp_adapter._confirm_writes(fh)
            _sftp_fsync(sftp, fh)
        except BaseException:
            fh.close()
            if sftp.get_channel().get_transport().is_active():
                try:
                    sftp_adapter._remove_quietly(sftp, part)
                except _LOCATION_ERRORS:
                    pass
            raise
        fh.close()
        size = sftp.stat(part).st_size
        if size != counter.n:
            raise RetryableError(f"{self.where}/{name}: the server has {size} bytes, {counter.n} were sent")
        sftp_adapter._rename_over(sftp, part, final)
        return counter.n

    def remove(self, name: str) -> None:
        sftp_adapter._remove_quietly(self.sftp, self._path(name))

    def move(self, name: str, folder: str, note: str | None = None) -> str:
        sftp = self.sftp
        dst = self._path(folder)
        sftp_adapter._makedirs(sftp, dst)
        target = _free_name(name, lambda n: sftp_adapter._exists(sftp, posixpath.join(dst, n)))
        if note is not None:
            sftp_adapter._create(sftp, posixpath.join(dst, target + ERROR_EXT), note.encode("utf-8"))
        sftp_adapter._rename_over(sftp, self._path(name), posixpath.join(dst, target))
        try:
            sftp_adapter._rename_over(sftp, self._path(name + SIG_EXT), posixpath.join(dst, target + SIG_EXT))
        except FileNotFoundError:
            pass
        return target


def _sftp_fsync(sftp: paramiko.SFTPClient, fh: paramiko.SFTPFile) -> bool:
    """Ask the server to flush the file to disk (OpenSSH's ``fsync@openssh.com``; paramiko
    has no call for it). False when the server does not offer it."""
    request = getattr(sftp, "_request", None)
    handle = getattr(fh, "handle", None)
    if request is None or handle is None:  # pragma: no cover - paramiko changed
        return False
    try:
        request(paramiko.sftp.CMD_EXTENDED, "fsync@openssh.com", handle)
    except OSError as exc:
        if "unsupported" in str(exc).lower():
            return False
        raise
    return True


def _sftp_adapter(node: Node, peer: str, direction: str, spec: FerrySftpConfig) -> sftp_adapter.SftpAdapter:
    name = f"ferry-{peer}-{direction}"
    cfg: dict[str, Any] = {"type": "sftp", "host": spec.host, "port": spec.port, "username": spec.username,
                           "private_key_file": spec.private_key_file, "root": spec.path,
                           "connect_timeout": spec.connect_timeout, "so_timeout": spec.so_timeout}
    for key in ("host_key", "known_hosts_file", "passphrase_env", "passphrase_file"):
        if getattr(spec, key) is not None:
            cfg[key] = getattr(spec, key)
    ctx = AdapterContext(blobs=node.blobs, state=DbStateStore(node.db, f"ferry-sftp:{peer}"),
                         base_dir=Path(node.config.base_dir), timezone=node.config.node.timezone)
    try:
        return sftp_adapter.SftpAdapter(name, cfg, ctx)
    except AdapterConfigError as exc:
        msg = str(exc).replace(f"adapters.{name}.", f"peers.{peer}.ferry_{direction}.")
        raise ConfigError(f"{node.config.source}: {msg}") from None


@contextmanager
def open_location(node: Node, peer: str, direction: str) -> Iterator[Location]:
    """The ``ferry_out`` (``direction="out"``) or ``ferry_in`` location of ``peer``."""
    spec = getattr(node.config.peers[peer], f"ferry_{direction}")
    if spec is None:
        raise ConfigError(f"{node.config.source}: peers.{peer}.ferry_{direction}: not configured")
    if isinstance(spec, str):
        p = Path(spec)
        yield FolderLocation(p if p.is_absolute() else Path(node.config.base_dir) / p)
        return
    adapter = _sftp_adapter(node, peer, direction, spec)
    try:
        with adapter._session() as client:
            yield SftpLocation(client, adapter.settings.root, adapter._where)
    finally:
        adapter.close()


def ferry_peers(node: Node, direction: str) -> list[str]:
    return [name for name, p in node.config.peers.items()
            if p.link == "ferry" and getattr(p, f"ferry_{direction}") is not None]


# -- state ---------------------------------------------------------------------------------
def _state_key(peer: str, key: str) -> tuple[str, str]:
    return (f"ferry:{peer}", key)


def sequence(node: Node, peer: str, key: str) -> int:
    """``out_seq``: the last file written for ``peer``; ``in_seq``: the highest sequence of a
    file imported from it."""
    with node.db.sessions() as s:
        row = s.get(AdapterState, _state_key(peer, key))
        return int(row.value) if row else 0


def _raise_sequence(s: Session, peer: str, key: str, value: int) -> None:
    row = s.get(AdapterState, _state_key(peer, key), with_for_update=True)
    if row is None:
        s.add(AdapterState(adapter=f"ferry:{peer}", key=key, value=str(value)))
    elif int(row.value) < value:
        row.value = str(value)


def file_key(peer: str, seq: int, manifest_sha256: str) -> str:
    """The ingested-item key of a ferry file."""
    return f"ferry:{peer}:{seq}:{manifest_sha256}"


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def file_name(sender: str, recipient: str, seq: int) -> str:
    return f"{sender}_{recipient}_{seq:010d}{EXT}"


def signature_file(node_id: str, key: keys.NodeKey, manifest: bytes) -> bytes:
    """The ``.sig`` beside a ferry file: the detached signature of the manifest's bytes."""
    return _canonical({"format": SIG_FORMAT, "version": VERSION, "node": node_id,
                       "algorithm": keys.algorithm_of(key), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                       "signature": base64.b64encode(key.sign(manifest)).decode("ascii")})


# -- writing a file (sender) ------------------------------------------------------------------
class _Hashing:
    def __init__(self, src: IO[bytes]) -> None:
        self.src, self.h, self.n = src, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.h.update(data)
        self.n += len(data)
        return data


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, mtime, 0o644, tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def write_tar(out: IO[bytes], manifest: bytes, items: bytes, blobs: list[tuple[str, int]],
              store: BlobStore, mtime: int) -> None:
    """The tar of a ferry file, streamed to ``out`` (blobs one chunk at a time)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
        tar.addfile(_member("manifest.json", len(manifest), mtime), io.BytesIO(manifest))
        tar.addfile(_member("items.jsonl", len(items), mtime), io.BytesIO(items))
        for sha, size in blobs:
            with store.open(sha) as src:
                h = _Hashing(src)
                tar.addfile(_member(f"blobs/{sha}", size, mtime), h)  # type: ignore[arg-type]
                if h.n != size or h.h.hexdigest() != sha:
                    raise OSError(f"blob {sha} in this node's store does not match its SHA-256 or size")


@dataclass
class _Plan:
    jobs: list[Job] = field(default_factory=list)  # their items are in the file
    lines: list[bytes] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)
    empty: list[Job] = field(default_factory=list)  # nothing left to send
    rest: list[Job] = field(default_factory=list)  # for the next file
    failed: Outcome | None = None  # a row that cannot go; the file ends before it


def _plan(node: Node, jobs: list[Job], max_bytes: int) -> _Plan:
    plan = _Plan()
    total = items_bytes = 0
    for i, job in enumerate(jobs):
        try:
            item = batch.item_for(node, job, inline=False)
            if item is None:
                plan.empty.append(job)
                continue
            line = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
            new: dict[str, int] = {}
            if job.kind == "forward" and job.envelope_xml is not None:
                for a in Envelope.from_xml(job.envelope_xml, validate=False).attachments:
                    if a.sha256 in plan.blobs or a.sha256 in new:
                        continue
                    if not node.blobs.exists(a.sha256):
                        raise RetryableError(f"{a.name} ({a.sha256[:12]}…) of message {job.message_id} is not "
                                             f"in this node's blob store; a ferry file must carry it")
                    new[a.sha256] = node.blobs.size(a.sha256)
        except (RetryableError, PermanentError) as exc:
            plan.failed, plan.rest = Outcome(job, error=exc), jobs[i + 1:]
            return plan
        add = len(line) + sum(new.values())
        if plan.jobs and (total + add > max_bytes or items_bytes + len(line) > MAX_ITEMS_BYTES):
            plan.rest = jobs[i:]
            return plan
        plan.jobs.append(job)
        plan.lines.append(line)
        plan.blobs.update(new)
        total += add
        items_bytes += len(line)
    return plan


def _hold(node: Node, worker: Worker, jobs: list[Job]) -> None:
    """Writing a large file may take longer than a lease: the claimed rows are held for a
    day, so no lease reaper hands them back meanwhile (only this job takes rows of a ferry
    peer, one run at a time, and a crashed run's rows are released by the next one)."""
    with node.db.begin() as s:
        s.execute(update(OutboxEntry).where(OutboxEntry.id.in_([j.id for j in jobs]),
                                            OutboxEntry.claimed_by == worker.id, OutboxEntry.state == "claimed")
                  .values(lease_until=datetime.now(UTC) + HOLD),
                  execution_options={"synchronize_session": False})


def _write_file(node: Node, peer: str, loc: Location, key: keys.NodeKey, worker: Worker,
                plan: _Plan) -> dict[str, Any]:
    seq = sequence(node, peer, "out_seq") + 1
    name = file_name(node.id, peer, seq)
    items = b"".join(plan.lines)
    now = datetime.now(UTC)
    blobs = list(plan.blobs.items())
    manifest = _canonical({
        "format": FORMAT, "version": VERSION, "from": node.id, "to": peer, "sequence": seq,
        "created": now.isoformat().replace("+00:00", "Z"), "algorithm": keys.algorithm_of(key),
        "items": {"count": len(plan.jobs), "first_seq": plan.jobs[0].id, "last_seq": plan.jobs[-1].id,
                  "size": len(items), "sha256": hashlib.sha256(items).hexdigest()},
        "blobs": [{"sha256": sha, "size": size} for sha, size in blobs]})
    digest = hashlib.sha256(manifest).hexdigest()
    sig = signature_file(node.id, key, manifest)
    # what a crashed run left under this name must not pair with the new file
    loc.remove(name + SIG_EXT)
    loc.remove(name)

    def write_file(out: IO[bytes]) -> None:
        write_tar(out, manifest, items, blobs, node.blobs, int(now.timestamp()))

    def write_sig(out: IO[bytes]) -> None:
        out.write(sig)

    kept = _kept(node, peer)
    if kept is not None:  # written here first, then copied: the copy can be sent again
        kept.write(name, write_file)
        kept.write(name + SIG_EXT, write_sig)
        size = loc.write(name, _copier(kept.path / name))
    else:
        size = loc.write(name, write_file)
    loc.write(name + SIG_EXT, write_sig)
    info = {"file": name, "sequence": seq, "items": len(plan.jobs), "first_seq": plan.jobs[0].id,
            "last_seq": plan.jobs[-1].id, "blobs": len(blobs), "bytes": size, "manifest_sha256": digest,
            "kept": kept is not None}
    # The sequence is taken before the rows are done: a crash in between sends the rows again
    # in the next file (the receiver's cursor answers them duplicate), never a number twice.
    with node.db.begin() as s:
        _raise_sequence(s, peer, "out_seq", seq)
        audit.append(s, actor=f"worker:{worker.id}", action="ferry.write", obj=f"ferry:{peer}/{name}",
                     detail={**info, "location": loc.where})
    log.info("ferry-out %s: wrote %s (%d items, %d blobs, %d bytes)", peer, name, len(plan.jobs), len(blobs), size)
    return info


# -- copies kept by the sender, for a file the device lost ------------------------------------
def kept_folder(node: Node, peer: str) -> Path:
    """Where this node keeps a copy of each file it wrote for ``peer`` (``ferry_keep_days``)."""
    return node.data_dir / "ferry-sent" / peer


def _kept(node: Node, peer: str) -> FolderLocation | None:
    return FolderLocation(kept_folder(node, peer), create=True) if node.config.peers[peer].ferry_keep_days > 0 else None


def _copier(path: Path) -> Callable[[IO[bytes]], None]:
    """What writes the file at ``path`` into a location (see :meth:`Location.write`)."""
    def produce(out: IO[bytes]) -> None:
        with open(path, "rb", buffering=CHUNK) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    return produce


def prune_kept(node: Node, peer: str) -> int:
    """Remove kept copies older than ``ferry_keep_days`` (and leftovers of a crashed write);
    returns how many files went."""
    folder = kept_folder(node, peer)
    if not folder.is_dir():
        return 0
    days = node.config.peers[peer].ferry_keep_days
    cutoff = time.time() - days * 86400
    gone = 0
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file(follow_symlinks=False) and (days <= 0 or e.stat().st_mtime < cutoff
                                                     or e.name.endswith(PART_EXT)):
                os.unlink(e.path)
                gone += 1
    return gone


def resend(node: Node, peer: str, first: int, last: int | None = None, actor: str = "cli") -> list[str]:
    """Put the kept copies of the files ``first``..``last`` for ``peer`` into its ``ferry_out``
    again (the device lost them). The receiver imports a file it never got and archives one it
    already has as a duplicate, so sending too many does no harm. Returns the file names."""
    if peer not in ferry_peers(node, "out"):
        raise FerryFailed(f"node {peer} is not a ferry peer with a ferry_out folder in {node.config.source}")
    last = first if last is None else last
    if last < first:
        raise FerryFailed(f"--to {last} is before file {first}; expected --to {first} or later (the last file of "
                          f"the range to write again)")
    written = sequence(node, peer, "out_seq")
    if not 1 <= first <= last <= written:
        raise FerryFailed(f"files {first}..{last}: this node has written files 1..{written} for node {peer}")
    folder = kept_folder(node, peer)
    names = [file_name(node.id, peer, seq) for seq in range(first, last + 1)]
    lost = [n for n in names if not ((folder / n).is_file() and (folder / (n + SIG_EXT)).is_file())]
    if lost:
        raise FerryFailed(f"{lost[0]} is no longer kept in {folder} (copies are kept for ferry_keep_days = "
                          f"{node.config.peers[peer].ferry_keep_days:g} days); its items cannot be sent again "
                          f"from here, and the receiver can only skip it (gateway ferry skip)")
    with open_location(node, peer, "out") as loc:
        for n in names:
            loc.remove(n + SIG_EXT)
            loc.remove(n)
            size = loc.write(n, _copier(folder / n))
            loc.write(n + SIG_EXT, _copier(folder / (n + SIG_EXT)))
            with node.db.begin() as s:
                audit.append(s, actor=actor, action="ferry.resend", obj=f"ferry:{peer}/{n}",
                             detail={"bytes": size, "location": loc.where})
            log.warning("ferry: %s written again to %s for node %s", n, loc.where, peer)
    return names


def _later_arrived(node: Node, peer: str, seq: int) -> bool:
    """Whether a file from ``peer`` numbered after ``seq`` is in the ferry_in location: the
    sign that file ``seq`` was lost on the way rather than not sent yet."""
    with open_location(node, peer, "in") as loc:
        for name in loc.entries():
            m = NAME_RE.fullmatch(name)
            if m and m["sender"] == peer and m["recipient"] == node.id and int(m["seq"]) > seq:
                return True
    return False


def skip(node: Node, peer: str, seq: int, reason: str, actor: str = "cli", force: bool = False) -> str:
    """Give up on the file ``seq`` from ``peer``, the one the link is waiting for: the files
    after it are imported from the next ``ferry-in`` on. Its items are lost here unless the
    file turns up after all (it is then imported like any other). Unless ``force``, a file
    after it must have arrived: until one has, file ``seq`` may simply not have been sent
    yet, and a mistyped number would skip the next file to come. Returns its name."""
    if peer not in ferry_peers(node, "in"):
        raise FerryFailed(f"node {peer} is not a ferry peer with a ferry_in folder in {node.config.source}")
    if not reason.strip():
        raise FerryFailed("give the reason (--reason): it goes into the audit log")
    expected = sequence(node, peer, "in_seq") + 1
    if seq != expected:
        raise FerryFailed(f"the link from node {peer} is waiting for file {expected}, not {seq}: only the file it "
                          f"waits for can be skipped")
    name = file_name(peer, node.id, seq)
    if not force:
        try:
            later = _later_arrived(node, peer, seq)
        except (DeliveryError, ConfigError, *_LOCATION_ERRORS) as exc:
            raise FerryFailed(f"cannot look into the ferry_in location of node {peer}: {_DESCRIBE(exc)}; give "
                              f"--force to skip {name} all the same") from None
        if not later:
            raise FerryFailed(f"no file after {name} has arrived from node {peer}, so it is not known to be lost: "
                              f"it may not have been sent yet; wait for it, or give --force if the sender says "
                              f"it is gone")
    with node.db.begin() as s:
        _raise_sequence(s, peer, "in_seq", seq)
        audit.append(s, actor=actor, action="ferry.skip", obj=f"ferry:{peer}/{name}", outcome="skipped",
                     detail={"reason": reason, "sequence": seq})
    log.warning("ferry: %s from node %s skipped (%s)", name, peer, reason)
    return name


def _queued(node: Node, peer: str) -> bool:
    with node.db.sessions() as s:
        return s.scalar(select(OutboxEntry.id).where(OutboxEntry.target == peer, OutboxEntry.state == "pending")
                        .limit(1)) is not None


def _send_to(node: Node, peer: str, loc: Location, worker: Worker, report: dict[str, Any]) -> None:
    key = keys.own_key(node.config)
    max_bytes = node.config.peers[peer].ferry_max_bytes
    while True:
        jobs = worker.claim(MAX_ITEMS, target=peer)
        if not jobs:
            return
        try:
            _hold(node, worker, jobs)
            plan = _plan(node, jobs, max_bytes)
        except BaseException:
            worker.release([j.id for j in jobs])
            raise
        batch.record_results(node, worker, plan.empty, [{"seq": j.id, "outcome": "ok"} for j in plan.empty])
        worker.release([j.id for j in plan.rest])
        if plan.jobs:
            try:
                info = _write_file(node, peer, loc, key, worker, plan)
            except BaseException:
                worker.release([j.id for j in plan.jobs] + ([plan.failed.job.id] if plan.failed else []))
                raise
            # the file is in place: the rows are done (the ferry is one way; statuses come
            # back on the return ferry)
            batch.record_results(node, worker, plan.jobs, [{"seq": j.id, "outcome": "ok"} for j in plan.jobs])
            report["files"].append(info)
            report["items"] += info["items"]
        if plan.failed is not None:
            worker.record([plan.failed])
            report.setdefault("not_sent", []).append({"seq": plan.failed.job.id, "error": str(plan.failed.error)[:300]})
            if plan.failed.error is not None and plan.failed.error.retryable:
                return  # it may pass: the rows after it wait for the next run, in order


def ferry_out(node: Node, peers: list[str] | None = None) -> dict[str, Any]:
    """Write the items queued for each ferry peer into signed files at its ``ferry_out``."""
    out: dict[str, Any] = {}
    for peer in peers if peers is not None else require_peers(ferry_peers(node, "out"),
                                                              'ferry peer with a ferry_out folder (link = "ferry")'):
        report: dict[str, Any] = {"files": [], "items": 0}
        out[peer] = report
        worker = Worker(node, worker_id=f"ferry-out:{peer}:{node.id}")
        batch.release_orphans(node, worker)
        prune_kept(node, peer)
        if not _queued(node, peer):
            continue  # nothing to write: not even a connection to the location
        try:
            with open_location(node, peer, "out") as loc:
                _send_to(node, peer, loc, worker, report)
        except (DeliveryError, ConfigError, *_LOCATION_ERRORS) as exc:
            log.warning("ferry-out %s: %s", peer, _DESCRIBE(exc))
            report["error"] = _DESCRIBE(exc)[:500]
    failed = [p for p, v in out.items() if "error" in v and not v["files"]]
    if failed and len(failed) == len(out):
        raise RetryableError("ferry-out: no file could be written (" +
                             "; ".join(f"{p}: {out[p]['error']}" for p in failed) + ")")
    return out


# -- reading a file (receiver) -----------------------------------------------------------------
@dataclass
class _Incoming:
    name: str
    seq: int
    manifest: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 of the manifest's bytes
    digest: str = ""
    items: list[dict[str, Any]] = field(default_factory=list)
    #: sha256 -> staged temporary file (None: the blob was here already)
    staged: dict[str, str | None] = field(default_factory=dict)
    #: imported before (only the manifest was read)
    duplicate: bool = False


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileRejected(f"{what}: not valid JSON ({exc})") from None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _next_member(tar: tarfile.TarFile, name: str, size: int | None, limit: int) -> tarfile.TarInfo:
    m = tar.next()
    if m is None:
        raise FileRejected(f"truncated: the file ends before {name}")
    if m.name != name:
        raise FileRejected(f"expected the member {name}, found {m.name!r}")
    if not m.isreg():
        raise FileRejected(f"{name}: not a regular file in the tar")
    if size is not None and m.size != size:
        raise FileRejected(f"{name}: {m.size} bytes in the tar, the manifest says {size}")
    if m.size > limit:
        raise FileRejected(f"{name}: {m.size} bytes; at most {limit} are accepted")
    return m


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(m)
    assert f is not None
    data = f.read(m.size)
    if len(data) != m.size:
        raise FileRejected(f"truncated: {m.name} ends after {len(data)} of {m.size} bytes")
    return data


def _check_manifest(node: Node, peer: str, seq: int, m: Any) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FileRejected(f"manifest.json: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise FileRejected(f"manifest.json: format version {m.get('version')!r}; this node reads {VERSION}")
    if m.get("from") != peer:
        raise FileRejected(f"from: the manifest says node {m.get('from')!r}; this folder takes files from "
                           f"node {peer}")
    if m.get("to") != node.id:
        raise FileRejected(f"to: addressed to node {m.get('to')!r}, not to this node ({node.id})")
    if m.get("sequence") != seq:
        raise FileRejected(f"sequence: the manifest says {m.get('sequence')!r}, the file name {seq}")
    it = m.get("items")
    if not (isinstance(it, dict) and all(_int(it.get(k)) for k in ("count", "first_seq", "last_seq", "size"))
            and isinstance(it.get("sha256"), str) and _SHA.fullmatch(it["sha256"])):
        raise FileRejected("manifest.json: items needs count, first_seq, last_seq, size and sha256")
    blobs = m.get("blobs")
    if not isinstance(blobs, list) or not all(
            isinstance(b, dict) and isinstance(b.get("sha256"), str) and _SHA.fullmatch(b["sha256"])
            and _int(b.get("size")) for b in blobs):
        raise FileRejected("manifest.json: blobs must be a list of {sha256, size}")
    if len({b["sha256"] for b in blobs}) != len(blobs):
        raise FileRejected("manifest.json: a blob is listed twice")
    limit = node.config.api.max_blob_bytes
    for b in blobs:
        if b["size"] > limit:
            raise FileRejected(f"blobs/{b['sha256']}: {b['size']} bytes; this node accepts at most {limit}")


def _check_items(spec: dict[str, Any], data: bytes) -> list[dict[str, Any]]:
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise FileRejected("items.jsonl: its SHA-256 does not match the manifest (changed after signing)")
    items = [_json(line, f"items.jsonl line {i}") for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    if not all(isinstance(i, dict) for i in items):
        raise FileRejected("items.jsonl: every line must be a JSON object")
    seqs = [i.get("seq") for i in items]
    if not all(_int(q) for q in seqs) or any(a >= b for a, b in zip(seqs, seqs[1:])):
        raise FileRejected("items.jsonl: each item needs an integer seq, strictly increasing")
    if len(items) != spec["count"] or not items or seqs[0] != spec["first_seq"] or seqs[-1] != spec["last_seq"]:
        raise FileRejected("items.jsonl: the items differ from the manifest's count, first_seq or last_seq")
    return items


def _stage_blob(store: BlobStore, f: IO[bytes], sha: str, size: int, inc: _Incoming) -> None:
    """Read one blob member to its end, checking its SHA-256; unless the store has it already,
    keep it in a temporary file of the store (put in place only if the whole file is good)."""
    h, n = hashlib.sha256(), 0
    have = store.touch(sha)  # stored already: marked in use (see BlobStore.in_use)
    out = None
    if not have:
        fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="ferry-")
        inc.staged[sha] = tmp
        out = os.fdopen(fd, "wb")
    else:
        inc.staged[sha] = None
    try:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if n != size:
        raise FileRejected(f"truncated: blobs/{sha} ends after {n} of {size} bytes")
    if h.hexdigest() != sha:
        raise FileRejected(f"blobs/{sha}: the content does not match its SHA-256 (changed after signing)")


def _check_blobs_present(node: Node, inc: _Incoming) -> None:
    """Every body and attachment a forward references must be in the file or here already:
    an import from a ferry never fetches anything from the peer."""
    for item in inc.items:
        if item.get("kind") != "forward" or not isinstance(item.get("envelope"), str):
            continue
        try:
            env = Envelope.from_xml(item["envelope"].encode("utf-8"), validate=False)
        except (EnvelopeError, ValueError):
            continue  # the import refuses that item itself
        for a in env.attachments:
            if a.sha256 not in inc.staged and not node.blobs.touch(a.sha256):
                raise FileRejected(f"missing blob {a.sha256} ({a.name}) of message {env.message_id} (item "
                                   f"{item.get('seq')}): the file does not carry it")


def read_file(node: Node, peer: str, loc: Location, entry: Entry, sig_entry: Entry, inc: _Incoming,
              imported: Callable[[str], bool]) -> None:
    """Verify one ferry file into ``inc``, streaming it once; its blobs are staged in
    ``inc.staged`` (the caller removes what is left there, whatever happens). Raises
    :class:`FileRejected`. Stops after the manifest when ``imported(file key)`` says the
    file was imported before (``inc.duplicate``)."""
    name, seq = entry.name, inc.seq
    if sig_entry.size > MAX_SIG_BYTES:
        raise FileRejected(f"{name}{SIG_EXT}: {sig_entry.size} bytes; not a signature file")
    sig = _json(loc.read_small(name + SIG_EXT, MAX_SIG_BYTES), name + SIG_EXT)
    if not isinstance(sig, dict) or sig.get("format") != SIG_FORMAT or sig.get("version") != VERSION:
        raise FileRejected(f"{name}{SIG_EXT}: not a {SIG_FORMAT} version {VERSION} file")
    try:
        signature = base64.b64decode(str(sig.get("signature")), validate=True)
    except ValueError:
        raise FileRejected(f"{name}{SIG_EXT}: the signature is not base64") from None
    public = node.federation.peer_key(peer)
    if public is None:  # pragma: no cover - every configured peer has a pinned key
        raise FileRejected(f"no pinned key for node {peer}")
    with loc.open_read(name, entry.size) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as tar:
                m = _next_member(tar, "manifest.json", None, MAX_MANIFEST_BYTES)
                manifest_bytes = _read_member(tar, m)
                digest = hashlib.sha256(manifest_bytes).hexdigest()
                if sig.get("manifest_sha256") != digest:
                    raise FileRejected("signature: the .sig file is for another manifest (manifest_sha256 differs)")
                try:
                    public.verify(signature, manifest_bytes)
                except (InvalidSignature, ValueError):
                    raise FileRejected(f"signature: does not verify with the pinned key of node {peer} "
                                       f"(signed by another key, or the manifest was changed)") from None
                manifest = _json(manifest_bytes, "manifest.json")
                _check_manifest(node, peer, seq, manifest)
                inc.manifest, inc.digest = manifest, digest
                if imported(file_key(peer, seq, digest)):
                    inc.duplicate = True
                    return
                spec = manifest["items"]
                m = _next_member(tar, "items.jsonl", spec["size"], READ_LIMIT_ITEMS)
                inc.items = _check_items(spec, _read_member(tar, m))
                for b in manifest["blobs"]:
                    m = _next_member(tar, f"blobs/{b['sha256']}", b["size"], b["size"])
                    f = tar.extractfile(m)
                    assert f is not None
                    _stage_blob(node.blobs, f, b["sha256"], b["size"], inc)
                extra = tar.next()
                if extra is not None:
                    raise FileRejected(f"unexpected member {extra.name!r} after the last blob")
        except (tarfile.TarError, UnicodeError) as exc:
            raise FileRejected(f"truncated or not a tar file: {exc}") from None
    _check_blobs_present(node, inc)


def _commit_blobs(store: BlobStore, inc: _Incoming) -> None:
    """The staged blobs under their names in the store, their folders synced (durable)."""
    staged = [(tmp, sha) for sha, tmp in inc.staged.items() if tmp is not None]
    for _, sha in staged:
        inc.staged[sha] = None  # adopt() renames it, or removes it if it cannot
    store.adopt(staged)


def _discard(inc: _Incoming) -> None:
    for tmp in inc.staged.values():
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _imported(node: Node) -> Callable[[str], bool]:
    def check(key: str) -> bool:
        with node.db.sessions() as s:
            return s.get(IngestedItem, key) is not None
    return check


class _Retry(Exception):
    """An item met trouble that may pass: the file stays for the next run."""


def _apply(node: Node, peer: str, loc: Location, inc: _Incoming) -> dict[str, Any]:
    _commit_blobs(node.blobs, inc)
    applied = batch.apply_items(node, peer, inc.items)
    counts: dict[str, int] = {}
    refused = []
    for r in applied["results"]:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] == "rejected":
            refused.append({"seq": r["seq"], "type": r.get("type"), "detail": str(r.get("detail"))[:300]})
            log.warning("ferry-in %s: %s item %s refused: %s: %s", peer, inc.name, r["seq"], r.get("type"),
                        r.get("detail"))
    if counts.get("retry"):
        detail = next(r.get("detail") for r in applied["results"] if r["outcome"] == "retry")
        raise _Retry(f"{inc.name}: item trouble that may pass, the rest waits for the next run: {detail}")
    info = {"file": inc.name, "sequence": inc.seq, "items": counts, "blobs": len(inc.staged),
            "manifest_sha256": inc.digest}
    if refused:
        info["refused"] = refused[:20]
    try:
        with node.db.begin() as s:
            s.add(IngestedItem(key=file_key(peer, inc.seq, inc.digest), adapter=f"ferry:{peer}",
                               outcome=json.dumps(counts, sort_keys=True)[:200]))
            _raise_sequence(s, peer, "in_seq", inc.seq)
            audit.append(s, actor=f"node:{peer}", action="ferry.import", obj=f"ferry:{peer}/{inc.name}",
                         detail={**info, "location": loc.where})
    except IntegrityError:  # recorded meanwhile by another run: the items were no-ops here
        log.info("ferry-in %s: %s was recorded by another run", peer, inc.name)
    loc.move(inc.name, ARCHIVE)
    log.info("ferry-in %s: imported %s (%s)", peer, inc.name, counts)
    return info


def _duplicate(node: Node, peer: str, loc: Location, inc: _Incoming) -> None:
    log.info("ferry-in %s: %s was imported before; archiving it again", peer, inc.name)
    with node.db.begin() as s:
        # sent again: its record is kept [worker] keep_peer_items_days from now (gateway.prune)
        s.execute(update(IngestedItem).where(IngestedItem.key == file_key(peer, inc.seq, inc.digest))
                  .values(at=datetime.now(UTC)), execution_options={"synchronize_session": False})
        audit.append(s, actor=f"node:{peer}", action="ferry.import", obj=f"ferry:{peer}/{inc.name}",
                     outcome="duplicate", detail={"file": inc.name, "sequence": inc.seq,
                                                  "manifest_sha256": inc.digest, "location": loc.where})
    loc.move(inc.name, ARCHIVE)


def _reject(node: Node, peer: str, loc: Location, name: str, seq: int | None, reason: str) -> dict[str, Any]:
    log.warning("ferry-in %s: rejecting %s: %s", peer, name, reason)
    with node.db.begin() as s:
        audit.append(s, actor=f"node:{peer}", action="ferry.reject", obj=f"ferry:{peer}/{name}", outcome="rejected",
                     detail={"file": name, "sequence": seq, "reason": reason, "location": loc.where})
    note = (f"{reason}\n\nrejected whole by node {node.id} at {datetime.now(UTC).isoformat(timespec='seconds')}: "
            f"nothing from this file was imported.\n")
    try:
        moved = loc.move(name, FAILED, note=note)
    except FileNotFoundError:  # taken away meanwhile
        moved = name
    return {"file": name, "sequence": seq, "reason": reason, "moved_to": f"{FAILED}/{moved}"}


def _take_from(node: Node, peer: str, loc: Location, report: dict[str, Any]) -> None:
    settle = node.config.peers[peer].ferry_settle
    listing = loc.entries()
    expected = sequence(node, peer, "in_seq") + 1
    files: list[tuple[int, str, re.Match[str] | None]] = []
    for name in listing:
        if name.endswith(EXT):
            m = NAME_RE.fullmatch(name)
            files.append((int(m["seq"]) if m else -1, name, m))
    files.sort(key=lambda f: (f[0], f[1]))
    imported = _imported(node)
    now = time.time()
    for seq, name, m in files:
        entry, sig = listing[name], listing.get(name + SIG_EXT)
        young = now - max(entry.mtime, sig.mtime if sig else 0.0) < settle
        if m is None or m["sender"] != peer or m["recipient"] != node.id:
            if sig is not None and not young:
                why = ("not a ferry file name: expected <from>_<to>_<10-digit sequence>.ferry" if m is None else
                       f"the name says from node {m['sender']} to node {m['recipient']}; this folder takes files "
                       f"from node {peer} to node {node.id}")
                report["rejected"].append(_reject(node, peer, loc, name, None, why))
            continue
        if sig is None:  # the signature comes last: not complete yet
            if seq >= expected:
                report["waiting_for"] = f"{name}{SIG_EXT}"
                return
            continue
        if seq > expected:  # files are imported in order: one is missing
            report["waiting_for"] = file_name(peer, node.id, expected)
            return
        inc = _Incoming(name, seq)
        try:
            read_file(node, peer, loc, entry, sig, inc, imported)
            if inc.duplicate:  # imported before: the file came again
                _duplicate(node, peer, loc, inc)
                report["duplicate"].append({"file": name, "sequence": seq})
                continue
            try:
                report["imported"].append(_apply(node, peer, loc, inc))
            except _Retry as exc:
                report["retry"] = str(exc)[:500]
                return
            expected = max(expected, seq + 1)
        except FileRejected as exc:
            if young:  # it may still be arriving (the device copies it): judged on a later run
                report["incomplete"] = name
                return
            report["rejected"].append(_reject(node, peer, loc, name, seq, str(exc)))
        finally:
            _discard(inc)


def ferry_in(node: Node, peers: list[str] | None = None) -> dict[str, Any]:
    """Verify and import the complete ferry files each ferry peer's ``ferry_in`` holds."""
    out: dict[str, Any] = {}
    for peer in peers if peers is not None else require_peers(ferry_peers(node, "in"),
                                                              'ferry peer with a ferry_in folder (link = "ferry")'):
        report: dict[str, Any] = {"imported": [], "duplicate": [], "rejected": []}
        out[peer] = report
        try:
            with open_location(node, peer, "in") as loc:
                _take_from(node, peer, loc, report)
        except (DeliveryError, ConfigError, *_LOCATION_ERRORS) as exc:
            log.warning("ferry-in %s: %s", peer, _DESCRIBE(exc))
            report["error"] = _DESCRIBE(exc)[:500]
    if not any(v["imported"] for v in out.values()):
        trouble = []
        for p, v in out.items():
            trouble += [f"{p}: rejected {r['file']}: {r['reason']}" for r in v["rejected"]]
            if "error" in v:
                trouble.append(f"{p}: {v['error']}")
        if trouble:
            raise FerryFailed("ferry-in imported nothing: " + "; ".join(trouble)[:1800])
    return out


register("ferry-out", ferry_out, "write the items queued for ferry peers (网闸) into signed batch files")
register("ferry-in", ferry_in, "verify and import the signed batch files ferry peers (网闸) sent to this node")
