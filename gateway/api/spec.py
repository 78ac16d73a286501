"""The OpenAPI 3.1 document, generated from the routes and their pydantic models.

Routes declare themselves with :func:`operation`; the same pydantic models validate the
requests, so the document and the behaviour cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

import gateway


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI style: /api/v1/documents/{id}
    #: what a generated client calls it (a Python-style identifier: verb_noun)
    operation_id: str
    summary: str
    tag: str
    scope: str | None
    request: type[BaseModel] | None = None
    request_media: tuple[str, ...] = ("application/json",)
    #: per status: a model (its JSON), a description (no body), or (model or media type, description)
    responses: dict[int, type[BaseModel] | str | tuple[type[BaseModel] | str, str]] = field(default_factory=dict)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    #: problem answers it can give; None: those of every API call (see PROBLEM_STATUSES)
    errors: tuple[int, ...] | None = None
    #: other media types of the 200 answer, chosen by the Accept header: media -> description
    alternatives: dict[str, str] = field(default_factory=dict)
    #: headers its answers carry, per status: names in RESPONSE_HEADERS (401 and 429 get theirs
    #: without being named)
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)


OPERATIONS: list[Operation] = []


def operation(**kw: Any) -> Callable[[Callable], Callable]:
    op = Operation(**kw)
    OPERATIONS.append(op)

    def deco(fn: Callable) -> Callable:
        return fn

    return deco


PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string", "example": "urn:egov:gateway:problem:validation"},
        "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}}}},
    },
    "required": ["type", "title", "status"],
}


#: what each problem status means, and the ones every authenticated call can answer
PROBLEM_STATUSES = {
    400: "请求格式错误 (malformed request: JSON, XML, parameters)",
    401: "缺少或无效的 API 密钥 (missing or wrong API key)",
    403: "无此权限或密级不足 (scope, unit or clearance not allowed)",
    404: "未找到 (not found)",
    409: "状态冲突 (conflict: id taken by another message, nothing left to recall)",
    413: "请求体过大 (request body too large)",
    415: "不支持的内容类型 (unsupported media type)",
    422: "内容不符合规则 (content breaks a rule, errors names each field; or idempotency-key-reused: the "
         "Idempotency-Key came before with another request)",
    429: "上传配额已用完 (this key's daily upload quota is used up; Retry-After says when there is room again)",
    503: "服务暂不可用 (the node cannot serve this now: its database cannot be reached, and Retry-After says when "
         "to send the same request again; or it is not set up for this request, and its log says why)",
    507: "存储空间不足 (too little disk space left on the node; nothing was stored, try again later)",
}
#: the response headers the API sends, as the document describes them
RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "the URL of what was created or accepted (the document's status, the upload)",
                 "required": True, "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "true when this answer repeats the one given to an earlier request "
                                           "with the same Idempotency-Key (or message_id): nothing new was done",
                            "schema": {"type": "string", "enum": ["true"]}},
    "Retry-After": {"description": "seconds until there is room again", "required": True,
                    "schema": {"type": "integer", "minimum": 1}},
    "WWW-Authenticate": {"description": 'how to authenticate: Bearer realm="gateway"', "required": True,
                         "schema": {"type": "string"}},
}
#: the headers of problem answers, per status (a 503 of a node whose database cannot be reached
#: says when to try again; one of a node not set up for the request does not)
_PROBLEM_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {"WWW-Authenticate": RESPONSE_HEADERS["WWW-Authenticate"]},
    429: {"Retry-After": RESPONSE_HEADERS["Retry-After"]},
    503: {"Retry-After": {"description": "seconds to wait before sending the same request again (the node's "
                                         "database cannot be reached just now)",
                          "schema": {"type": "integer", "minimum": 1}}},
    507: {"Retry-After": {"description": "seconds to wait before sending the same request again (sent when the "
                                         "node's database has no disk space left)",
                          "schema": {"type": "integer", "minimum": 1}}},
}
#: the Idempotency-Key request header, as every POST that honours it takes it (common.idempotency_key)
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "the caller's key for this request: sent again, the first answer is repeated "
                                  "(Idempotent-Replayed) and nothing is done twice",
                   "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
#: the headers of every webhook post: how a receiver knows it came from this node, unchanged
WEBHOOK_HEADERS: list[dict[str, Any]] = [
    {"name": "Gateway-Timestamp", "in": "header", "required": True,
     "description": "Unix time in seconds when this attempt was signed (every attempt is signed anew): refuse one "
                    "more than a few minutes from your clock",
     "schema": {"type": "string", "pattern": "^[0-9]+$"}, "example": "1795876039"},
    {"name": "Gateway-Node", "in": "header", "required": True, "description": "the id of the node that sent it",
     "schema": {"type": "string"}},
    {"name": "Gateway-Signature", "in": "header", "required": True,
     "description": "<algorithm>=<base64>: the node key's signature over Gateway-Timestamp + '.' + the body's bytes "
                    "exactly as received. ed25519 (Ed25519), or sm2-sm3 (SM2 with SM3 and the default ID, r || s) "
                    "on a node configured for 国密. The key: GET /api/v1/webhooks/public-key",
     "schema": {"type": "string", "pattern": "^(ed25519|sm2-sm3)=[A-Za-z0-9+/]+={0,2}$"}},
]
WEBHOOK_DESCRIPTION = (
    "网关向 API 密钥登记的回调地址（--webhook-url）POST 每一份收文的状态变化。\n\n"
    "The gateway POSTs every status change of a copy of a document the key sent to the key's webhook URL (not "
    "the accept itself: the 202 says that). Verify Gateway-Signature before trusting the body. Delivery is at "
    "least once and in order for each copy: drop a repeat by its id; while a post is being retried, the later "
    "changes of the same copy wait for it. Redirects are not followed.")
#: (503 and 507 are added to every operation that can fail: see document())
_DEFAULT_ERRORS = {"get": (400, 401, 403, 404), "post": (400, 401, 403, 404, 409, 413, 415, 422)}


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}

    def ref(model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict[str, str]:
        # answers in "serialization" mode: a field with a default is still always sent
        # (see json_schema_serialization_defaults_required on the answer models)
        js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        for name, sub in js.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        o: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                             "operationId": op.operation_id,
                             "parameters": list(op.parameters), "responses": {}}
        if op.description:
            o["description"] = op.description
        if op.scope:
            o["security"] = [{"apiKey": []}, {"apiKeyHeader": []}]
            o["description"] = (o.get("description", "") + f"\n\nRequires scope `{op.scope}`.").strip()
        if op.request is not None or op.request_media != ("application/json",):
            content = {}
            for media in op.request_media:
                if media == "application/json" and op.request is not None:
                    content[media] = {"schema": ref(op.request)}
                elif media == "application/xml":
                    content[media] = {"schema": {"type": "string", "description":
                                                 "canonical envelope, schemas/envelope.xsd"}}
                else:
                    content[media] = {"schema": {"type": "string", "format": "binary"}}
            o["requestBody"] = {"required": True, "content": content}
        for status, resp in op.responses.items():
            what, description = resp if isinstance(resp, tuple) else (resp, None)
            if isinstance(what, str) and description is None:
                o["responses"][str(status)] = {"description": what}
            elif isinstance(what, str):  # a body in another media type
                o["responses"][str(status)] = {"description": description,
                                               "content": {what: {"schema": {"type": "string"}}}}
            else:
                o["responses"][str(status)] = {"description": description or what.__doc__ or what.__name__,
                                               "content": {"application/json": {"schema": ref(what, "serialization")}}}
        for media, what in op.alternatives.items():
            ok = next(iter(o["responses"]))
            o["responses"][ok].setdefault("content", {})[media] = {
                "schema": {"type": "string", "description": what}}
        if op.errors is not None:  # as the operation says (a route without a scope may still ask a token)
            errors = op.errors
        else:
            errors = _DEFAULT_ERRORS.get(op.method, (400, 401, 403, 404))
            if not op.scope:
                errors = tuple(e for e in errors if e not in (401, 403))
        if errors:  # anything that can fail can meet the database away (503), a write its disk full (507)
            errors = (*errors, 503, *((507,) if op.method == "post" else ()))
        for status in errors:
            o["responses"].setdefault(str(status), {
                "description": PROBLEM_STATUSES[status], "content": {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}})
        for status, headers in _PROBLEM_HEADERS.items():
            if str(status) in o["responses"]:
                o["responses"][str(status)]["headers"] = dict(headers)
        for status, names in op.headers.items():
            if str(status) in o["responses"]:
                o["responses"][str(status)]["headers"] = {name: RESPONSE_HEADERS[name] for name in names}
        paths.setdefault(op.path, {})[op.method] = o
    from gateway.config import WebhookConfig
    from gateway.events import WebhookEvent

    hooks = WebhookConfig()  # the defaults: the document is the same whatever a node sets

    webhooks = {"documentStatus": {"post": {
        "summary": "状态回调 (a copy's status changed)", "tags": ["回调 (webhooks)"],
        "operationId": "on_document_status", "description": WEBHOOK_DESCRIPTION,
        "parameters": [dict(h) for h in WEBHOOK_HEADERS],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(WebhookEvent,
                                                                                          "serialization")}}},
        "responses": {
            "2XX": {"description": "stored on your side: the post is done (answer only once the event is stored)"},
            "default": {"description": f"anything else, a redirect included, or no answer within [webhooks] "
                                       f"timeout ({hooks.timeout:g} s by default): the post is retried with "
                                       f"exponential backoff ({hooks.retry.max_attempts} attempts by default), then "
                                       f"left to the node's operator (gateway outbox retry)"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "电子政务内网集成网关 API (e-government intranet gateway)", "version": gateway.__version__,
                 "description": "调用方须携带 API 密钥（Authorization: Bearer 或 X-API-Key）。错误一律以 RFC 9457 "
                                "application/problem+json 返回，type 字段稳定，可据以判断。POST 请求支持 "
                                "Idempotency-Key 幂等键。\n\nCallers present an API key (Authorization: Bearer, "
                                "or X-API-Key). Errors are RFC 9457 application/problem+json with a stable type. "
                                "POSTs honour Idempotency-Key."},
        "paths": paths,
        "webhooks": webhooks,
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer gw_<id>_<secret>"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                             "description": "X-API-Key: gw_<id>_<secret> (the same key)"}}},
    }
