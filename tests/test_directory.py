"""The signed federation directory (节点目录).

End to end, three nodes as separate processes (``adapters/simulators/cluster.py``): the
prefecture publishes the directory; county A has no default route to the prefecture, so the
units it does not know from its own configuration are reachable only through the directory.
``gateway sync directory`` stores a verified directory and documents reach units listed only
there; an expired directory keeps routing (``/readyz`` says degraded, HTTP 200).

In process, against a fake prefecture answering ``get_json``: tampered, expired, malformed and
wrongly signed directories are refused (the old one kept, an audit entry written), an older
version is not applied, configuration wins over the directory, and a directory stored by one
process is used by another sharing the database.
"""
from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from adapters.simulators.cluster import CITY_B, COUNTY_A, EMERGENCY, PREFECTURE, Cluster, NodeProc, to_toml
from gateway import config as config_mod
from gateway import migrate, nodekey, units
from gateway.federation import directory
from gateway.federation.keys import public_text
from gateway.federation.signing import Signer
from gateway.models import AuditEntry, DirectoryVersion
from gateway.node import Node
from gateway.routing import NoRoute, Route
from tests.test_federation import rows

#: units of the prefecture that county A's configuration does not know (州直属单位)
EXTRA = units.make("11522300", "MB0T6A2K")
EXTRA2 = units.make("11522300", "MB1C7D3E")


# -- end to end: separate node processes ---------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dir"), overrides={
        "prefecture": {"federation": {"max_skew": 300, "publish_directory": True},
                       "routes": [{"units": [PREFECTURE, EMERGENCY, EXTRA, EXTRA2], "adapter": "docexchange"}]},
        # no default route to the prefecture: other units are known only from the directory
        "county-a": {"routes": [{"units": [COUNTY_A], "adapter": "docexchange"}]},
    })
    try:
        c.start()
        yield c
    finally:
        c.close()


def post_document(node: NodeProc, recipients: tuple[str, ...], title: str) -> requests.Response:
    s = node.session()
    sha = s.post(f"{node.url}/api/v1/blobs", data=f"{title} 正文".encode(),
                 headers={"Content-Type": "application/octet-stream"}).json()["sha256"]
    return s.post(f"{node.url}/api/v1/documents", json={
        "sender_unit": COUNTY_A, "issuer": "甲县人民政府办公室", "doc_type": "通知", "doc_number": "甲政办发〔2026〕8号",
        "title": title, "written_date": "2026-11-26", "recipients": [{"unit": u} for u in recipients],
        "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}})


def send_when_routable(node: NodeProc, recipients: tuple[str, ...], title: str, timeout: float = 10.0) -> str:
    """Accepted once the serving process has read the stored directory (every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        r = post_document(node, recipients, title)
        if r.status_code == 202:
            return str(r.json()["id"])
        assert r.status_code == 422 and r.json()["type"].endswith(":no-route"), r.text
        if time.monotonic() > deadline:
            pytest.fail(f"{node.id} still has no route after {timeout:.0f} s: {r.json()['detail']}")
        time.sleep(0.3)


def wait_signed(node: NodeProc, mid: str, want: set[str], timeout: float = 40.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = {x["unit"]: x for x in node.session().get(f"{node.url}/api/v1/documents/{mid}").json()["recipients"]}
        if set(got) == want and all(x["status"] == "signed" for x in got.values()):
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{node.id}: {({u: (x['status'], x['last_error']) for u, x in got.items()})}")
        time.sleep(0.2)


def sync_directory(node: NodeProc) -> dict[str, Any]:
    out = node.cli("sync", "directory", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["job"] == "directory" and result["outcome"] == "ok", result
    return dict(result["detail"])


def readyz(node: NodeProc) -> tuple[int, dict[str, Any]]:
    r = requests.get(f"{node.url}/readyz", timeout=10)
    return r.status_code, r.json()


def test_sync_stores_a_verified_directory_and_documents_reach_units_known_only_from_it(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    code, body = readyz(a)
    assert code == 200 and body["checks"]["directory"].startswith("none yet")
    r = post_document(a, (EXTRA,), "目录前")
    assert r.status_code == 422 and EXTRA in r.json()["detail"]  # not in county A's configuration

    # only signed requests from peers get the directory
    url = f"{pref.url}/federation/v1/directory"
    assert requests.get(url, timeout=10).status_code == 401
    stranger = Signer("county-a", Ed25519PrivateKey.generate()).sign("GET", url, {}, None, to="prefecture")
    assert requests.get(url, headers=stranger, timeout=10).status_code == 401
    a_url = f"{a.url}/federation/v1/directory"  # a county does not publish one
    signed = Signer("prefecture", nodekey.load_or_create(pref.data_dir)).sign("GET", a_url, {}, None, to="county-a")
    assert requests.get(a_url, headers=signed, timeout=10).status_code == 404
    # a request that names no target node (an old sender's) is refused by default
    untargeted = Signer("prefecture", nodekey.load_or_create(pref.data_dir)).sign("GET", a_url, {}, None)
    r = requests.get(a_url, headers=untargeted, timeout=10)
    assert r.status_code == 401 and "accept_untargeted" in r.json()["detail"]

    detail = sync_directory(a)
    assert detail["outcome"] == "stored" and detail["source"] == "prefecture"
    assert detail["nodes"] == 3 and detail["units"] == 6  # 4 at the prefecture, one at each county
    [(version, issuer, document)] = rows(a, select(DirectoryVersion.version, DirectoryVersion.issuer,
                                                   DirectoryVersion.document))
    assert version == detail["version"] and issuer == "prefecture"
    nodes = {n["id"]: n for n in json.loads(document)["nodes"]}
    assert nodes["county-b"]["units"] == [{"code": CITY_B, "name": None}]
    assert nodes["county-b"]["public_key"] == cluster.public["county-b"]
    assert nodes["prefecture"]["url"] == pref.url
    assert len(rows(a, select(AuditEntry.seq).where(AuditEntry.action == "directory.update"))) == 1

    # EXTRA is at the prefecture, CITY_B at county B (not a peer: through the parent)
    mid = send_when_routable(a, (EXTRA, CITY_B), "按目录路由")
    got = wait_signed(a, mid, {EXTRA, CITY_B})
    assert got[EXTRA]["route"] == "prefecture" and got[CITY_B]["route"] == "prefecture"
    assert got[EXTRA]["signer"] == "州人民政府办公室值班员" and got[CITY_B]["signer"] == "乙市人民政府办公室值班员"
    assert [d.recipient_unit for d in pref.soap.state.all_documents() if d.title == "按目录路由"] == [EXTRA]

    code, body = readyz(a)
    assert code == 200 and body["status"] == "ready"
    assert body["checks"]["directory"].startswith(f"ok: version {version} from node prefecture")
    metrics = requests.get(f"{a.url}/metrics", timeout=10).text
    assert 'gateway_directory_expiry_seconds{issuer="prefecture"}' in metrics


def test_an_expired_directory_keeps_routing_and_readyz_says_degraded(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    # the prefecture now publishes directories valid for 1.8 s
    cluster.overrides["prefecture"]["federation"]["directory_ttl_hours"] = 0.0005
    cluster.stop_node("prefecture")
    pref.config_path.write_text(to_toml(cluster.config_for(pref)), encoding="utf-8")
    cluster.start_node("prefecture")

    detail = sync_directory(a)
    assert detail["outcome"] == "stored"
    expires = datetime.fromisoformat(detail["expires_at"])
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)

    code, body = readyz(a)
    assert code == 200 and body["status"] == "degraded"
    assert body["checks"]["directory"].startswith(f"expired at {detail['expires_at']}")
    assert "still routing" in body["checks"]["directory"]

    mid = send_when_routable(a, (EXTRA2,), "目录过期后")
    assert wait_signed(a, mid, {EXTRA2})[EXTRA2]["route"] == "prefecture"
    metrics = requests.get(f"{a.url}/metrics", timeout=10).text
    [line] = [x for x in metrics.splitlines() if x.startswith("gateway_directory_expiry_seconds{")]
    assert float(line.split()[-1]) < 0
    log = (a.root / "node.log").read_text(encoding="utf-8", errors="replace")
    assert f"directory version {detail['version']} expired at" in log


# -- in process: the checks, against a fake prefecture -------------------------------------
COUNTY_B_ONLY = units.make("11522302", "MB2F8G4H")  # at county B per the directory, local per county A's routes


class Fed:
    """A publishing prefecture node and a county node (the fake peer answers get_json)."""

    def __init__(self, tmp_path: Path, database_url: str, *, migrated: bool = True, algorithm: str = "ed25519") -> None:
        dirs = {n: tmp_path / n for n in ("prefecture", "county-a", "county-b")}
        for d in dirs.values():
            d.mkdir()
        self.keys: dict[str, Any] = {n: nodekey.load_or_create(d) for n, d in dirs.items()}
        if algorithm == "sm2":
            self.keys["prefecture"] = nodekey.load_or_create_sm2(dirs["prefecture"])
        pub = {n: public_text(k) for n, k in self.keys.items()}
        self.pref = Node(config_mod.from_mapping({
            "node": {"id": "prefecture", "name": "州人民政府办公室", "units": [PREFECTURE, EMERGENCY],
                     "data_dir": str(dirs["prefecture"])},
            "database": {"url": f"sqlite:///{tmp_path}/pref.db"},
            "federation": {"publish_directory": True, "algorithm": algorithm},
            "peers": {"county-a": {"url": "http://127.0.0.1:9", "public_key": pub["county-a"], "units": [COUNTY_A]},
                      "county-b": {"url": "http://127.0.0.1:9", "public_key": pub["county-b"],
                                   "units": [CITY_B, COUNTY_B_ONLY]}},
        }, source="prefecture.toml"))
        self.county_cfg = config_mod.from_mapping({
            "node": {"id": "county-a", "units": [COUNTY_A], "data_dir": str(dirs["county-a"])},
            "database": {"url": database_url},
            "adapters": {"rec": {"type": "recording"}},
            "routes": [{"units": [COUNTY_A, COUNTY_B_ONLY], "adapter": "rec"}],
            "federation": {"parent": "prefecture"},
            "peers": {"prefecture": {"url": "http://127.0.0.1:9", "public_key": pub["prefecture"],
                                     "units": [PREFECTURE]}},
        }, source="county-a.toml")
        if migrated:
            migrate.upgrade(database_url)
        self.county = self.node()
        self.answers: list[dict[str, Any]] = []

    def node(self) -> Node:
        """A county node as one process sees it, its peer answering from :attr:`answers`."""
        n = Node(self.county_cfg)

        def get_json(peer: str, path: str) -> dict[str, Any]:
            assert (peer, path) == ("prefecture", "/directory")
            return self.answers.pop(0)

        n.federation.client.get_json = get_json  # type: ignore[method-assign]
        return n

    def serve(self, answer: dict[str, Any]) -> None:
        self.answers.append(answer)

    def published(self, now: datetime | None = None) -> dict[str, str]:
        return directory.publish(self.pref, url="http://127.0.0.1:8001", now=now)

    def signed(self, doc: Any, key: Ed25519PrivateKey | None = None, key_id: str = "prefecture") -> dict[str, str]:
        raw = doc if isinstance(doc, bytes) else directory.canonical(doc)
        sig = (key or self.keys["prefecture"]).sign(raw)
        return {"document": raw.decode(), "signature": base64.b64encode(sig).decode(), "key_id": key_id}

    def stored(self) -> list[int]:
        with self.county.db.sessions() as s:
            return list(s.scalars(select(DirectoryVersion.version).order_by(DirectoryVersion.version)))

    def audit(self, action: str) -> list[AuditEntry]:
        with self.county.db.sessions() as s:
            return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.seq)))

    def close(self) -> None:
        self.county.close()
        self.pref.close()


@pytest.fixture
def fed(tmp_path: Path, database_url: str) -> Iterator[Fed]:
    f = Fed(tmp_path, database_url)
    yield f
    f.close()


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Fed]:
    """The same nodes, the county's database not created (for what needs none)."""
    f = Fed(tmp_path, f"sqlite:///{tmp_path}/county.db", migrated=False)
    yield f
    f.close()


def test_the_published_document_is_canonical_signed_and_lists_nodes_keys_and_units(publisher: Fed) -> None:
    fed = publisher
    answer = fed.published()
    raw = answer["document"].encode()
    doc = json.loads(raw)
    assert directory.canonical(doc) == raw and answer["key_id"] == "prefecture"
    fed.keys["prefecture"].public_key().verify(base64.b64decode(answer["signature"]), raw)
    assert doc["issued_at"].endswith("Z") and doc["expires_at"].endswith("Z")
    issued, expires = datetime.fromisoformat(doc["issued_at"]), datetime.fromisoformat(doc["expires_at"])
    assert expires - issued == timedelta(hours=72)
    assert abs(doc["version"] - issued.timestamp() * 1000) < 1
    assert [(n["id"], n["parent"]) for n in doc["nodes"]] == [
        ("prefecture", None), ("county-a", "prefecture"), ("county-b", "prefecture")]
    assert doc["nodes"][0]["public_key"] == public_text(fed.keys["prefecture"])
    assert doc["nodes"][2]["public_key"] == public_text(fed.keys["county-b"])
    d = directory.parse(raw)
    assert d.units == {PREFECTURE: "prefecture", EMERGENCY: "prefecture", COUNTY_A: "county-a",
                       CITY_B: "county-b", COUNTY_B_ONLY: "county-b"}
    # every document issued is a newer version, a mere renewal too
    assert json.loads(fed.published(now=issued + timedelta(milliseconds=1))["document"])["version"] == doc["version"] + 1


def test_refresh_stores_a_newer_version_routes_by_it_and_configuration_wins(fed: Fed) -> None:
    with pytest.raises(NoRoute):
        fed.county.routes.route_for("documents", "notice", CITY_B)
    assert fed.county.known_nodes() == {"county-a", "prefecture"}
    fed.serve(fed.published())
    detail = directory.refresh(fed.county)
    assert detail["outcome"] == "stored" and detail["nodes"] == 3 and detail["units"] == 5
    assert fed.stored() == [detail["version"]]
    [entry] = fed.audit("directory.update")
    assert entry.actor == "node:prefecture" and json.loads(entry.detail)["version"] == detail["version"]
    routes = fed.county.routes
    assert routes.route_for("documents", "notice", CITY_B) == Route("node", "prefecture", "county-b")
    assert routes.route_for("documents", "notice", EMERGENCY) == Route("node", "prefecture", "prefecture")
    # [[routes]] win over the directory (which puts COUNTY_B_ONLY at county B)
    assert routes.route_for("documents", "notice", COUNTY_B_ONLY) == Route("adapter", "rec")
    assert directory.state(fed.county).state == "ok"  # type: ignore[union-attr]
    # the directory's nodes are known: an id ending in :county-b is county B's (envelope.id_owner)
    assert fed.county.known_nodes() == {"county-a", "prefecture", "county-b"}


def _tamper(doc: dict[str, Any]) -> None:
    doc["nodes"][2]["units"].append({"code": EXTRA, "name": None})


REJECTIONS: dict[str, tuple[str, Callable[[Fed], dict[str, str]]]] = {
    "tampered": ("bad-signature", lambda f: {**(a := f.published()), "document": a["document"].replace(
        CITY_B, EXTRA)}),
    "other-key": ("bad-signature", lambda f: f.signed(json.loads(f.published()["document"]),
                                                      key=Ed25519PrivateKey.generate())),
    "county-key": ("wrong-issuer", lambda f: f.signed(json.loads(f.published()["document"]),
                                                      key=f.keys["county-b"], key_id="county-b")),
    "other-issuer": ("wrong-issuer", lambda f: f.signed({**json.loads(f.published()["document"]),
                                                         "issuer": "county-b"})),
    "expired": ("expired", lambda f: f.published(now=datetime.now(UTC) - timedelta(hours=73))),
    "future": ("not-yet-valid", lambda f: f.published(now=datetime.now(UTC) + timedelta(hours=1))),
    "not-json": ("malformed", lambda f: f.signed(b'{"issuer": "prefecture", "version": ')),
    "bad-unit": ("malformed", lambda f: f.signed({**(d := json.loads(f.published()["document"])), "nodes": [
        {**d["nodes"][0], "units": [{"code": "11522300GDR9YB9551", "name": None}]}]})),
    "unit-twice": ("malformed", lambda f: f.signed({**(d := json.loads(f.published()["document"])), "nodes": [
        d["nodes"][0], {**d["nodes"][1], "units": [{"code": PREFECTURE, "name": None}]}]})),
    "no-signature": ("malformed", lambda f: {"document": f.published()["document"], "key_id": "prefecture"}),
}


def test_a_bad_directory_is_rejected_the_old_one_kept_and_audited(fed: Fed) -> None:
    fed.serve(fed.published())
    good = directory.refresh(fed.county)["version"]
    for n, (case, (kind, make)) in enumerate(REJECTIONS.items(), 1):
        fed.serve(make(fed))
        with pytest.raises(directory.DirectoryRejected) as exc:
            directory.refresh(fed.county)
        assert exc.value.kind == kind, f"{case}: {exc.value}"
        assert str(exc.value).startswith(f"directory from node prefecture rejected ({kind}): "), case
        assert fed.stored() == [good], case
        entries = fed.audit("directory.reject")
        assert len(entries) == n, case
        assert (entries[-1].actor, entries[-1].outcome, entries[-1].object) == (
            "node:prefecture", kind, "directory:prefecture"), case
        assert json.loads(entries[-1].detail)["reason"] == exc.value.reason, case
    with pytest.raises(NoRoute):  # the tampered one would have routed EXTRA to county B
        fed.county.routes.route_for("documents", "notice", EXTRA)
    assert fed.county.routes.route_for("documents", "notice", CITY_B).node == "county-b"
    assert len(fed.audit("directory.update")) == 1


def test_a_directory_signed_with_an_sm2_node_key_is_verified(tmp_path: Path) -> None:
    fed = Fed(tmp_path, f"sqlite:///{tmp_path}/county.db", algorithm="sm2")
    try:
        answer = fed.published()
        assert json.loads(answer["document"])["nodes"][0]["public_key"].startswith("sm2:")
        fed.serve(answer)
        assert directory.refresh(fed.county)["outcome"] == "stored"
        fed.serve({**fed.published(), "document": answer["document"].replace(CITY_B, EXTRA)})
        with pytest.raises(directory.DirectoryRejected, match="bad-signature"):
            directory.refresh(fed.county)
    finally:
        fed.close()


def test_an_older_or_equal_version_is_not_applied(fed: Fed) -> None:
    older = fed.published(now=datetime.now(UTC) - timedelta(minutes=5))
    newer = fed.published()
    fed.serve(newer)
    stored = directory.refresh(fed.county)["version"]
    for answer in (older, newer):
        fed.serve(answer)
        detail = directory.refresh(fed.county)
        assert detail["outcome"] == "unchanged" and detail["stored_version"] == stored
    assert fed.stored() == [stored]
    assert len(fed.audit("directory.update")) == 1


def test_a_directory_stored_by_another_process_is_used_within_seconds(fed: Fed) -> None:
    other = fed.node()  # a second process (gunicorn worker, `gateway sync`) on the same database
    try:
        fed.county.directory.interval = 0.2
        with pytest.raises(NoRoute):
            fed.county.routes.route_for("documents", "notice", CITY_B)
        fed.serve(fed.published())
        assert directory.refresh(other)["outcome"] == "stored"
        time.sleep(0.3)
        assert fed.county.routes.route_for("documents", "notice", CITY_B).node == "county-b"
        # a newer directory moves the unit: cached routes are dropped
        fed.pref.config.peers["county-b"].units.remove(CITY_B)
        fed.pref.config.node.units.append(CITY_B)
        fed.serve(fed.published())
        assert directory.refresh(other)["outcome"] == "stored"
        time.sleep(0.3)
        assert fed.county.routes.route_for("documents", "notice", CITY_B) == Route("node", "prefecture", "prefecture")
    finally:
        other.close()


def test_refresh_needs_a_source_and_a_publisher_needs_none(publisher: Fed, tmp_path: Path) -> None:
    fed = publisher
    assert directory.refresh(fed.pref)["outcome"] == "publisher"
    lone = Node(config_mod.from_mapping({"node": {"id": "county-x", "data_dir": str(tmp_path / "x")}}))
    try:
        with pytest.raises(directory.DirectoryError, match="no directory source"):
            directory.refresh(lone)
        assert directory.state(lone) is None
    finally:
        lone.close()
