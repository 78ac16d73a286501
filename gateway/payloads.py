"""Payload schemas by namespace: every envelope's payload is validated against the XSD its
namespace names here (``schemas/payload-*.xsd``) on every path in — API, adapters, and later
federation. A namespace with no schema is refused, so nothing unvalidated is ever stored."""
from __future__ import annotations

import importlib
import threading
from functools import cache

from lxml import etree

from gateway import SCHEMAS
from gateway.envelope import RECEIPT_NS, Envelope, EnvelopeError

SCHEMA_FILES = {
    "urn:egov:gateway:documents:v1": "payload-documents.xsd",
}
#: payloads wrapped from legacy formats, or produced by the gateway itself, checked in code
CODE_CHECKED = {RECEIPT_NS, "urn:egov:gateway:legacy:v1"}


#: a subsystem's own rules beyond its XSD, by payload namespace ("module:function", imported
#: on first use): the function takes the envelope and raises EnvelopeError. They run on every
#: path in but this node's own API, which checked the same rules on its request model.
RULES = {
    "urn:egov:gateway:documents:v1": "systems.documents.payload:check_rules",
}


def check_rules(env: Envelope) -> None:
    target = RULES.get(etree.QName(env.payload).namespace or "")
    if target is not None:
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(env)


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
