"""The content-addressed blob store: what makes an upload durable, and the sizes the
accept path remembers."""
from __future__ import annotations

import hashlib
import json
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


def test_a_batch_of_contents_is_synced_before_any_is_named_and_the_folders_once_after(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")
    store.put_bytes(b"already here")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    contents = [b"one", b"two", b"three", b"two", b"already here"]
    store.put_many(contents)
    for data in contents:
        assert store.path(hashlib.sha256(data).hexdigest()).read_bytes() == data
    kinds = [k for k, _ in events]
    renames = [p for k, p in events if k == "rename"]
    assert len(renames) == 3  # the duplicate and the stored one are not written again
    first, last = kinds.index("rename"), len(kinds) - 1 - kinds[::-1].index("rename")
    assert all(p.startswith(str(tmp_path / "blobs" / "tmp")) for k, p in events[:first])  # contents first
    folders = [p for _, p in events[last + 1:]]
    assert len(folders) == len(set(folders))  # each folder synced once, after every rename
    assert {str(store.path(hashlib.sha256(d).hexdigest()).parent) for d in (b"one", b"two", b"three")} <= set(folders)
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_batch_that_fails_leaves_no_name_and_no_temporary_file(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # type: ignore[no-untyped-def]
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        store.put_many([b"first", b"second", b"third"])
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert not any(store.path(hashlib.sha256(d).hexdigest()).exists() for d in (b"first", b"second", b"third"))


def test_a_new_node_key_is_durable_by_name(tmp_path, monkeypatch):
    """Peers pin a node's key: a crash right after it was made must not lose its name."""
    from gateway import nodekey

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    key = nodekey.load_or_create(tmp_path)
    assert synced[-1] == str(tmp_path)  # the folder, after the key file itself
    synced.clear()
    assert nodekey.load_or_create(tmp_path).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    assert synced == []  # loading writes nothing


def test_staged_files_are_adopted_with_their_folders_synced_once(tmp_path, monkeypatch):
    """The ferry stages blob files while it reads a transfer file, then adopts them."""
    store = BlobStore(tmp_path / "blobs")
    staged = []
    for data in (b"alpha", b"beta"):
        tmp = tmp_path / "blobs" / "tmp" / f"ferry-{data.decode()}"
        tmp.write_bytes(data)
        staged.append((str(tmp), hashlib.sha256(data).hexdigest()))
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    store.adopt(staged)
    for data in (b"alpha", b"beta"):
        path = store.path(hashlib.sha256(data).hexdigest())
        assert path.read_bytes() == data and str(path.parent) in synced
    assert len(synced) == len(set(synced)) and list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_stream_that_would_eat_into_the_space_kept_free_stores_nothing(tmp_path):
    """A stream of unknown length (a chunked upload) is checked as it comes, chunk by chunk."""
    import io

    from gateway.blobs import CHUNK, BlobNoSpace, free_bytes

    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(BlobNoSpace, match="min_free_bytes"):
        store.put_stream(io.BytesIO(b"z" * (3 * CHUNK)), keep_free=free_bytes(tmp_path) + 10 * 2**30)
    assert os.listdir(tmp_path / "blobs" / "tmp") == []
    # within the reserve it is stored as ever
    sha, size = store.put_stream(io.BytesIO(b"z" * (3 * CHUNK)), keep_free=2**20)
    assert size == 3 * CHUNK and store.known_size(sha) == size


def test_a_full_file_system_stores_nothing_and_says_so(tmp_path, monkeypatch):
    """The kernel's own ENOSPC: the temporary file is /dev/full, where every write fails so."""
    import io
    import tempfile

    from gateway import blobs
    from gateway.blobs import CHUNK, BlobNoSpace

    store = BlobStore(tmp_path / "blobs")
    real = tempfile.mkstemp
    made: list[str] = []

    def full_disk(**kw):  # type: ignore[no-untyped-def]
        fd, path = real(**kw)
        os.close(fd)
        made.append(path)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(blobs.tempfile, "mkstemp", full_disk)
    with pytest.raises(BlobNoSpace, match="full"):
        store.put_stream(io.BytesIO(b"y" * (2 * CHUNK)))
    assert made and os.listdir(tmp_path / "blobs" / "tmp") == []


def test_the_api_answers_507_storage_full_and_stores_nothing(tmp_path, database_url):
    from sqlalchemy import func, select

    from gateway import migrate
    from gateway.models import AuditEntry, Blob
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url, api={"min_free_bytes": 2**62})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        r = api.post("/api/v1/blobs", data=b"body " * 1000, content_type="application/octet-stream")
        assert r.status_code == 507 and r.mimetype == "application/problem+json"
        assert int(r.headers["Retry-After"]) >= 1  # as the OpenAPI document and docs/integrating.md say
        problem = r.get_json()
        assert problem["type"] == "urn:egov:gateway:problem:storage-full"
        assert "min_free_bytes" in problem["detail"] and "nothing was stored" in problem["detail"]
        with node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Blob)) == 0
            assert s.scalar(select(func.count()).where(AuditEntry.action == "blob.store")) == 0
        assert os.listdir(tmp_path / "var" / "blobs" / "tmp") == []
        spec = api.get("/api/v1/openapi.json").get_json()
        assert "507" in spec["paths"]["/api/v1/blobs"]["post"]["responses"]
    finally:
        node.close()


def test_no_room_even_for_the_temporary_file_is_no_space_too(tmp_path, monkeypatch):
    """Out of inodes (or a quota): creating the temporary file already fails with ENOSPC."""
    import errno
    import io

    from gateway import blobs
    from gateway.blobs import BlobNoSpace

    store = BlobStore(tmp_path / "blobs")

    def no_inodes(**kw):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs.tempfile, "mkstemp", no_inodes)
    with pytest.raises(BlobNoSpace, match="full"):
        store.put_stream(io.BytesIO(b"w" * 10))


def test_a_keys_daily_upload_quota_refuses_what_would_pass_it_and_stores_nothing(tmp_path, database_url):
    """``[api] upload_quota_bytes_per_day``: new content one key stored in the last 24 hours
    counts; an upload that would pass the quota is 429 with Retry-After, announced (Content-
    Length) or found out while streaming (chunked), and leaves no file, row or audit entry.
    Other keys are not affected, and uploads older than a day no longer count."""
    import io
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select, update

    from gateway import migrate
    from gateway.models import AuditEntry, Blob
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url, api={"upload_quota_bytes_per_day": 10_000})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api, other = Api(node), Api(node)

        def chunked(who: Api, data: bytes):  # type: ignore[no-untyped-def]  # no Content-Length, as gunicorn passes it
            return who.client.post("/api/v1/blobs", input_stream=io.BytesIO(data), headers={
                **who.headers, "Content-Type": "application/octet-stream"},
                environ_overrides={"wsgi.input_terminated": True})

        def stored() -> tuple[int, int]:
            with node.db.sessions() as s:
                return (s.scalar(select(func.count()).select_from(Blob)) or 0,
                        s.scalar(select(func.count()).where(AuditEntry.action == "blob.store")) or 0)

        api.upload(b"a" * 6000)
        small = api.upload(b"x" * 1000)
        assert api.upload(b"x" * 1000) == small  # content stored already: nothing new, not counted twice
        before = stored()
        for r in (api.post("/api/v1/blobs", data=b"b" * 5000, content_type="application/octet-stream"),
                  chunked(api, b"c" * 5000)):
            assert r.status_code == 429 and r.mimetype == "application/problem+json", r.get_data(as_text=True)
            problem = r.get_json()
            assert problem["type"] == "urn:egov:gateway:problem:upload-quota"
            assert "7000 of its 10000 bytes" in problem["detail"] and "nothing was stored" in problem["detail"]
            assert 86_000 < int(r.headers["Retry-After"]) <= 86_401
        # larger than the whole quota: no use waiting, so 413 and no Retry-After
        for r in (other.post("/api/v1/blobs", data=b"f" * 10_001, content_type="application/octet-stream"),
                  chunked(other, b"f" * 10_001)):
            assert r.status_code == 413 and "Retry-After" not in r.headers, r.get_data(as_text=True)
            assert "whole upload quota of 10000 bytes" in r.get_json()["detail"]
        assert stored() == before
        assert os.listdir(tmp_path / "var" / "blobs" / "tmp") == []
        assert chunked(api, b"d" * 3000).status_code == 201  # what still fits, to the byte
        assert other.upload(b"e" * 9000)  # another key has its own quota
        with node.db.begin() as s:  # a day later the first uploads no longer count
            s.execute(update(Blob).where(Blob.uploaded_by == api.key.split("_", 2)[1])
                      .values(created_at=datetime.now(UTC) - timedelta(hours=25)))
        assert api.upload(b"b" * 5000)
        spec = api.get("/api/v1/openapi.json").get_json()
        assert "429" in spec["paths"]["/api/v1/blobs"]["post"]["responses"]
    finally:
        node.close()


def test_an_upload_quota_that_is_not_a_count_of_bytes_is_refused_at_start(tmp_path, database_url):
    from gateway.config import ConfigError
    from tests.plugins.gatewaynode import node_config

    with pytest.raises(ConfigError, match="upload_quota_bytes_per_day"):
        node_config(tmp_path, database_url, api={"upload_quota_bytes_per_day": -1})


def test_a_key_of_its_own_quota_overrides_the_nodes_both_ways(tmp_path, database_url):
    """``gateway keys quota``: a key's own quota wins over ``[api] upload_quota_bytes_per_day``,
    smaller or larger; 0 (``none``) is no limit for that key; None goes back to the node's.
    The 429 says where the quota that refused it is set. A change is audited and in force
    once the key is looked up again (within auth.CACHE_SECONDS)."""
    from sqlalchemy import select

    from gateway import migrate
    from gateway.api import auth
    from gateway.models import AuditEntry
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config

    cfg = node_config(tmp_path, database_url, api={"upload_quota_bytes_per_day": 10_000})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        small, big, unlimited = Api(node), Api(node), Api(node)
        ids = {name: who.key.split("_", 2)[1] for name, who in (("small", small), ("big", big),
                                                               ("unlimited", unlimited))}
        assert auth.set_upload_quota(node.db, ids["small"], 3000, actor="cli:operator") is None
        assert auth.set_upload_quota(node.db, ids["big"], 50_000, actor="cli:operator") is None
        assert auth.set_upload_quota(node.db, ids["unlimited"], 0, actor="cli:operator") is None
        auth.forget_cached_keys()
        small.upload(b"s" * 2500)
        r = small.post("/api/v1/blobs", data=b"t" * 1000, content_type="application/octet-stream")
        assert r.status_code == 429, r.get_data(as_text=True)
        assert "2500 of its 3000 bytes" in r.get_json()["detail"]
        assert "gateway keys quota" in r.get_json()["detail"]
        big.upload(b"b" * 30_000)  # past the node's 10,000: its own quota is larger
        unlimited.upload(b"u" * 40_000)
        # back to the node's quota: 2,500 used of 10,000
        assert auth.set_upload_quota(node.db, ids["small"], None, actor="cli:operator") == 3000
        auth.forget_cached_keys()
        small.upload(b"t" * 1000)
        r = small.post("/api/v1/blobs", data=b"v" * 7000, content_type="application/octet-stream")
        assert r.status_code == 429 and "[api] upload_quota_bytes_per_day" in r.get_json()["detail"]
        with pytest.raises(LookupError, match="no active key"):
            auth.set_upload_quota(node.db, "nosuchkey", 1, actor="cli:operator")
        with pytest.raises(ValueError, match="expected 0"):
            auth.set_upload_quota(node.db, ids["big"], -1, actor="cli:operator")
        with node.db.sessions() as s:
            changes = [(e.object, e.actor, e.detail) for e in s.scalars(
                select(AuditEntry).where(AuditEntry.action == "admin.key.quota").order_by(AuditEntry.seq))]
        assert [c[0] for c in changes] == [f"key:{ids[n]}" for n in ("small", "big", "unlimited", "small")]
        assert all(c[1] == "cli:operator" for c in changes)
        assert json.loads(changes[-1][2]) == {"before": 3000, "upload_quota_bytes_per_day": None}
        assert json.loads(changes[2][2]) == {"before": None, "upload_quota_bytes_per_day": 0}
    finally:
        node.close()


@pytest.mark.parametrize("text, expected", [
    ("21474836480", 21474836480), ("20GiB", 20 * 2**30), ("500 MiB", 500 * 2**20), ("1.5GB", 1_500_000_000),
    ("64kb", 64_000), ("3 TiB", 3 * 2**40), ("7B", 7)])
def test_sizes_are_read_as_operators_write_them(text, expected):
    from gateway.api.auth import parse_size, shown_size

    assert parse_size(text) == expected
    assert parse_size(shown_size(expected).split(" (")[0].replace(" bytes", "")) == expected


@pytest.mark.parametrize("text", ["20G", "", "GiB", "-5MiB", "1e9", "twenty"])
def test_a_size_that_is_not_one_says_what_is_expected(text):
    from gateway.api.auth import parse_size

    with pytest.raises(ValueError, match="expected a number of bytes, optionally with a unit"):
        parse_size(text)
