"""Content-addressed blob store (claim check, 凭证存储) for bodies and attachments.

Uploads are streamed to a temporary file in the store's own folder while SHA-256 is
computed, fsynced, then renamed to ``<root>/<aa>/<bb>/<sha256>``. A blob is therefore either
complete under its final name or absent; the same content uploaded twice is stored once.
Memory use is one chunk, whatever the size.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import IO, BinaryIO

from gateway.durable import fsync_dir

CHUNK = 1024 * 1024


class BlobIncomplete(ValueError):
    """An upload ended before the size it announced."""


class BlobTooLarge(ValueError):
    pass


class BlobNoSpace(OSError):
    """Storing the upload would leave less free space than the reserve (or the disk is full)."""


#: a write that failed for want of space (a full file system, a user's quota)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(fd_or_path: int | str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``fd_or_path``."""
    st = os.fstatvfs(fd_or_path) if isinstance(fd_or_path, int) else os.statvfs(fd_or_path)
    return st.f_bavail * st.f_frsize


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _rel(sha256: str) -> str:
    """A blob's path relative to the store's folder."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError("not a SHA-256 hex digest")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


def _stat(dir_fd: int, sha256: str) -> tuple[int, float]:
    st = os.stat(_rel(sha256), dir_fd=dir_fd)
    return st.st_size, st.st_mtime


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self._prefix = str(self.root) + os.sep
        # sizes are looked up relative to the store's folder: a shorter path walk for each of
        # the (up to 100) attachments a document names on the accept path
        self._dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        # over a function of the folder, not a bound method: no cycle that keeps the store open
        self.known = functools.lru_cache(maxsize=self.KNOWN_SIZES)(functools.partial(_stat, self._dir_fd))
        #: per SHA-256, the time until which its file is known to be recent enough (see in_use)
        self._recent: dict[str, float] = {}

    def __del__(self) -> None:
        fd = getattr(self, "_dir_fd", None)
        if fd is not None:
            os.close(fd)

    def _where(self, sha256: str) -> str:
        # plain strings: pathlib's joins cost more than the stat they are for
        return self._prefix + _rel(sha256)

    def path(self, sha256: str) -> Path:
        return Path(self._where(sha256))

    def exists(self, sha256: str) -> bool:
        return os.path.isfile(self._where(sha256))

    #: sizes remembered by :meth:`known` (about 200 bytes each)
    KNOWN_SIZES = 16384

    known: Callable[[str], tuple[int, float]]
    """(size, modification time) of a stored blob as first found, remembered: for the accept
    path, where a document names up to 100 blobs. This spares a stat per blob per accept:
    each one hands the GIL to another request thread and back.

    A blob's content never changes under its SHA-256, so a size once found stays true; a blob
    not found is looked up again next time (it may have been uploaded since). The time only
    grows (marked in use, stored again), so the one remembered is never later than the
    file's. Content the unclaimed-content job removed may still be remembered here: the
    accept path asks :meth:`in_use` too, which then looks at the file. Someone who deletes
    blob files by hand should reload the API (``kill -HUP`` to gunicorn), or its workers go
    on accepting documents that name them (delivering those then fails, naming the missing
    blob)."""

    def known_size(self, sha256: str) -> int:
        """:meth:`size`, remembered (see :attr:`known`)."""
        return self.known(sha256)[0]

    def size(self, sha256: str) -> int:
        """The size of a stored blob; FileNotFoundError if there is none."""
        return _stat(self._dir_fd, sha256)[0]

    # -- in use: what the unclaimed-content job (gateway.retention) may not remove ------------
    # A file's modification time is the last time its content was written or used: stored,
    # stored again, named by a document being accepted, or arriving from another node. The
    # job removes only content that no stored message names and whose file is older than the
    # retention, and it looks at the file's time again after taking the file aside. Whoever is
    # about to name content in a new message marks it in use first (in_use, touch), so
    # content being named is never old enough to go.

    def touch(self, sha256: str) -> bool:
        """Mark stored content in use now; False if there is none (any more)."""
        rel = _rel(sha256)
        try:
            os.utime(rel, dir_fd=self._dir_fd)
        except FileNotFoundError:
            self._recent.pop(sha256, None)
            return False
        return True

    def in_use(self, shas: list[str], window: float) -> None:
        """Make sure each of ``shas`` was written or used within ``window`` seconds (marking
        it in use now if not), so that the unclaimed-content job, which keeps everything
        younger than twice that, leaves it alone while a message naming it is stored.
        FileNotFoundError naming the first that is not stored (any more). A file whose time is
        known (:attr:`known`, or marked here) to be recent enough is not looked at: on the
        accept path, where a document names content uploaded just before, that is a lookup
        or two per attachment and no system call."""
        now = time.time()
        recent, known, limit = self._recent, self.known, now - window
        for sha in shas:
            if recent.get(sha, 0.0) > now:
                continue
            try:
                if known(sha)[1] > limit:
                    continue
            except FileNotFoundError:
                raise FileNotFoundError(sha) from None
            rel = _rel(sha)
            try:
                mtime = _stat(self._dir_fd, sha)[1]
                if mtime < now - window:
                    os.utime(rel, dir_fd=self._dir_fd)
                    mtime = now
            except FileNotFoundError:
                recent.pop(sha, None)
                raise FileNotFoundError(sha) from None
            if len(recent) >= self.KNOWN_SIZES:
                recent.clear()
            recent[sha] = mtime + window

    def stored(self) -> Iterator[tuple[str, float, int]]:
        """(SHA-256, modification time, size) of every stored blob, folder by folder."""
        for top in sorted(os.listdir(self.root)):
            if len(top) != 2 or not (self.root / top).is_dir():
                continue  # tmp/, trash/
            for sub in sorted(os.listdir(self.root / top)):
                with os.scandir(self.root / top / sub) as it:
                    for e in it:
                        if _SHA256.fullmatch(e.name) and e.name.startswith(top + sub):
                            try:
                                st = e.stat()
                            except FileNotFoundError:
                                continue
                            yield e.name, st.st_mtime, st.st_size

    def set_aside(self, sha256: str, older_than: float) -> int | None:
        """Take stored content aside (rename it into ``trash/``) to be removed, unless it was
        written or used at ``older_than`` (a time) or later; its size if set aside, None if
        kept or not there. The file's time is read again once it is aside: content marked in
        use before the rename is put back, and whoever marks it in use after the rename finds
        it gone (and stores it again, or refuses the message that names it). :meth:`discard`
        removes it for good; until then a crash leaves it in ``trash/`` (see
        :meth:`recover_trash`)."""
        trash = self.root / "trash"
        trash.mkdir(exist_ok=True)
        aside = trash / sha256
        try:
            os.rename(self._where(sha256), aside)
        except FileNotFoundError:
            return None
        st = os.stat(aside)
        if st.st_mtime >= older_than:  # marked in use meanwhile: back where it was
            self._put_back(sha256, aside)
            return None
        return st.st_size

    def discard(self, sha256: str) -> None:
        """Remove content set aside by :meth:`set_aside`."""
        try:
            os.unlink(self.root / "trash" / sha256)
        except FileNotFoundError:
            pass
        self._recent.pop(sha256, None)
        self.known.cache_clear()  # type: ignore[attr-defined]

    def _put_back(self, sha256: str, aside: Path) -> None:
        try:
            os.link(aside, self._where(sha256))
        except FileExistsError:  # stored again meanwhile: the same content
            pass
        os.unlink(aside)

    def recover_trash(self, older_than: float) -> tuple[int, dict[str, int]]:
        """What a crash left in ``trash/`` (between :meth:`set_aside` and :meth:`discard`):
        each file written or used at ``older_than`` or later is put back, as set_aside would
        have; the others stay set aside, to be discarded. (how many were put back, {SHA-256:
        size} of those still set aside)."""
        trash = self.root / "trash"
        if not trash.is_dir():
            return 0, {}
        back, aside = 0, {}
        for e in list(os.scandir(trash)):
            try:
                st = e.stat()
                if not _SHA256.fullmatch(e.name):
                    os.unlink(e.path)
                elif st.st_mtime >= older_than:
                    self._put_back(e.name, Path(e.path))
                    back += 1
                else:
                    aside[e.name] = st.st_size
            except FileNotFoundError:
                continue
        return back, aside

    def sweep_tmp(self, older_than: float) -> tuple[int, int]:
        """Remove what was left in ``tmp/`` before ``older_than`` (a time): uploads cut off
        by a crash, ferry files never finished. (count, bytes)."""
        count = size = 0
        with os.scandir(self.root / "tmp") as it:
            for e in it:
                try:
                    st = e.stat()
                    if e.is_file() and st.st_mtime < older_than:
                        os.unlink(e.path)
                        count, size = count + 1, size + st.st_size
                except FileNotFoundError:
                    continue
        return count, size

    def open(self, sha256: str) -> BinaryIO:
        return open(self._where(sha256), "rb")

    def put_stream(self, stream: IO[bytes], max_bytes: int | None = None,
                   expect_bytes: int | None = None, keep_free: int = 0) -> tuple[str, int]:
        """Store everything ``stream`` yields; return (sha256, size). With ``expect_bytes``
        (an upload's Content-Length), a stream that ends short of it (the client went away)
        stores nothing and raises :class:`BlobIncomplete`. An upload that would leave less
        than ``keep_free`` bytes free on the store's file system, or meets a full one, stores
        nothing and raises :class:`BlobNoSpace`."""
        if keep_free and expect_bytes is not None:
            self._check_space(free_bytes(self.root / "tmp") - expect_bytes, keep_free)
        digest = hashlib.sha256()
        size = 0
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")  # (no inodes left: ENOSPC here)
            with os.fdopen(fd, "wb") as out:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise BlobTooLarge(f"the upload exceeds {max_bytes} bytes")
                    if keep_free:  # one statvfs a chunk (MiB): a stream of unknown length, others writing
                        self._check_space(free_bytes(fd) - len(chunk), keep_free)
                    digest.update(chunk)
                    out.write(chunk)
                if expect_bytes is not None and size != expect_bytes:
                    raise BlobIncomplete(f"the upload ended after {size} of its {expect_bytes} bytes "
                                         f"(Content-Length); nothing was stored")
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            for folder in self._place(tmp, sha):
                fsync_dir(folder)  # the new name is durable before the upload is answered
            return sha, size
        except OSError as exc:
            if tmp:
                _unlink(tmp)
            if exc.errno in _NO_SPACE and not isinstance(exc, BlobNoSpace):
                raise BlobNoSpace(exc.errno, "the file system holding the blob store is full; "
                                             "nothing was stored") from None
            raise
        except BaseException:
            if tmp:
                _unlink(tmp)
            raise

    @staticmethod
    def _check_space(left: int, keep_free: int) -> None:
        if left < keep_free:
            raise BlobNoSpace(errno.ENOSPC, f"storing it would leave {max(left, 0) // 2**20} MiB free on the "
                                            f"blob store's file system, below the {keep_free // 2**20} MiB kept "
                                            f"free ([api] min_free_bytes); nothing was stored")

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data))

    def put_many(self, contents: list[bytes]) -> None:
        """Store several small contents (a batch of forwarded messages' inline attachments),
        durable together: each is written and fsynced under a temporary name, then all are
        renamed, then the folders holding the new names are synced, each once. On a
        journaling file system (ext4, XFS) the first of those syncs commits the others'
        changes too, where syncing after each rename cost a journal commit per blob."""
        staged: list[str] = []
        try:
            shas: list[str] = []
            for data in contents:
                sha = hashlib.sha256(data).hexdigest()
                if sha in shas or self.touch(sha):  # stored already (marked in use); a batch is small
                    continue
                fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
                staged.append(tmp)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                shas.append(sha)
        except BaseException:
            for tmp in staged:
                _unlink(tmp)
            raise
        self.adopt(list(zip(staged, shas)))

    def adopt(self, staged: list[tuple[str, str]]) -> None:
        """Put files already written and fsynced in the store's ``tmp/`` folder, as
        (temporary path, SHA-256 of its content), under their names; then sync each folder
        holding a new name, once. A file not renamed when this fails is removed."""
        folders: dict[Path, None] = {}
        named = 0
        try:
            for tmp, sha in staged:
                folders.update(dict.fromkeys(self._place(tmp, sha)))
                named += 1
        except BaseException:
            for tmp, _ in staged[named:]:
                _unlink(tmp)
            raise
        for folder in folders:
            fsync_dir(folder)

    def _place(self, tmp: str, sha: str) -> list[Path]:
        """Rename ``tmp`` to the blob's final name; the folders to sync for that name to be
        durable: its own, and the parent of each folder made for it."""
        final = self.path(sha)
        new_dirs = [d for d in (final.parent.parent, final.parent) if not d.is_dir()]
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return [final.parent, *(d.parent for d in reversed(new_dirs))]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
