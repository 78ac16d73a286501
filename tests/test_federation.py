"""Three nodes as separate processes on loopback (``adapters/simulators/cluster.py``): the
prefecture and two counties, each with its own SQLite database, key pair and SOAP document
exchange service. Forwarding, relaying through the prefecture, receipts flowing back, recall
across nodes, and the signed-request checks (bad signature, unknown key, replay, stale clock)."""
from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, select

from adapters.simulators.cluster import CITY_B, COUNTY_A, EMERGENCY, PREFECTURE, Cluster, NodeProc
from gateway import nodekey
from gateway.federation.signing import Signer
from gateway.models import AuditEntry, Delivery, Message



@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("fed"))
    try:
        c.start()
        yield c
    finally:
        c.close()


def send(node: NodeProc, sender: str, recipients: tuple[str, ...], title: str = "联网测试",
         **extra: object) -> str:
    s = node.session()
    sha = s.post(f"{node.url}/api/v1/blobs", data=f"{title} 正文".encode() * 200,
                 headers={"Content-Type": "application/octet-stream"}).json()["sha256"]
    doc = {"sender_unit": sender, "issuer": "测试机关", "doc_type": "通知", "doc_number": "州政办发〔2026〕41号",
           "title": title, "written_date": "2026-11-26", "recipients": [{"unit": u} for u in recipients],
           "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}, **extra}
    r = s.post(f"{node.url}/api/v1/documents", json=doc)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def statuses(node: NodeProc, mid: str) -> dict[str, dict]:
    r = node.session().get(f"{node.url}/api/v1/documents/{mid}")
    assert r.status_code == 200, r.text
    return {x["unit"]: x for x in r.json()["recipients"]}


def wait_for(node: NodeProc, mid: str, want: dict[str, str], timeout: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = statuses(node, mid)
        if {u: x["status"] for u, x in got.items()} == want:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{node.id}: statuses {({u: (x['status'], x['last_error']) for u, x in got.items()})}, "
                        f"expected {want}")
        time.sleep(0.2)


def rows(node: NodeProc, stmt):  # type: ignore[no-untyped-def]
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(stmt).all()
    finally:
        engine.dispose()


def test_a_document_reaches_units_at_two_counties_and_each_sign_for_comes_back(cluster: Cluster) -> None:
    pref, a, b = cluster.nodes["prefecture"], cluster.nodes["county-a"], cluster.nodes["county-b"]
    mid = send(pref, PREFECTURE, (EMERGENCY, COUNTY_A, CITY_B))
    got = wait_for(pref, mid, {EMERGENCY: "signed", COUNTY_A: "signed", CITY_B: "signed"})
    assert got[COUNTY_A]["signer"] == "甲县人民政府办公室值班员"
    assert got[CITY_B]["signer"] == "乙市人民政府办公室值班员"
    assert got[COUNTY_A]["route"] == "county-a" and got[CITY_B]["route"] == "county-b"
    assert [r["action"] for r in got[COUNTY_A]["receipts"]] == ["SIGNED"]
    # each county's legacy system got exactly one copy, with the body fetched from the prefecture
    [doc_a] = [d for d in a.soap.state.all_documents() if d.title == "联网测试"]
    assert doc_a.recipient_unit == COUNTY_A
    assert doc_a.body == "联网测试 正文".encode() * 200
    # the county stored the message for its own unit only, from the prefecture
    [(source, summary)] = rows(a, select(Message.source, Message.summary).where(Message.id == mid))
    assert source == "node:prefecture" and summary["origin"] == "prefecture"
    assert [u for (u,) in rows(a, select(Delivery.unit).where(Delivery.message_id == mid))] == [COUNTY_A]
    assert rows(b, select(Delivery.unit).where(Delivery.message_id == mid)) == [(CITY_B,)]


def test_county_to_county_traffic_is_relayed_by_the_prefecture(cluster: Cluster) -> None:
    pref, a, b = cluster.nodes["prefecture"], cluster.nodes["county-a"], cluster.nodes["county-b"]
    mid = send(a, COUNTY_A, (CITY_B,), title="县际转发测试")
    got = wait_for(a, mid, {CITY_B: "signed"})
    assert got[CITY_B]["route"] == "prefecture"  # the next hop
    assert got[CITY_B]["signer"] == "乙市人民政府办公室值班员"
    # the prefecture relayed it: it holds a copy routed on to county-b, also signed
    assert rows(pref, select(Delivery.target, Delivery.status).where(Delivery.message_id == mid)) == [
        ("county-b", "signed")]
    [(source,)] = rows(b, select(Message.source).where(Message.id == mid))
    assert source == "node:prefecture"
    forwards = rows(pref, select(AuditEntry.detail).where(AuditEntry.action == "message.forward",
                                                          AuditEntry.object == f"message:{mid}"))
    assert len(forwards) == 1 and json.loads(forwards[0][0])["node"] == "county-b"


def test_calling_systems_at_two_counties_that_number_alike_both_reach_the_prefecture(cluster: Cluster) -> None:
    """The OA systems of county A and city B (the same product) both number their document
    oa-2026-000037. Each node stores it with its own id after the caller's, so the
    prefecture, where both arrive, takes both, and each sign-for goes back to its sender."""
    pref, a, b = cluster.nodes["prefecture"], cluster.nodes["county-a"], cluster.nodes["county-b"]
    mid_a = send(a, COUNTY_A, (PREFECTURE,), title="甲县同号来文", message_id="oa-2026-000037")
    mid_b = send(b, CITY_B, (PREFECTURE,), title="乙市同号来文", message_id="oa-2026-000037")
    assert (mid_a, mid_b) == ("oa-2026-000037:county-a", "oa-2026-000037:county-b")
    wait_for(a, mid_a, {PREFECTURE: "signed"})
    wait_for(b, mid_b, {PREFECTURE: "signed"})
    got = dict(rows(pref, select(Message.id, Message.sender_unit).where(Message.id.like("oa-2026-000037%"))))
    assert got == {mid_a: COUNTY_A, mid_b: CITY_B}
    # the caller's own id still names its document at its node
    assert statuses(a, "oa-2026-000037")[PREFECTURE]["status"] == "signed"


def _signer_as(cluster: Cluster, node_id: str) -> Signer:
    return Signer(node_id, nodekey.load_or_create(cluster.nodes[node_id].data_dir))


def _post(url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json", **headers}, timeout=30)


def test_a_repeated_forward_is_accepted_once_and_answered_the_same(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    mid = send(pref, PREFECTURE, (COUNTY_A,), title="重复转发测试")
    wait_for(pref, mid, {COUNTY_A: "signed"})
    [(xml,)] = rows(pref, select(Message.envelope_xml).where(Message.id == mid))
    body = json.dumps({"message_id": mid, "units": [COUNTY_A], "hops": ["prefecture"],
                       "envelope": xml.decode()}).encode()
    url = f"{a.url}/federation/v1/messages"
    signer = _signer_as(cluster, "prefecture")
    answers = [_post(url, body, signer.sign("POST", url, {}, body, to="county-a")) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200], answers[0].text
    assert answers[0].json() == answers[1].json()
    assert answers[0].json()["units"] == [COUNTY_A]
    assert {r.headers["Idempotent-Replayed"] for r in answers} == {"true"}  # the worker's came first
    assert len(rows(a, select(Delivery.id).where(Delivery.message_id == mid))) == 1
    docs = [d for d in a.soap.state.all_documents() if d.title == "重复转发测试"]
    assert len(docs) == 1


def _rejections(node: NodeProc, kind: str) -> int:
    return len(rows(node, select(AuditEntry.seq).where(AuditEntry.action == "federation.reject",
                                                       AuditEntry.outcome == kind)))


@pytest.mark.parametrize("case", ["unsigned", "unknown-key", "wrong-key", "tampered-body", "other-path",
                                  "stale-past", "stale-future"])
def test_bad_node_requests_are_refused_with_a_problem_and_an_audit_entry(cluster: Cluster, case: str) -> None:
    pref = cluster.nodes["prefecture"]
    url = f"{pref.url}/federation/v1/status"
    body = json.dumps({"items": []}).encode()
    now = dt.datetime.now(dt.UTC)
    kind = {"unsigned": "bad-signature", "unknown-key": "unknown-key", "wrong-key": "bad-signature",
            "tampered-body": "bad-signature", "other-path": "bad-signature", "stale-past": "stale-request",
            "stale-future": "stale-request"}[case]
    if case == "unsigned":
        headers: dict[str, str] = {}
    elif case == "unknown-key":
        headers = Signer("county-x", Ed25519PrivateKey.generate()).sign("POST", url, {}, body, to="prefecture")
    elif case == "wrong-key":
        headers = Signer("county-a", Ed25519PrivateKey.generate()).sign("POST", url, {}, body, to="prefecture")
    else:
        signer = _signer_as(cluster, "county-a")
        created = {"stale-past": now - dt.timedelta(hours=1), "stale-future": now + dt.timedelta(hours=1)}.get(case)
        signed_url = url.replace("/status", "/recall") if case == "other-path" else url
        headers = signer.sign("POST", signed_url, {}, body, created=created, to="prefecture")
        if case == "tampered-body":
            body = json.dumps({"items": [{"message_id": "x"}]}).encode()
    before = _rejections(pref, kind)
    r = _post(url, body, headers)
    assert r.status_code == 401, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["type"] == f"urn:egov:gateway:problem:{kind}"
    assert problem["detail"]
    if case.startswith("stale"):
        assert "clock" in problem["detail"]
    assert _rejections(pref, kind) == before + 1


@pytest.mark.parametrize(("path", "body", "said"), [
    ("/status", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("/messages", b'{"n": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
    ("/status", b'{"items": [{"message_id": "\\ud800", "unit": "1152230107CTPD8U2P", "status": "delivered"}]}',
     "lone surrogate"),
    ("/recall", b'{"message_id": "a\\u0000b", "units": ["1152230107CTPD8U2P"]}', "NUL"),
    ("/reconcile", b'{"items": [{"message_id": "\\ud800", "unit": "1152230107CTPD8U2P"}]}', "lone surrogate"),
])
def test_a_signed_body_no_database_could_take_is_a_400_not_a_500(cluster: Cluster, path: str, body: bytes,
                                                                 said: str) -> None:
    """A pinned peer with a bug (or a bad version) gets an answer it can act on, not a 500
    that it retries for ever."""
    pref = cluster.nodes["prefecture"]
    url = f"{pref.url}/federation/v1{path}"
    r = _post(url, body, _signer_as(cluster, "county-a").sign("POST", url, {}, body, to="prefecture"))
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json") and said in r.json()["detail"]
    assert "set_int_max_str_digits" not in r.text


def test_a_replayed_request_is_refused(cluster: Cluster) -> None:
    pref = cluster.nodes["prefecture"]
    url = f"{pref.url}/federation/v1/ping"
    headers = _signer_as(cluster, "county-b").sign("GET", url, {}, None, to="prefecture")
    first = requests.get(url, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    assert first.json()["peer"] == "county-b"
    before = _rejections(pref, "replayed-request")
    again = requests.get(url, headers=headers, timeout=30)
    assert again.status_code == 401
    assert again.json()["type"] == "urn:egov:gateway:problem:replayed-request"
    assert _rejections(pref, "replayed-request") == before + 1


def test_a_status_report_for_a_copy_forwarded_elsewhere_changes_nothing(cluster: Cluster) -> None:
    """County B may report only on copies the prefecture forwarded to county B."""
    pref = cluster.nodes["prefecture"]
    mid = send(pref, PREFECTURE, (COUNTY_A,), title="越权回执测试")
    wait_for(pref, mid, {COUNTY_A: "signed"})
    url = f"{pref.url}/federation/v1/status"
    body = json.dumps({"items": [{"message_id": mid, "unit": COUNTY_A, "status": "returned",
                                  "reason": "冒充退回"}]}).encode()
    r = _post(url, body, _signer_as(cluster, "county-b").sign("POST", url, {}, body, to="prefecture"))
    assert r.status_code == 200 and r.json()["outcomes"] == {"unmatched": 1}
    assert statuses(pref, mid)[COUNTY_A]["status"] == "signed"


def test_recall_reaches_the_copy_at_another_node(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    b.soap.state.auto_sign_delay = 3600.0  # county B's clerk does not sign this one
    try:
        mid = send(pref, PREFECTURE, (CITY_B,), title="跨节点撤回测试")
        wait_for(pref, mid, {CITY_B: "delivered"})
        r = pref.session().post(f"{pref.url}/api/v1/documents/{mid}/recall")
        assert r.status_code == 202, r.text
        wait_for(pref, mid, {CITY_B: "recalled"})
        assert rows(b, select(Delivery.status).where(Delivery.message_id == mid)) == [("recalled",)]
    finally:
        b.soap.state.auto_sign_delay = cluster.sign_delay


def test_a_dead_letter_put_back_at_the_receiving_node_reaches_the_sender(cluster: Cluster) -> None:
    """County B's legacy system refuses a copy for good (a SOAP Client fault): dead-lettered
    there, failed at the prefecture. County B's operator fixes the cause and puts the row back
    with the CLI; the copy is delivered, and the prefecture's failed copy becomes delivered."""
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    b.soap.state.auto_sign_delay = 3600.0  # no sign-for: the test watches for "delivered"
    b.soap.state.fail_next(1, "client-fault", "SendDocument")
    try:
        mid = send(pref, PREFECTURE, (CITY_B,), title="死信重发测试")
        got = wait_for(pref, mid, {CITY_B: "failed"})
        assert "Client.Rejected" in (got[CITY_B]["last_error"] or "")
        listed = b.cli("outbox", "list", "--message", mid).stdout.splitlines()
        assert len(listed) == 2 and listed[1].startswith("1 dead-lettered row."), listed
        row, kind, target, message, unit = listed[0].split()[:5]
        assert (kind, target, message, unit) == ("deliver", "docexchange", mid, CITY_B)
        r = b.cli("outbox", "retry", row)
        assert r.stdout.strip() == f"1 row put back in the queue ({row}); 1 copy failed → queued", r.stderr
        wait_for(pref, mid, {CITY_B: "delivered"})
        assert rows(b, select(Delivery.status).where(Delivery.message_id == mid)) == [("delivered",)]
        assert rows(b, select(AuditEntry.actor).where(AuditEntry.action == "admin.outbox.retry")
                    .where(AuditEntry.object == f"delivery:{mid}/{CITY_B}"))[0][0].startswith("cli:")
        again = b.cli("outbox", "retry", row, check=False)
        assert again.returncode == 1 and f"nothing was retried: row {row}: it is done, not dead" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        b.soap.state.auto_sign_delay = cluster.sign_delay


def test_federation_config_errors_name_the_key(tmp_path: Path) -> None:
    from gateway import config as config_mod

    def err(raw: dict) -> str:
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.from_mapping(raw, source="node.toml")
        return str(e.value)

    assert "node.toml: federation.parent: 'prefecture' is not one of [peers]" in err(
        {"federation": {"parent": "prefecture"}})
    assert "peers.prefecture.public_key: missing" in err({"peers": {"prefecture": {"url": "http://x"}}})
    assert "peers.prefecture.url: missing" in err({"peers": {"prefecture": {"public_key": "ed25519:AA"}}})
    assert "peers.prefecture.link" in err({"peers": {"prefecture": {"url": "http://x", "public_key": "k",
                                                                    "link": "carrier-pigeon"}}})


def test_a_message_above_the_link_clearance_never_leaves_nor_enters(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    s = pref.session()
    sha = s.post(f"{pref.url}/api/v1/blobs", data="绝密正文".encode(),
                 headers={"Content-Type": "application/octet-stream"}).json()["sha256"]
    doc = {"sender_unit": PREFECTURE, "issuer": "测试机关", "doc_type": "通知", "doc_number": "州政办发〔2026〕60号",
           "title": "密级测试", "written_date": "2026-11-26", "classification": "绝密",
           "classification_period": "10年", "recipients": [{"unit": COUNTY_A}],
           "body": {"sha256": sha, "name": "正文.ofd"}}
    r = s.post(f"{pref.url}/api/v1/documents", json=doc)
    assert r.status_code == 422, r.text
    assert "cleared up to 机密" in r.json()["detail"]
    # and a node that receives one anyway refuses it (403), storing nothing
    ok = send(pref, PREFECTURE, (COUNTY_A,), title="密级测试二")
    [(xml,)] = rows(pref, select(Message.envelope_xml).where(Message.id == ok))
    forged_id = f"forged-{ok}"
    forged = (xml.decode().replace(ok, forged_id).replace(">非密<", ">绝密<"))
    body = json.dumps({"message_id": forged_id, "units": [COUNTY_A], "hops": ["prefecture"],
                       "envelope": forged}).encode()
    url = f"{a.url}/federation/v1/messages"
    r = _post(url, body, _signer_as(cluster, "prefecture").sign("POST", url, {}, body, to="county-a"))
    assert r.status_code == 403, r.text
    assert r.json()["type"] == "urn:egov:gateway:problem:clearance-too-low"
    assert rows(a, select(Message.id).where(Message.id == forged_id)) == []


def test_a_burst_of_documents_to_one_node_arrives_each_once(cluster: Cluster) -> None:
    """Forwards (and status reports) ready together for one node travel in one request."""
    from concurrent.futures import ThreadPoolExecutor

    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    with ThreadPoolExecutor(8) as pool:
        mids = list(pool.map(lambda i: send(pref, PREFECTURE, (COUNTY_A,), title=f"批量转发{i}"), range(24)))
    for mid in mids:
        wait_for(pref, mid, {COUNTY_A: "signed"})
    assert sorted(m for (m,) in rows(a, select(Message.id).where(Message.id.in_(mids)))) == sorted(mids)
    docs = [d for d in a.soap.state.all_documents() if d.title.startswith("批量转发")]
    assert len(docs) == len(mids) == len({d.doc_id for d in docs})
    forwards = rows(pref, select(AuditEntry.object).where(AuditEntry.action == "message.forward",
                                                          AuditEntry.object.in_([f"message:{m}" for m in mids])))
    assert len(forwards) == len(mids)


def test_forwards_in_one_batch_are_accepted_together_but_refused_one_by_one(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    mids = [send(pref, PREFECTURE, (COUNTY_A,), title=f"同批{i}") for i in range(3)]
    for mid in mids:
        wait_for(pref, mid, {COUNTY_A: "signed"})
    items = []
    for i, mid in enumerate(mids):
        [(xml,)] = rows(pref, select(Message.envelope_xml).where(Message.id == mid))
        again = f"again-{mid}"
        envelope = xml.decode().replace(mid, again)
        if i == 1:  # the middle one is for a unit county A would have to send back up: a loop,
            envelope = envelope.replace(COUNTY_A, CITY_B)  # refused inside the shared transaction
        items.append({"seq": 10_000_000 + i, "kind": "forward", "message_id": again,
                      "units": [COUNTY_A] if i != 1 else [CITY_B], "hops": ["prefecture"], "envelope": envelope})
    url = f"{a.url}/federation/v1/batch"
    body = json.dumps({"items": items}).encode()
    r = _post(url, body, _signer_as(cluster, "prefecture").sign("POST", url, {}, body, to="county-a"))
    assert r.status_code == 200, r.text
    assert [x["outcome"] for x in r.json()["results"]] == ["ok", "rejected", "ok"]
    assert r.json()["results"][1]["type"] == "no-route" and "loop" in r.json()["results"][1]["detail"]
    stored = {m for (m,) in rows(a, select(Message.id).where(Message.id.in_([i["message_id"] for i in items])))}
    assert stored == {items[0]["message_id"], items[2]["message_id"]}
    # the same batch again: nothing is applied twice, and the refused item is refused again (a
    # "duplicate" would have the sender record it as handed over)
    r = _post(url, body, _signer_as(cluster, "prefecture").sign("POST", url, {}, body, to="county-a"))
    assert [x["outcome"] for x in r.json()["results"]] == ["duplicate", "rejected", "duplicate"]
