"""Making a rename or a new file's name survive a crash.

A file's own fsync makes its content durable, not the directory entry that names it: after
``os.replace(tmp, final)``, or once a file is created, the directory must be synced too
before the name can be relied on (POSIX; ext4 and XFS usually carry it along, but not by
promise)."""
from __future__ import annotations

import errno
import os

#: a file system that cannot sync a directory says so with one of these; nothing to do then
_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EPERM, errno.EACCES)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory ``path``. A directory that cannot be opened or a file system that
    does not sync directories (some network shares) is skipped; any other failure (EIO) is
    raised, since the name may then not be on disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)
