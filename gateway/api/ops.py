"""Operations endpoints: /healthz, /readyz, /metrics, the OpenAPI document and its docs
page, the webhook public key, and adapter callbacks (legacy systems pushing receipts)."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Literal

from flask import Blueprint, Response, current_app, json, render_template_string, request, send_from_directory
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text

from adapters.base import PermanentError
from gateway import inbound, nodekey, scheduler
from gateway.blobs import free_bytes
from gateway.api.auth import bearer
from gateway.api.common import body_bytes, node
from gateway.api.problems import Problem
from gateway.api.spec import document, operation
from gateway.federation import directory
from gateway.migrate import NewerSchema, current_is_head
from gateway.models import Delivery, JobRun, OutboxEntry
from gateway.room import FULL_RECENTLY, shortage

bp = Blueprint("ops", __name__)


class Health(BaseModel):
    """The process is up."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Whether this node can take work; ``checks`` says what was checked and what is wrong."""

    status: Literal["ready", "degraded", "not ready"]
    node: str
    checks: dict[str, str] = Field(description="database, migrations, storage (room for an accept) and, where "
                                               "there is one, the federation directory: ok or what is wrong")


class WebhookKey(BaseModel):
    """The key this node signs its webhooks with: verify Gateway-Signature over
    Gateway-Timestamp + '.' + body with it."""

    node: str
    algorithm: Literal["ed25519", "sm2-sm3"]
    public_key_pem: str
    signed: str
    header: str


@operation(method="get", path="/healthz", operation_id="get_health",
           summary="存活检查 (the process is up)", tag="运维 (operations)", scope=None,
           responses={200: Health}, errors=())
@bp.get("/healthz")
def healthz() -> Response:
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")


@operation(method="get", path="/readyz", operation_id="get_readiness",
           summary="就绪检查 (database reachable, schema current, room to store an accept)",
           tag="运维 (operations)", scope=None, errors=(),
           responses={200: (Readiness, "ready, or degraded (an expired federation directory still routes)"),
                      503: (Readiness, "not ready: the checks say what is wrong")})
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
    except NewerSchema:
        checks["migrations"] = ("newer than this version of the gateway: run the version that migrated it, or "
                                 "step it down with that version's 'gateway db downgrade'")
        ok = False
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unreachable: {type(exc).__name__}"
        ok = False
    # room for an accept: without it every accept would fail 507 storage-full
    full = shortage(n.storage_folders, n.config.api.ready_min_free_bytes)
    ago = n.full_database.seconds_ago()
    if full is None and ago is not None:
        full = (f"full: a write met a database with no disk space left {max(ago, 0):.0f} s ago (answered 507 "
                f"storage-full): free space on the database's disk; not ready until {FULL_RECENTLY:g} s after the "
                f"last such write")
    checks["storage"] = full or "ok"
    ok = ok and full is None
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
            yield from self._jobs(s)
        yield from self._blob_store()
        yield from directory.metrics(self.n)

    def _jobs(self, s):  # type: ignore[no-untyped-def]
        """Per job that has run: when it last succeeded, and how its latest run ended (an
        alert on a schedule that stopped succeeding needs both). Two index lookups per job
        ((job, tick), newest first), however long the history."""
        success = GaugeMetricFamily("gateway_job_last_success_timestamp_seconds",
                                    "When the job's latest successful run finished (Unix time)", labels=["job"])
        latest = GaugeMetricFamily("gateway_job_last_run_timestamp_seconds",
                                   "When the job's latest run started, by its outcome (ok, failed, running)",
                                   labels=["job", "outcome"])
        for spec in scheduler.jobs():
            last = s.execute(select(JobRun.outcome, JobRun.started_at).where(JobRun.job == spec.name)
                             .order_by(JobRun.tick.desc()).limit(1)).first()
            if last is None:
                continue
            latest.add_metric([spec.name, last.outcome], last.started_at.timestamp())
            ok = s.scalar(select(JobRun.finished_at).where(JobRun.job == spec.name, JobRun.outcome == "ok")
                          .order_by(JobRun.tick.desc()).limit(1))
            if ok is not None:
                success.add_metric([spec.name], ok.timestamp())
        yield success
        yield latest

    def _blob_store(self):  # type: ignore[no-untyped-def]
        """Room left for uploads: below the reserve, uploads are refused 507."""
        free = GaugeMetricFamily("gateway_blob_store_free_bytes",
                                 "Bytes an upload may still use on the blob store's file system")
        free.add_metric([], free_bytes(self.n.blobs.root))
        yield free
        reserve = GaugeMetricFamily("gateway_blob_store_reserve_bytes",
                                    "[api] min_free_bytes: below it uploads are refused 507 storage-full")
        reserve.add_metric([], self.n.config.api.min_free_bytes)
        yield reserve


@operation(method="get", path="/metrics", operation_id="get_metrics",
           summary="Prometheus 指标 (queue depth, delivery states, directory)",
           tag="运维 (operations)", scope=None, errors=(401,),
           description="Open, unless the node sets [api] metrics_token_env or metrics_token_file: then only "
                       "with Authorization: Bearer <that token> (Prometheus: authorization.credentials_file); "
                       "an API key is not accepted here.",
           responses={200: ("text/plain", "Prometheus text format 0.0.4: gateway_outbox_entries{kind,state}, "
                           "gateway_deliveries{target,status}, gateway_job_last_success_timestamp_seconds{job}, "
                           "gateway_job_last_run_timestamp_seconds{job,outcome}, gateway_blob_store_free_bytes, "
                           "gateway_blob_store_reserve_bytes, the federation directory's age")})
@bp.get("/metrics")
def metrics() -> Response:
    n = node()
    token = n.metrics_token
    if token is not None:
        given = bearer()
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise Problem(401, "metrics-token", "/metrics needs Authorization: Bearer <the node's metrics token> "
                                                "([api] metrics_token_env or metrics_token_file); "
                                                "an API key is not accepted here")
    reg = CollectorRegistry()
    reg.register(_DbCollector(n))  # type: ignore[arg-type]
    return Response(generate_latest(reg), mimetype="text/plain; version=0.0.4")


@bp.get("/api/v1/openapi.json")
def openapi_json() -> Response:
    return Response(json.dumps(document(), ensure_ascii=False), mimetype="application/json")


_DOCS = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>接口文档 · 电子政务内网集成网关</title>
<link rel="stylesheet" href="{{ base }}/swagger-ui.css">
<style>.gw-intro{font-family:"Microsoft YaHei","PingFang SC","Noto Sans CJK SC",sans-serif;max-width:1460px;
margin:0 auto;padding:16px 20px 0;color:#3b4151;line-height:1.7}.gw-intro h1{font-size:22px;margin:0 0 6px}
.gw-intro ol{margin:4px 0 0;padding-left:22px}.gw-intro code{background:#f0f0f0;padding:0 4px}</style></head>
<body><section class="gw-intro" lang="zh-CN">
<h1>电子政务内网集成网关 · 接口文档</h1>
<p>本页列出调用方可用的全部接口，由网关代码自动生成，与实际行为一致。发送公文分三步：</p>
<ol><li>用 <code>POST /api/v1/blobs</code> 上传正文和每个附件（原始字节，<code>application/octet-stream</code>），记下返回的 <code>sha256</code>；</li>
<li>用 <code>POST /api/v1/documents</code> 发送公文（JSON），以 <code>sha256</code> 引用正文和附件；返回 202 即已可靠保存；</li>
<li>用 <code>GET /api/v1/documents/{id}</code> 查询各收文单位的状态（待发、已送达、已签收、已退回、已撤回、失败），或由回调（webhook）接收状态变化。</li></ol>
<p>每个请求都须携带 API 密钥：点击下方 <b>Authorize</b>（授权）按钮填入 <code>gw_…</code> 密钥后，可在本页直接试用（<b>Try it out</b>）。
出错时返回 <code>application/problem+json</code>，其中 <code>type</code> 字段稳定，<code>errors</code> 逐项指明出错的字段。</p>
</section>
<div id="swagger-ui"></div>
<script src="{{ base }}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/api/v1/openapi.json", dom_id: "#swagger-ui"});
// Swagger UI has no Chinese of its own: its buttons and headings get a Chinese label in front
// (exact texts only; whatever it renders again is labelled again).
(function () {
  const zh = {"Try it out": "试用", "Execute": "执行", "Cancel": "取消", "Clear": "清除",
    "Authorize": "授权", "Logout": "注销", "Close": "关闭", "Parameters": "参数",
    "Request body": "请求体", "Responses": "响应", "Schemas": "数据结构", "Code": "状态码",
    "Description": "说明", "Links": "链接", "No parameters": "无参数", "No links": "无链接",
    "Available authorizations": "可用的授权方式", "Server response": "服务器响应",
    "Response body": "响应体", "Response headers": "响应头", "Example Value": "示例值",
    "Schema": "结构", "Media type": "媒体类型", "Download": "下载", "Name": "名称",
    "Value:": "值：", "Request URL": "请求地址", "Details": "详情", "Curl": "curl 命令",
    "Parameter content type": "参数内容类型",
    "Response content type": "响应内容类型", "Send empty value": "发送空值", "Authorized": "已授权",
    "required": "必填", "Reset": "重置", "Hide": "隐藏", "Loading...": "加载中…",
    "Example Description": "示例说明", "Examples": "示例", "Undocumented": "未说明", "Webhooks": "回调"};
  // sentences split over several text nodes (Controls <code>Accept</code> header.): by the
  // whole text of their <small> element, labelled once
  const whole = {"Controls Accept header.": "选择应答格式（Accept 请求头）"};
  function label(node) {
    const walker = document.createTreeWalker(node, NodeFilter.SHOW_TEXT);
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      const key = t.nodeValue.trim();
      if (zh[key]) t.nodeValue = t.nodeValue.replace(key, zh[key] + " " + key);
    }
    if (!node.querySelectorAll) return;
    for (const el of [node, ...node.querySelectorAll("small")]) {
      if (el.tagName !== "SMALL" || el.dataset.zh) continue;
      const text = whole[el.textContent.trim()];
      if (text) {
        el.dataset.zh = "1";
        el.insertBefore(document.createTextNode(text + " "), el.firstChild);
      }
    }
  }
  const root = document.getElementById("swagger-ui");
  new MutationObserver(function (changes) {
    for (const c of changes) {
      if (c.type === "characterData") label(c.target.parentNode || c.target);
      for (const n of c.addedNodes) label(n);
    }
  }).observe(root, {childList: true, subtree: true, characterData: true});
  label(root);
})();
</script>
</body></html>"""


@bp.get("/api/v1/docs")
def docs() -> str:
    return render_template_string(_DOCS, base="/api/v1/docs/assets")


@bp.get("/api/v1/docs/assets/<path:name>")
def docs_assets(name: str) -> Response:
    import swagger_ui

    return send_from_directory(Path(swagger_ui.__file__).resolve().parent / "static", name, max_age=3600)


@operation(method="get", path="/api/v1/webhooks/public-key", operation_id="get_webhook_public_key",
           summary="回调签名公钥 (the key that signs this node's webhooks)", tag="运维 (operations)", scope=None,
           errors=(), responses={200: WebhookKey})
@bp.get("/api/v1/webhooks/public-key")
def webhook_key() -> Response:
    n = node()
    from gateway.federation.keys import own_key

    key = own_key(n.config)  # Ed25519, or SM2 where [federation] algorithm = "sm2"
    alg = nodekey.algorithm(key)
    return Response(json.dumps({"node": n.id, "algorithm": alg, "public_key_pem": nodekey.public_pem(key),
                                "signed": "Gateway-Timestamp + '.' + body",
                                "header": f"Gateway-Signature: {alg}=<base64>"}), mimetype="application/json")


@operation(method="post", path="/api/v1/callbacks/{adapter}", operation_id="push_receipts",
           summary="遗留系统回执推送 (a legacy system pushes receipts, e.g. the exchange box)",
           tag="运维 (operations)", scope=None, request_media=("application/xml",),
           errors=(400, 401, 403, 404, 413, 422, 503),
           parameters=[{"name": "adapter", "in": "path", "required": True, "schema": {"type": "string"}},
                       {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "the adapter's callback_token, when one is configured; without one, "
                                       "only the addresses in callback_allow may call"}],
           responses={200: "the answer the legacy system's protocol expects"},
           description="Not for calling systems: the adapter's legacy system posts here in its own format.")
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
        items, body, ctype = adapter.handle_callback(body_bytes(), request.content_type or "")
    except PermanentError as exc:
        raise Problem(400, "validation", str(exc)) from None
    for item in items:
        refused: list[str] = []
        item._reject = refused.append
        outcome = inbound.ingest(n, adapter_name, item)
        if outcome == "rejected":  # now or when it first came (ingest refuses it again)
            # never "OK" for a receipt that changed nothing: the legacy system would take it
            # as delivered and not send it again
            raise Problem(422, "validation", f"receipt refused: {refused[0]}")
    return Response(body, mimetype=ctype.split(";")[0], content_type=ctype)
