"""Signed webhooks to the caller over real HTTP, and the operations endpoints."""
from __future__ import annotations

import base64
import os
import json
import re
import threading
import time
from datetime import datetime, UTC
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from adapters.base import PolledItem
from gateway.envelope import Receipt
from gateway.inbound import collect
from gateway.worker import Worker
from tests.plugins.gatewaynode import COUNTY_A, Api


class Receiver:
    """A caller's webhook endpoint: answers 500 to the first ``fail_first`` posts (or, with
    ``redirect_to``, 307 to that address every time)."""

    def __init__(self, fail_first: int = 0, redirect_to: str | None = None) -> None:
        self.posts: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        self.redirect_to = redirect_to
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @Request.application
    def app(self, request: Request) -> Response:
        self.posts.append((dict(request.headers), request.get_data()))
        if self.redirect_to:
            return Response("moved", status=307, headers={"Location": self.redirect_to})
        if len(self.posts) <= self.fail_first:
            return Response("busy", status=500)
        return Response("ok")


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()


def _drain_until(node, pred, timeout=10.0):  # type: ignore[no-untyped-def]
    w = Worker(node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        w.run_once()
        time.sleep(0.02)
    return pred()


def test_status_changes_reach_the_caller_signed_and_retried(gw_node, receiver):
    api = Api(gw_node, webhook_url=receiver.url)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    signed_at = datetime(2026, 11, 20, 2, 15, tzinfo=UTC)  # the clerk's 签收, before it reached the gateway
    rec.pending_items = [PolledItem(key="k1", receipt=Receipt(
        unit=COUNTY_A, action="SIGNED", remote_ref=rec.delivered[0].remote_ref, signer="李某",
        receipt_no="JXF-9", time=signed_at))]
    collect(gw_node, "rec")
    assert _drain_until(gw_node, lambda: sum(1 for _ in receiver.posts) >= 3)
    events = [json.loads(body) for headers, body in receiver.posts[1:]]  # the first answer was a 500
    assert sorted((e["status"], e["previous"]) for e in events) == [("delivered", "queued"), ("signed", "delivered")]
    # each change has an id of its own, and the retry of a failed post carries the same one
    failed = json.loads(receiver.posts[0][1])
    assert [e["id"] for e in events if e["status"] == failed["status"]] == [failed["id"]]
    assert len({e["id"] for e in events}) == 2
    # a 签收's time is the receipt's; the delivery's is when the gateway recorded it
    at = {e["status"]: datetime.fromisoformat(e["at"]) for e in events}
    assert at["signed"] == signed_at and at["delivered"] > signed_at
    assert all(e["message_id"] == mid and e["unit"] == COUNTY_A for e in events)
    # every post verifies with the node's published key, over timestamp + "." + body
    pem = api.get("/api/v1/webhooks/public-key").get_json()["public_key_pem"]
    pub = load_pem_public_key(pem.encode())
    for headers, body in receiver.posts:
        sig = headers["Gateway-Signature"].removeprefix("ed25519=")
        pub.verify(base64.b64decode(sig), headers["Gateway-Timestamp"].encode() + b"." + body)
    # and a tampered body does not
    headers, body = receiver.posts[-1]
    from cryptography.exceptions import InvalidSignature
    with pytest.raises(InvalidSignature):
        pub.verify(base64.b64decode(headers["Gateway-Signature"][8:]),
                   headers["Gateway-Timestamp"].encode() + b"." + body.replace(b'"unit"', b'"unjt"'))


#: a time as the API writes it: UTC, with Z
_UTC_Z = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")
_INTEGRATING = Path(__file__).resolve().parent.parent / "docs" / "integrating.md"


def test_webhook_times_are_written_as_the_api_writes_them_even_for_a_post_stored_before(gw_node):
    """``at`` is UTC with ``Z``, as in the API's answers. A payload is stored at the status
    change and posted (retried) later: one stored by an earlier version, with ``+00:00``, is
    posted with ``Z`` too, the same event (id) at the same instant."""
    from sqlalchemy import select, update

    from gateway.models import OutboxEntry

    receiver = Receiver(fail_first=1)
    try:
        api = Api(gw_node, webhook_url=receiver.url)
        mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
        worker = Worker(gw_node)
        worker.drain()  # delivered; its post is answered 500 and waits for its retry
        first = json.loads(receiver.posts[0][1])
        assert _UTC_Z.fullmatch(first["at"]), first["at"]
        accepted = api.get(f"/api/v1/documents/{mid}").get_json()["accepted_at"]
        assert _UTC_Z.fullmatch(accepted), accepted  # the API's form
        with gw_node.db.begin() as s:  # as an earlier version stored it, and due now
            row = s.scalars(select(OutboxEntry).where(OutboxEntry.kind == "webhook")).one()
            assert row.payload["at"] == first["at"]  # stored as posted
            old = datetime.fromisoformat(first["at"]).isoformat()
            assert old.endswith("+00:00")
            row.payload = {**row.payload, "at": old}
            s.execute(update(OutboxEntry).where(OutboxEntry.id == row.id).values(next_attempt_at=datetime.now(UTC)))
        worker.drain()
        retried = json.loads(receiver.posts[1][1])
        assert retried == first, (retried, first)
    finally:
        receiver.server.shutdown()


def _block(text: str, after: str, lang: str) -> str:
    """The first ```lang block of docs text after the heading ``after``."""
    m = re.search(re.escape(after) + r".*?```" + lang + r"\n(.*?)```", text, re.S)
    assert m, (after, lang)
    return m.group(1)


def test_the_verification_snippet_and_example_of_the_docs_run_as_written(gw_node):
    """docs/integrating.md's "Webhooks": the Python snippet, run as printed (the node's address
    its only change) against the node over real HTTP, accepts the node's real posts and
    refuses a changed body or a stale timestamp; the example body has the fields and the
    time form of a real post, and keeps to the OpenAPI document's schema."""
    import jsonschema

    from gateway.app import create_app

    docs = _INTEGRATING.read_text(encoding="utf-8")
    snippet, example = _block(docs, "## Webhooks", "python"), _block(docs, "## Webhooks", "json")
    served = make_server("127.0.0.1", 0, create_app(node=gw_node), threaded=True)
    threading.Thread(target=served.serve_forever, daemon=True).start()
    receiver = Receiver()
    try:
        assert 'BASE = "http://127.0.0.1:8080"' in snippet
        code = snippet.replace('BASE = "http://127.0.0.1:8080"', f'BASE = "http://127.0.0.1:{served.server_port}"')
        names: dict = {}
        exec(compile(code, str(_INTEGRATING), "exec"), names)  # noqa: S102 - the documentation's own code
        verified = names["verified"]
        api = Api(gw_node, webhook_url=receiver.url)
        api.post("/api/v1/documents", json=api.document())
        assert _drain_until(gw_node, lambda: len(receiver.posts) >= 1)
        headers, body = receiver.posts[0]
        assert verified(headers, body)
        assert not verified(headers, body.replace(b'"unit"', b'"unjt"'))
        assert not verified({**headers, "Gateway-Timestamp": str(int(time.time()) - 3600)}, body)
        shown, real = json.loads(example), json.loads(body)
        assert set(shown) == set(real), (shown, real)
        assert _UTC_Z.fullmatch(shown["at"]) and _UTC_Z.fullmatch(real["at"]), (shown["at"], real["at"])
        spec = api.client.get("/api/v1/openapi.json").get_json()
        jsonschema.validate(shown, {"$ref": "#/components/schemas/WebhookEvent", "components": spec["components"]},
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    finally:
        receiver.server.shutdown()
        served.shutdown()


def test_a_copys_webhooks_reach_the_caller_in_the_order_its_status_changed(gw_node):
    """A post the receiver failed is retried before any later change of the same copy is
    posted: the caller never hears `signed` before the `delivered` it was retrying, whatever
    the backoff. Another copy's posts do not wait for it."""
    from sqlalchemy import update

    from gateway.models import OutboxEntry
    from tests.plugins.gatewaynode import EMERGENCY

    receiver = Receiver(fail_first=1)
    try:
        api = Api(gw_node, webhook_url=receiver.url)
        api.post("/api/v1/documents", json=api.document())
        worker = Worker(gw_node)
        worker.drain()  # delivered; its post is answered 500 and waits for its retry
        assert [json.loads(b)["status"] for _, b in receiver.posts] == ["delivered"]
        rec = gw_node.adapter("rec")
        rec.pending_items = [PolledItem(key="k1", receipt=Receipt(
            unit=COUNTY_A, action="SIGNED", remote_ref=rec.delivered[0].remote_ref, signer="李某",
            receipt_no="JXF-10", time=datetime(2026, 11, 20, 2, 15, tzinfo=UTC)))]
        collect(gw_node, "rec")
        other = api.post("/api/v1/documents", json=api.document(recipients=(EMERGENCY,))).get_json()["id"]
        worker.drain()  # the 签收 waits behind the retry; the other document's copy does not
        assert [(json.loads(b)["message_id"] == other, json.loads(b)["status"]) for _, b in receiver.posts] == [
            (False, "delivered"), (True, "delivered")]
        with gw_node.db.begin() as s:  # the retry falls due
            s.execute(update(OutboxEntry).where(OutboxEntry.state == "pending")
                      .values(next_attempt_at=datetime.now(UTC)))
        worker.drain()
        mine = [json.loads(b)["status"] for _, b in receiver.posts if json.loads(b)["message_id"] != other]
        assert mine == ["delivered", "delivered", "signed"]
    finally:
        receiver.server.shutdown()


def test_a_webhook_is_never_redirected(gw_node):
    """A receiver answering 307 to another address (say an internal admin port) does not get
    the gateway to post there: the post fails and is retried to the address the key names."""
    inner = Receiver()
    outer = Receiver(redirect_to=inner.url + "/internal-admin")
    try:
        api = Api(gw_node, webhook_url=outer.url)
        api.post("/api/v1/documents", json=api.document())
        assert _drain_until(gw_node, lambda: len(outer.posts) >= 2)
        assert inner.posts == []
        with gw_node.db.sessions() as s:
            from sqlalchemy import select

            from gateway.models import OutboxEntry
            errors = list(s.scalars(select(OutboxEntry.last_error).where(OutboxEntry.kind == "webhook")))
        assert errors and "not redirected" in str(errors[0])
    finally:
        inner.server.shutdown()
        outer.server.shutdown()


def test_a_token_in_a_webhook_url_never_reaches_the_audit_log_or_stored_errors(gw_node):
    """A receiver that cannot read headers takes a token in its URL; the audit log is kept for
    good, so it (and the outbox's stored errors) show the URL without its query string."""
    hook = Receiver(fail_first=1)
    try:
        api = Api(gw_node, webhook_url=hook.url + "?token=s3cr3t-hook-token")
        api.post("/api/v1/documents", json=api.document())
        assert _drain_until(gw_node, lambda: len(hook.posts) >= 2)
        with gw_node.db.sessions() as s:
            from sqlalchemy import select

            from gateway.models import AuditEntry, OutboxEntry
            entries = list(s.scalars(select(AuditEntry)))
            errors = list(s.scalars(select(OutboxEntry.last_error).where(OutboxEntry.kind == "webhook")))
        texts = [json.dumps(e.detail, ensure_ascii=False) for e in entries] + [str(x) for x in errors]
        actions = {e.action for e in entries}
        assert {"admin.key.create", "webhook.attempt", "webhook.send"} <= actions, actions
        assert any(hook.url + "?…" in t for t in texts)
        assert not [t for t in texts if "s3cr3t" in t]
    finally:
        hook.server.shutdown()


def test_an_unexpected_error_sending_a_webhook_is_logged_without_the_urls_token(gw_node, monkeypatch, caplog):
    """A failure that is not an HTTP one (a bug, a library raising something unforeseen) is
    logged, but a traceback would print the exception's text and its cause's, which here name
    the URL with its token: the log line cuts the query out, as the stored error does."""
    import requests

    hook = Receiver()
    try:
        api = Api(gw_node, webhook_url=hook.url + "?token=s3cr3t-hook-token")
        api.post("/api/v1/documents", json=api.document())

        def broken_post(self, url, **kwargs):  # type: ignore[no-untyped-def]
            try:
                raise KeyError(f"no adapter for {url}")
            except KeyError as inner:
                raise ValueError(f"cannot post to {url}") from inner

        monkeypatch.setattr(requests.Session, "post", broken_post)
        caplog.set_level("DEBUG", logger="gateway")
        assert _drain_until(gw_node, lambda: any("sending a webhook" in r.getMessage() for r in caplog.records))
        logged = [(r.getMessage(), r.exc_text or "") for r in caplog.records]
        assert not [m for m in logged if "s3cr3t" in m[0] or "s3cr3t" in m[1]], logged
        line = next(m for m, _ in logged if "sending a webhook" in m)
        assert "ValueError: cannot post to " + hook.url + "?…" in line and "broken_post" in line, line
        with gw_node.db.sessions() as s:
            from sqlalchemy import select

            from gateway.models import OutboxEntry
            errors = [str(x) for x in s.scalars(select(OutboxEntry.last_error).where(OutboxEntry.kind == "webhook"))]
        assert errors and not [e for e in errors if "s3cr3t" in e], errors
    finally:
        hook.server.shutdown()


def test_the_http_librarys_debug_log_shows_a_webhook_url_without_its_token(gw_node, caplog):
    """A node run at DEBUG also logs urllib3's lines, which name each request's target with
    its query string: the token is cut out of them too (gateway.events.HideQueries)."""
    hook = Receiver()
    try:
        api = Api(gw_node, webhook_url=hook.url + "?token=s3cr3t-hook-token")
        api.post("/api/v1/documents", json=api.document())
        caplog.set_level("DEBUG", logger="urllib3")
        assert _drain_until(gw_node, lambda: len(hook.posts) >= 1)
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
        assert any('"POST /hook?… HTTP/1.1" 200' in m for m in lines), lines  # urllib3 did log the post
        assert not [m for m in lines if "s3cr3t" in m], lines
    finally:
        hook.server.shutdown()


def test_readyz_metrics_and_openapi(api, gw_node):
    assert api.client.get("/healthz").get_json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["migrations"] == "ok"
    api.post("/api/v1/documents", json=api.document())
    text = api.client.get("/metrics").get_data(as_text=True)
    assert 'gateway_outbox_entries{kind="deliver",state="pending"} 1.0' in text
    assert 'gateway_deliveries{status="queued",target="rec"} 1.0' in text
    spec = api.client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    post = spec["paths"]["/api/v1/documents"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/xml"}
    schema = spec["components"]["schemas"]["DocumentIn"]
    assert "doc_number" in schema["required"] and "recipients" in schema["properties"]
    assert "application/problem+json" in post["responses"]["422"]["content"]
    # every answer a caller can get is listed: the id taken (409), a wrong media type (415) …
    assert {"202", "400", "401", "403", "404", "409", "413", "415", "422"} <= set(post["responses"])
    get_one = spec["paths"]["/api/v1/documents/{id}"]["get"]
    assert set(get_one["responses"]["200"]["content"]) == {"application/json", "application/xml"}
    assert {"/healthz", "/readyz", "/metrics", "/api/v1/webhooks/public-key",
            "/api/v1/callbacks/{adapter}"} <= set(spec["paths"])
    assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]
    assert {"apiKey", "apiKeyHeader"} == set(spec["components"]["securitySchemes"])
    assert spec["info"]["description"].startswith("调用方")  # Chinese first
    docs = api.client.get("/api/v1/docs")
    assert docs.status_code == 200 and "接口文档" in docs.get_data(as_text=True)
    assert api.client.get("/api/v1/docs/assets/swagger-ui-bundle.js").status_code == 200


def test_readyz_says_not_ready_before_migrations(tmp_path):
    from gateway.app import create_app
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    node = Node(node_config(tmp_path, f"sqlite:///{tmp_path}/empty.db"))
    r = create_app(node=node).test_client().get("/readyz")
    assert r.status_code == 503 and "gateway db upgrade" in r.get_json()["checks"]["migrations"]
    node.close()


def test_readyz_says_not_ready_while_the_data_folder_has_less_room_than_the_setting(api, gw_node):
    """Below [api] ready_min_free_bytes free on the data folder's file system every accept
    would soon fail 507 storage-full: /readyz answers 503 and says why, so that a load
    balancer sends the accepts elsewhere. The probe writes nothing."""
    from gateway.blobs import free_bytes

    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["storage"] == "ok"
    gw_node.config.api.ready_min_free_bytes = free_bytes(gw_node.data_dir) + 2**40  # more than there is
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["status"] == "not ready", r.get_json()
    said = r.get_json()["checks"]["storage"]
    assert said.startswith("full: ") and str(gw_node.data_dir) in said and "ready_min_free_bytes" in said, said
    assert r.get_json()["checks"]["database"] == "ok"  # reads still work: only the room is short
    gw_node.config.api.ready_min_free_bytes = 0  # not checked
    assert api.client.get("/readyz").status_code == 200
    assert not (gw_node.data_dir / "storage-full.seen").exists()  # no write per probe


def test_readyz_watches_the_folder_of_a_sqlite_database_kept_outside_the_data_folder(tmp_path):
    from gateway.room import folders

    data = tmp_path / "var"
    assert folders(data, f"sqlite:///{data}/gateway.db") == [data]
    assert folders(data, f"sqlite:///{tmp_path}/db/gw.db") == [data, (tmp_path / "db").resolve()]
    assert folders(data, "postgresql://gw@db.internal/gateway") == [data]  # its disk is the server's


def test_blob_upload_is_streamed_and_content_addressed(api, gw_node):
    import hashlib
    import io

    data = b"\x00\x01OFD" * 300_000
    r = api.post("/api/v1/blobs", data=io.BytesIO(data), content_type="application/octet-stream")
    assert r.status_code == 201
    assert r.get_json() == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    again = api.post("/api/v1/blobs", data=data, content_type="application/octet-stream")
    assert again.get_json()["sha256"] == r.get_json()["sha256"]
    assert gw_node.blobs.path(r.get_json()["sha256"]).read_bytes() == data
    assert list((gw_node.blobs.root / "tmp").iterdir()) == []


def test_an_sm2_node_signs_its_webhooks_with_sm2(tmp_path, database_url, receiver):
    """[federation] algorithm = "sm2" (国密): webhooks too are signed with the node's SM2 key."""
    from gateway import migrate
    from gateway.federation.sm2 import SM2PublicKey
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    cfg = node_config(tmp_path, database_url, federation={"algorithm": "sm2"})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node, webhook_url=receiver.url)
        api.post("/api/v1/documents", json=api.document())
        assert _drain_until(node, lambda: len(receiver.posts) >= 2)
        published = api.get("/api/v1/webhooks/public-key").get_json()
        assert published["algorithm"] == "sm2-sm3"
        pub = SM2PublicKey.from_pem(published["public_key_pem"].encode())
        for headers, body in receiver.posts:
            alg, _, sig = headers["Gateway-Signature"].partition("=")
            assert alg == "sm2-sm3"
            pub.verify(base64.b64decode(sig), headers["Gateway-Timestamp"].encode() + b"." + body)
        from cryptography.exceptions import InvalidSignature
        headers, body = receiver.posts[-1]
        with pytest.raises(InvalidSignature):
            pub.verify(base64.b64decode(headers["Gateway-Signature"].partition("=")[2]),
                       headers["Gateway-Timestamp"].encode() + b"." + body + b" ")
    finally:
        node.close()


def test_metrics_can_ask_for_a_token_kept_outside_the_config_file(tmp_path, database_url, monkeypatch):
    from gateway import migrate
    from gateway.config import ConfigError
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    cfg = node_config(tmp_path, database_url, api={"metrics_token_env": "GW_TEST_METRICS_TOKEN"})
    migrate.upgrade(cfg.database_url())
    monkeypatch.delenv("GW_TEST_METRICS_TOKEN", raising=False)
    unset = Node(cfg)
    try:  # a token that cannot be read stops the start, naming the key
        with pytest.raises(ConfigError, match="api.metrics_token_env: environment variable GW_TEST_METRICS_TOKEN"):
            unset.check_adapters()
    finally:
        unset.close()
    monkeypatch.setenv("GW_TEST_METRICS_TOKEN", "scrape-me-7d1f")
    node = Node(cfg)
    try:
        node.check_adapters()
        client = Api(node).client
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me-7d1f"}):
            r = client.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.mimetype == "application/problem+json", headers
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.get_json()["type"] == "urn:egov:gateway:problem:metrics-token"
        r = client.get("/metrics", headers={"Authorization": "Bearer scrape-me-7d1f"})
        assert r.status_code == 200 and "gateway_outbox_entries" in r.get_data(as_text=True)
        spec = client.get("/api/v1/openapi.json").get_json()
        assert "401" in spec["paths"]["/metrics"]["get"]["responses"]
        # the legacy callback route answers 401 and 403 too, and says so
        assert {"401", "403"} <= set(spec["paths"]["/api/v1/callbacks/{adapter}"]["post"]["responses"])
    finally:
        node.close()


def test_a_metrics_token_from_a_file_and_what_is_refused(tmp_path, database_url, monkeypatch):
    from gateway.config import ConfigError
    from tests.plugins.gatewaynode import node_config

    (tmp_path / "metrics.token").write_text("a1b2c3d4\n", encoding="utf-8")
    cfg = node_config(tmp_path, database_url, api={"metrics_token_file": str(tmp_path / "metrics.token")})
    assert cfg.metrics_token() == "a1b2c3d4"
    monkeypatch.setenv("GW_TEST_METRICS_TOKEN", "  e5f6a7b8 \n")  # as a shell or a unit file may leave it
    assert node_config(tmp_path, database_url, api={"metrics_token_env": "GW_TEST_METRICS_TOKEN"}
                       ).metrics_token() == "e5f6a7b8"
    both = node_config(tmp_path, database_url, api={"metrics_token_env": "GW_TEST_METRICS_TOKEN",
                                                    "metrics_token_file": str(tmp_path / "metrics.token")})
    with pytest.raises(ConfigError, match="both set"):
        both.metrics_token()
    (tmp_path / "metrics.token").write_text("令牌 with spaces", encoding="utf-8")
    with pytest.raises(ConfigError, match="api.metrics_token_file: the token in .* printable ASCII"):
        cfg.metrics_token()
    (tmp_path / "metrics.token").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.metrics_token()


def test_metrics_say_when_each_job_last_succeeded_and_how_much_room_uploads_have(api, gw_node):
    """An alert on a schedule that stopped succeeding needs the last success and the latest
    outcome; one on uploads about to be refused 507 needs the free space and the reserve."""
    import re

    from gateway import scheduler

    def explode(node):  # type: ignore[no-untyped-def]
        raise RuntimeError("the legacy directory service said no")

    before = time.time()
    scheduler.register("test-metrics", lambda node: {"done": 1})
    try:
        assert scheduler.run_job(gw_node, "test-metrics", actor="test").outcome == "ok"
        scheduler.register("test-metrics", explode)  # the same job, failing from now on
        assert scheduler.run_job(gw_node, "test-metrics", actor="test").outcome == "failed"
        text = api.client.get("/metrics").get_data(as_text=True)
    finally:
        scheduler.unregister("test-metrics")

    def value(line_start: str) -> float:
        m = re.search("^" + re.escape(line_start) + r" (\S+)$", text, re.M)
        assert m, (line_start, text)
        return float(m.group(1))

    ok = value('gateway_job_last_success_timestamp_seconds{job="test-metrics"}')
    failed = value('gateway_job_last_run_timestamp_seconds{job="test-metrics",outcome="failed"}')
    assert before - 1 <= ok <= failed <= time.time() + 1
    assert 'gateway_job_last_run_timestamp_seconds{job="test-metrics",outcome="ok"}' not in text  # the latest only
    assert 'job="blobs"' not in text  # a job that never ran has no figures
    free = value("gateway_blob_store_free_bytes")
    statvfs = os.statvfs(gw_node.blobs.root)
    assert abs(free - statvfs.f_bavail * statvfs.f_frsize) < 64 * 2**20
    assert value("gateway_blob_store_reserve_bytes") == gw_node.config.api.min_free_bytes
