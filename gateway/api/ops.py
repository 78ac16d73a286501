"""Operations endpoints: /healthz, /readyz, /metrics, the OpenAPI document and its docs
page, the webhook public key, and adapter callbacks (legacy systems pushing receipts)."""
from __future__ import annotations

import hmac
from pathlib import Path

from flask import Blueprint, Response, current_app, json, render_template_string, request, send_from_directory
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text

from adapters.base import PermanentError
from gateway import inbound, nodekey
from gateway.api.common import node
from gateway.api.problems import Problem
from gateway.api.spec import document
from gateway.federation import directory
from gateway.migrate import current_is_head
from gateway.models import Delivery, OutboxEntry

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    n = node()
    checks: dict[str, str] = {}
    ok = True
    try:
        with n.db.engine.connect() as c:
            c.execute(text("SELECT 1"))
        checks["database"] = "ok"
        if not current_is_head(n.db.engine):
            checks["migrations"] = "pending: run 'gateway db upgrade'"
            ok = False
        else:
            checks["migrations"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unreachable: {type(exc).__name__}"
        ok = False
    fed_dir = directory.state(n) if ok else None
    if fed_dir is not None:  # an expired directory still routes: ready, but degraded
        checks["directory"] = fed_dir.text
    status = ("degraded" if fed_dir is not None and fed_dir.degraded else "ready") if ok else "not ready"
    body = {"status": status, "node": n.id, "checks": checks}
    return Response(json.dumps(body, ensure_ascii=False), status=200 if ok else 503, mimetype="application/json")


class _DbCollector:
    """Queue depth and delivery states read from the database at scrape time, so the figures
    are the same whichever process (gunicorn worker) answers."""

    def __init__(self, n) -> None:  # type: ignore[no-untyped-def]
        self.n = n

    def collect(self):  # type: ignore[no-untyped-def]
        with self.n.db.sessions() as s:
            outbox = GaugeMetricFamily("gateway_outbox_entries", "Outbox rows by kind and state",
                                       labels=["kind", "state"])
            for kind, state, count in s.execute(select(OutboxEntry.kind, OutboxEntry.state, func.count())
                                                .group_by(OutboxEntry.kind, OutboxEntry.state)):
                outbox.add_metric([kind, state], count)
            yield outbox
            deliveries = GaugeMetricFamily("gateway_deliveries", "Deliveries by target and status",
                                           labels=["target", "status"])
            for target, status, count in s.execute(select(Delivery.target, Delivery.status, func.count())
                                                   .group_by(Delivery.target, Delivery.status)):
                deliveries.add_metric([target or "", status], count)
            yield deliveries
        yield from directory.metrics(self.n)


@bp.get("/metrics")
def metrics() -> Response:
    reg = CollectorRegistry()
    reg.register(_DbCollector(node()))  # type: ignore[arg-type]
    return Response(generate_latest(reg), mimetype="text/plain; version=0.0.4")


@bp.get("/api/v1/openapi.json")
def openapi_json() -> Response:
    return Response(json.dumps(document(), ensure_ascii=False), mimetype="application/json")


_DOCS = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>接口文档 · 电子政务内网集成网关</title>
<link rel="stylesheet" href="{{ base }}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{{ base }}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/api/v1/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


@bp.get("/api/v1/docs")
def docs() -> str:
    return render_template_string(_DOCS, base="/api/v1/docs/assets")


@bp.get("/api/v1/docs/assets/<path:name>")
def docs_assets(name: str) -> Response:
    import swagger_ui

    return send_from_directory(Path(swagger_ui.__file__).resolve().parent / "static", name, max_age=3600)


@bp.get("/api/v1/webhooks/public-key")
def webhook_key() -> Response:
    n = node()
    from gateway.federation.keys import own_key

    key = own_key(n.config)  # Ed25519, or SM2 where [federation] algorithm = "sm2"
    alg = nodekey.algorithm(key)
    return Response(json.dumps({"node": n.id, "algorithm": alg, "public_key_pem": nodekey.public_pem(key),
                                "signed": "Gateway-Timestamp + '.' + body",
                                "header": f"Gateway-Signature: {alg}=<base64>"}), mimetype="application/json")


@bp.post("/api/v1/callbacks/<adapter_name>")
def adapter_callback(adapter_name: str) -> Response:
    """A legacy system pushes receipts here (the exchange box's configured callback)."""
    n = node()
    cfg = n.config.adapters.get(adapter_name)
    if cfg is None:
        raise Problem(404, "not-found", f"no adapter named {adapter_name}")
    adapter = n.adapter(adapter_name)
    try:
        token = adapter.context.secret(cfg, "callback_token")
    except ValueError as exc:  # a configured token that cannot be read: refuse, and say why in the log
        current_app.logger.error("callback %s: %s", adapter_name, exc)
        raise Problem(503, "not-ready", "the callback token is not configured correctly on this node") from None
    if token is not None:
        if not hmac.compare_digest(request.args.get("token", ""), token):
            raise Problem(401, "unauthenticated", "the callback token is missing or wrong")
    elif request.remote_addr not in cfg.get("callback_allow", ["127.0.0.1", "::1"]):
        raise Problem(403, "forbidden-scope", f"callbacks from {request.remote_addr} are not allowed")
    try:
        items, body, ctype = adapter.handle_callback(request.get_data(), request.content_type or "")
    except PermanentError as exc:
        raise Problem(400, "validation", str(exc)) from None
    for item in items:
        inbound.ingest(n, adapter_name, item)
    return Response(body, mimetype=ctype.split(";")[0], content_type=ctype)
