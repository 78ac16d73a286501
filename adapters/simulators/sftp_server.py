"""Simulated county SFTP drop (legacy contract §2), in-process with paramiko.

NOT production code (see :mod:`adapters.simulators`). Two parts:

* :class:`SftpDropServer` - an SFTP server over a local folder: public-key auth only, every
  path confined to the folder (``..`` and symlinks leading outside are refused), atomic
  ``posix-rename@openssh.com``. The tests run the adapter against real OpenSSH too; this
  server must behave the same for everything the adapter uses.
* :class:`LegacySftpClerk` - what the legacy system does on that folder (one
  :class:`~adapters.simulators.exchange_box.FolderClerk` per unit folder): takes finished
  ``GW_*.xml`` documents (those with ``.ok``) from each unit's ``inbox/`` into ``archive/``,
  and writes receipts (回执) ``HZ_<docid>_<unit>.xml`` into ``outbox/`` the way a writer must
  (``.part`` -> rename -> empty ``.ok``), when a clerk signs (签收) or returns (退回) one.

Nothing here runs at import; threads start in ``start()`` and end in ``stop()``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface
from paramiko.sftp import SFTP_FAILURE, SFTP_OK, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED

from adapters.simulators.exchange_box import FolderClerk

log = logging.getLogger(__name__)

_WINDOW = 8 * 1024 * 1024


def generate_host_key() -> paramiko.PKey:
    """A fresh ed25519 key (paramiko cannot generate ed25519 itself), e.g. for the embedded
    default's host key or a demo client key. Save it with ``key.write_private_key_file``."""
    import io

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return paramiko.Ed25519Key(file_obj=io.StringIO(pem.decode("ascii")))


def public_line(key: paramiko.PKey) -> str:
    """``"ssh-ed25519 AAAA..."``: what an adapter's ``host_key`` pins."""
    return f"{key.get_name()} {key.get_base64()}"


# -- server ----------------------------------------------------------------------------------
class _Auth(paramiko.ServerInterface):
    """Public-key authentication only; sessions only for the sftp subsystem."""

    def __init__(self, authorized: list[paramiko.PKey]) -> None:
        self._authorized = {k.asbytes() for k in authorized}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.asbytes() in self._authorized:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class _Handle(SFTPHandle):
    def __init__(self, fh: Any, path: Path, flags: int) -> None:
        super().__init__(flags)
        self.filename = str(path)
        self.readfile = fh
        self.writefile = fh

    def stat(self) -> SFTPAttributes | int:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    def chattr(self, attr: SFTPAttributes) -> int:
        return SFTP_OP_UNSUPPORTED


def _done(fn: Any, *args: Any) -> int:
    fn(*args)
    return SFTP_OK


class _Confinement(Exception):
    """A path would leave the drop's root."""


class DropSFTPInterface(SFTPServerInterface):
    """An SFTP file system over ``root``; the client sees ``root`` as ``/``.

    Lexical ``..`` is collapsed against ``/`` (it cannot climb above the root); the real
    path is then resolved and must stay inside ``root``. Operations that act on a name
    itself (lstat, remove, rename, rmdir) resolve only its parent, so a symlink inside the
    drop can be seen and removed but never followed out of it. Symlinks are never created.
    """

    def __init__(
        self, server: paramiko.ServerInterface, *args: Any, root: Path, **kwargs: Any
    ) -> None:
        super().__init__(server, *args, **kwargs)
        self.root = Path(root).resolve()

    # path mapping
    def _real(self, path: str | bytes, *, follow: bool = True) -> Path:
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if "\x00" in path:
            raise _Confinement(path)
        rel = posixpath.normpath("/" + path).lstrip("/")
        if rel in ("", "."):
            return self.root
        candidate = self.root / rel
        real = candidate.resolve() if follow else candidate.parent.resolve() / candidate.name
        if not real.is_relative_to(self.root):
            log.warning("sftp drop: refused %r (resolves outside the root)", path)
            raise _Confinement(path)
        return real

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _Confinement:
            return SFTP_PERMISSION_DENIED
        except OSError as exc:
            return SFTPServer.convert_errno(exc.errno)

    # interface
    def canonicalize(self, path: str) -> str:
        return posixpath.normpath("/" + path) if path not in ("", ".") else "/"

    def list_folder(self, path: str) -> list[SFTPAttributes] | int:
        def run() -> list[SFTPAttributes]:
            real = self._real(path)
            out = []
            for name in sorted(os.listdir(real)):
                attr = SFTPAttributes.from_stat(os.lstat(real / name))  # lstat: links not followed
                attr.filename = name
                out.append(attr)
            return out

        return self._call(run)

    def stat(self, path: str) -> SFTPAttributes | int:
        return self._call(lambda: SFTPAttributes.from_stat(os.stat(self._real(path))))

    def lstat(self, path: str) -> SFTPAttributes | int:
        return self._call(
            lambda: SFTPAttributes.from_stat(os.lstat(self._real(path, follow=False)))
        )

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> SFTPHandle | int:
        def run() -> SFTPHandle:
            real = self._real(path)
            mode = getattr(attr, "st_mode", None) or 0o644
            fd = os.open(real, flags | getattr(os, "O_BINARY", 0), mode & 0o777)
            if flags & os.O_WRONLY:
                fmode = "ab" if flags & os.O_APPEND else "wb"
            elif flags & os.O_RDWR:
                fmode = "a+b" if flags & os.O_APPEND else "r+b"
            else:
                fmode = "rb"
            return _Handle(os.fdopen(fd, fmode), real, flags)

        return self._call(run)

    def remove(self, path: str) -> int:
        return self._call(lambda: _done(os.remove, self._real(path, follow=False)))

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTP v3 rename must not replace an existing target (OpenSSH behaves the same).
        def run() -> int:
            src, dst = self._real(oldpath, follow=False), self._real(newpath, follow=False)
            if os.path.lexists(dst):
                return SFTP_FAILURE
            os.rename(src, dst)
            return SFTP_OK

        return self._call(run)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        """posix-rename@openssh.com (paramiko's server dispatches it here): atomic, replaces
        the target."""
        return self._call(
            lambda: _done(
                os.replace, self._real(oldpath, follow=False), self._real(newpath, follow=False)
            )
        )

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        mode = getattr(attr, "st_mode", None) or 0o755
        return self._call(lambda: _done(os.mkdir, self._real(path, follow=False), mode & 0o777))

    def rmdir(self, path: str) -> int:
        return self._call(lambda: _done(os.rmdir, self._real(path, follow=False)))

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        return SFTP_OP_UNSUPPORTED

    def symlink(self, target_path: str, path: str) -> int:
        return SFTP_OP_UNSUPPORTED

    def readlink(self, path: str) -> int:
        return SFTP_OP_UNSUPPORTED


class SftpDropServer:
    """An in-process SFTP server over ``root`` (see the module docstring).

    ``port=0`` picks a free port; read :attr:`port` after :meth:`start`. Subclasses may set
    :attr:`sftp_interface` to change the file system (tests use that to play a hostile server).
    """

    sftp_interface: type[DropSFTPInterface] = DropSFTPInterface

    def __init__(
        self,
        root: Path,
        host_key: paramiko.PKey,
        authorized_keys: list[paramiko.PKey],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self.host_key = host_key
        self.authorized_keys = list(authorized_keys)
        self.host = host
        self._port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._transports: list[paramiko.Transport] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> SftpDropServer:
        self.root.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(16)
        sock.settimeout(0.2)  # accept() wakes up to notice stop(); closing does not wake it
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"sftp-drop:{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(conn, default_window_size=_WINDOW)
            transport.add_server_key(self.host_key)
            transport.set_subsystem_handler("sftp", SFTPServer, self.sftp_interface, root=self.root)
            try:
                # With an event the handshake runs in the transport's own thread, so one
                # slow client cannot hold up accept().
                transport.start_server(event=threading.Event(), server=_Auth(self.authorized_keys))
            except (paramiko.SSHException, OSError) as exc:
                log.info("sftp drop: handshake failed: %s", exc)
                transport.close()
                continue
            with self._lock:
                self._transports = [t for t in self._transports if t.is_active()] + [transport]

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            transports, self._transports = self._transports, []
        for t in transports:
            t.close()
        for t in transports:
            t.join(timeout=5)
        self._sock = None
        self._thread = None

    def __enter__(self) -> SftpDropServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the legacy clerk ------------------------------------------------------------------------
_UNIT_DIR = re.compile(r"[0-9A-Za-z]{1,32}")


@dataclass
class TakenDocument:
    """A document the legacy system took from a unit's inbox."""

    unit: str
    ref: str  # the archiveid = the <docid> of GW_<docid>.xml
    path: Path  # where it lies now (the unit's archive/)


class LegacySftpClerk:
    """The legacy system's side of the drop on a local folder ``root/<unit>/{inbox,outbox,...}``.

    Each unit folder is run by a :class:`~adapters.simulators.exchange_box.FolderClerk` (the
    same file discipline as the exchange box's shared folder): finished ``GW_*.xml`` go to
    ``archive/`` (invalid ones to ``failed/`` with a note), receipts are written
    ``.part`` -> rename -> ``.ok``. ``auto_sign`` (seconds) signs every taken document after
    that delay when running in the background (:meth:`start`) or at once in :meth:`run_once`.
    """

    def __init__(
        self,
        root: Path,
        *,
        units: list[str] | None = None,
        auto_sign: float | None = None,
        signer: str = "签收人",
    ) -> None:
        self.root = Path(root)
        self.units = list(units) if units is not None else None
        self.auto_sign = auto_sign
        self.signer = signer
        self.taken: list[TakenDocument] = []
        self._clerks: dict[str, FolderClerk] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def clerk(self, unit: str) -> FolderClerk:
        """The folder clerk of ``unit`` (its folders are created on first use)."""
        if not _UNIT_DIR.fullmatch(unit):
            raise ValueError(f"{unit!r} is not a unit folder name")
        with self._lock:
            if unit not in self._clerks:
                self._clerks[unit] = FolderClerk(self.root / unit)
            return self._clerks[unit]

    def _unit_names(self) -> list[str]:
        if self.units is not None:
            return self.units
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _UNIT_DIR.fullmatch(p.name)
        )

    def take_inbox(self) -> list[TakenDocument]:
        """Take every finished ``GW_*.xml`` (its ``.ok`` exists) of every unit."""
        got = [
            TakenDocument(unit, t.archive_id, t.path)
            for unit in self._unit_names()
            for t in self.clerk(unit).take()
        ]
        with self._lock:
            self.taken.extend(got)
        return got

    def sign(self, ref: str, unit: str, signer: str | None = None) -> Path:
        """The clerk signs for (签收) document ``ref`` at ``unit``: HZ_<ref>_<unit>.xml."""
        return self.clerk(unit).sign(ref, unit, signer=signer or self.signer)

    def return_document(self, ref: str, unit: str, reason: str, signer: str | None = None) -> Path:
        """The clerk returns (退回) document ``ref`` with a reason."""
        return self.clerk(unit).return_archive(ref, unit, reason, signer=signer or self.signer)

    def run_once(self) -> list[TakenDocument]:
        """Take the inboxes and, with ``auto_sign`` set, sign for what was taken at once."""
        got = self.take_inbox()
        if self.auto_sign is not None:
            for doc in got:
                self.sign(doc.ref, doc.unit)
        return got

    def start(self, interval: float = 1.0) -> LegacySftpClerk:
        """Take the inboxes every ``interval`` seconds in a background thread; with
        ``auto_sign``, sign for what was taken ``auto_sign`` seconds later."""
        self._stopping.clear()

        def loop() -> None:
            while not self._stopping.wait(interval):
                try:
                    got = self.take_inbox()
                    if (
                        self.auto_sign is not None
                        and got
                        and not self._stopping.wait(self.auto_sign)
                    ):
                        for doc in got:
                            self.sign(doc.ref, doc.unit)
                except OSError as exc:  # a half-written folder must not end the simulation
                    log.warning("legacy sftp clerk: %s", exc)

        self._thread = threading.Thread(target=loop, name="legacy-sftp-clerk", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
