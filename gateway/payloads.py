"""Payload schemas by namespace: every envelope's payload is validated against the XSD its
namespace names here (``schemas/payload-*.xsd``) on every path in — API, adapters, and later
federation. A namespace with no schema is refused, so nothing unvalidated is ever stored."""
from __future__ import annotations

import threading
from functools import cache

from lxml import etree

from gateway import SCHEMAS
from gateway.envelope import RECEIPT_NS, EnvelopeError

SCHEMA_FILES = {
    "urn:egov:gateway:documents:v1": "payload-documents.xsd",
}
#: payloads wrapped from legacy formats, or produced by the gateway itself, checked in code
CODE_CHECKED = {RECEIPT_NS, "urn:egov:gateway:legacy:v1"}


_BUILD = threading.Lock()


@cache
def _schema(name: str) -> etree.XMLSchema:
    # lxml (libxml2) corrupts a schema built by several threads at once, for good: one at a time
    with _BUILD:
        doc = etree.parse(str(SCHEMAS / name), etree.XMLParser(resolve_entities=False, no_network=True))
        return etree.XMLSchema(doc)


def warm() -> None:
    """Build every schema now, before request threads start."""
    from gateway import envelope

    envelope.schema()
    for name in SCHEMA_FILES.values():
        _schema(name)


def validate(payload: etree._Element) -> None:
    ns = etree.QName(payload).namespace or ""
    if ns in CODE_CHECKED:
        return
    name = SCHEMA_FILES.get(ns)
    if name is None:
        raise EnvelopeError([("payload", f"no schema is registered for namespace {ns!r}")])
    schema = _schema(name)
    if not schema.validate(payload):
        raise EnvelopeError([(f"payload line {e.line}", e.message) for e in schema.error_log][:10])  # type: ignore[attr-defined]
