"""The OpenAPI 3.1 document, generated from the routes and their pydantic models.

Routes declare themselves with :func:`operation`; the same pydantic models validate the
requests, so the document and the behaviour cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from pydantic import BaseModel

import gateway


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI style: /api/v1/documents/{id}
    summary: str
    tag: str
    scope: str | None
    request: type[BaseModel] | None = None
    request_media: tuple[str, ...] = ("application/json",)
    responses: dict[int, type[BaseModel] | str] = field(default_factory=dict)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


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


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        o: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                             "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
                             "parameters": list(op.parameters), "responses": {}}
        if op.description:
            o["description"] = op.description
        if op.scope:
            o["security"] = [{"apiKey": []}]
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
            if isinstance(resp, str):
                o["responses"][str(status)] = {"description": resp}
            else:
                o["responses"][str(status)] = {"description": resp.__doc__ or resp.__name__,
                                               "content": {"application/json": {"schema": ref(resp)}}}
        for status in (400, 401, 403, 404, 413, 422):
            o["responses"].setdefault(str(status), {
                "description": "problem", "content": {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}})
        paths.setdefault(op.path, {})[op.method] = o
    return {
        "openapi": "3.1.0",
        "info": {"title": "电子政务内网集成网关 API (e-government intranet gateway)", "version": gateway.__version__,
                 "description": "Errors are RFC 9457 application/problem+json. POSTs honour Idempotency-Key."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer gw_<id>_<secret>"}}},
    }
