"""The content-addressed blob store: what makes an upload durable, and the sizes the
accept path remembers."""
from __future__ import annotations

import hashlib
import os

import pytest

from gateway.blobs import BlobStore


def test_an_upload_is_durable_by_name_before_it_is_answered(tmp_path, monkeypatch):
    """The content is fsynced before the rename, and the folder holding the new name after
    it (and the folders made for it, in their parents), or a crash could lose an
    acknowledged upload."""
    store = BlobStore(tmp_path / "blobs")
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    sha, size = store.put_bytes(b"first")
    leaf = store.path(sha).parent
    assert size == 5 and store.path(sha).read_bytes() == b"first"
    assert synced[0].startswith(str(tmp_path / "blobs" / "tmp"))  # the content, under its temporary name
    assert synced[1:] == [str(leaf), str(leaf.parent), str(leaf.parent.parent)]
    # another blob in the same folder: only that folder
    data = b"x87554"  # its SHA-256 also starts a793, as b"first"'s
    assert hashlib.sha256(data).hexdigest()[:4] == sha[:4]
    synced.clear()
    store.put_bytes(data)
    assert synced[1:] == [str(leaf)]


def test_known_sizes_are_remembered_and_absence_is_not(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = b"attachment"
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        store.known_size(sha)
    store.put_bytes(data)
    assert store.known_size(sha) == len(data)  # not remembered as missing
    os.unlink(store.path(sha))
    assert store.known_size(sha) == len(data)  # remembered: content never changes under its SHA-256
    with pytest.raises(FileNotFoundError):
        store.size(sha)  # the exact lookup, for everyone else
    with pytest.raises(ValueError):
        store.known_size("../../etc/passwd")


def test_a_folder_sync_that_fails_is_raised_unless_the_file_system_cannot_sync_folders(tmp_path, monkeypatch):
    import errno

    from gateway.durable import fsync_dir

    def failing(code):  # type: ignore[no-untyped-def]
        def fsync(fd):  # type: ignore[no-untyped-def]
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))  # e.g. a network share
    fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))  # the disk: the name may not be durable
    with pytest.raises(OSError) as exc:
        fsync_dir(tmp_path)
    assert exc.value.errno == errno.EIO
    fsync_dir(tmp_path / "no-such-folder")  # nothing to sync
