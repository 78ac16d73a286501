"""The canonical envelope (规范信封) that every message on the one path is carried in.

``schemas/envelope.xsd`` is the contract; :class:`Envelope` is its in-memory form. Payloads
are elements in their own namespace, owned by a subsystem (``systems/``) or by the gateway
itself (receipts, :data:`RECEIPT_NS`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, UTC
from functools import lru_cache

from lxml import etree

from gateway import SCHEMAS, xmlsafe
from gateway.config import NODE_ID
from gateway.units import uscc_problem

NS = "urn:egov:gateway:envelope:v1"
RECEIPT_NS = "urn:egov:gateway:receipt:v1"
E = "{%s}" % NS

#: Lower rank is delivered first (特急 before 加急 before ordinary).
URGENCY_RANK = {"特提": 0, "特急": 0, "加急": 1, "平急": 1, "平件": 2}
CLASSIFICATION_LEVEL = {"非密": 0, "秘密": 1, "机密": 2, "绝密": 3}


class EnvelopeError(ValueError):
    """The envelope breaks the contract; ``errors`` lists (field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        super().__init__("; ".join(f"{f}: {m}" for f, m in errors))
        self.errors = errors


@dataclass
class Recipient:
    unit: str
    name: str | None = None
    copy_type: str | None = None  # 主送 / 抄送 / 抄报
    copy_no: str | None = None  # 份号, six digits


#: a UUID version 7 as new_message_id writes it (lower-case hex)
UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
#: a message id a node made (new_message_id with its node id): ``<UUIDv7>:<node id>``
_NODE_MESSAGE_ID = re.compile(rf"{UUID7}:(?P<node>{NODE_ID.pattern})")


def new_message_id(node: str | None = None) -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random
    bits. Ids made one after another sort together, so each new message (and its delivery
    rows, keyed by message id) lands next to the last one in the database's indexes instead
    of on a random page: in SQLite that page is usually already in the group's WAL frames.

    With ``node``, the id is followed by ``:`` and that node id (the form a node gives the
    messages it makes, since 2026-11-28): an id only that node may use (:func:`id_owner`), so
    that no other node, nor a caller of another node, can take it before the message arrives."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    h = f"{value:032x}"  # as str(uuid.UUID(int=value)) writes it, without building the object
    plain = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return plain if node is None else f"{plain}:{node}"


def id_owner(message_id: str, known: Collection[str] = ()) -> str | None:
    """The node a message id belongs to: the node id in an id of the form ``<UUIDv7>:<node>``
    (:func:`new_message_id`), or the last ``:``-separated part of any id when it names one
    of the ``known`` nodes (a caller's own id as its node stores it, see :func:`own_id`).
    None for any other id (one a legacy system gave, or one a node stored before
    2026-11-28), which any sender may use, the first one to be stored keeping it."""
    m = _NODE_MESSAGE_ID.fullmatch(message_id)
    if m:
        return m["node"]
    head, sep, tail = message_id.rpartition(":")
    return tail if sep and head and tail in known else None


def own_id(message_id: str, node: str) -> str:
    """The id node ``node`` stores a message under whose id a caller chose: the caller's id
    followed by ``:`` and the node id, unless it ends so already (the caller sent the id
    the gateway answered with) or is one a node made (:func:`id_owner`: refused elsewhere
    when it is another node's). Two calling systems at two nodes that number their
    messages alike (``oa-2026-37``) then never take each other's id where both arrive."""
    if message_id.endswith(":" + node) or _NODE_MESSAGE_ID.fullmatch(message_id):
        return message_id
    return f"{message_id}:{node}"


def same_message(a: bytes | str, b: bytes | str) -> bool:
    """Whether two canonical envelopes carry the same message: equal (as canonical XML) but
    for ``<created>``, which each accept of a JSON request stamps anew."""
    def canon(x: bytes | str) -> bytes:
        root = xmlsafe.parse(x)
        for el in list(root.iter(E + "created")):
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)
        return etree.tostring(root, method="c14n")

    return canon(a) == canon(b)


@dataclass
class Attachment:
    """A claim check: content stored by SHA-256 in the blob store, referenced here."""

    role: str  # "body" or "attachment"
    name: str
    size: int
    sha256: str
    media_type: str | None = None


@dataclass
class Envelope:
    subsystem: str
    type: str
    sender_unit: str
    recipients: list[Recipient]
    payload: etree._Element
    classification: str = "非密"
    classification_period: str | None = None
    urgency: str = "平件"
    message_id: str = field(default_factory=new_message_id)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    sender_node: str | None = None
    sender_name: str | None = None
    in_reply_to: str | None = None
    conversation_id: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    #: the tree ``tree()`` answers with; dropped whenever a field is set
    _tree: etree._Element | None = field(default=None, init=False, repr=False, compare=False)
    #: see plain_text(); forgotten whenever a field is set
    _plain: bool = field(default=False, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        # straight into __dict__ (no field is a descriptor), for every field of a new
        # envelope comes through here
        d = self.__dict__
        d[name] = value
        if name != "_tree" and name != "_plain":
            d["_tree"] = None
            d["_plain"] = False
            if name == "payload":
                d.pop("_payload_xml", None)

    def __getattr__(self, name: str) -> object:
        # Only reached for an attribute the instance lacks: an envelope read by from_xml
        # builds its attachment list on first use. Reading 40 attachments' attributes from
        # the tree costs a third of the parse, and delivering over SOAP needs none of them
        # but the body (blob:body arguments), some adapters not even that. Likewise one
        # given its attachments as rows (attachment_rows).
        d = self.__dict__
        if name == "attachments":
            rows = d.get("_attachment_rows")
            el = d.get("_attachments_el")
            if rows is not None or el is not None:
                value = [Attachment(*r) for r in rows] if rows is not None else _attachments(el)
                d["attachments"] = value  # the tree still matches
                return value
        elif name == "payload" and "_payload_xml" in d:  # see written_payload
            d["payload"] = payload = xmlsafe.parse(d["_payload_xml"])
            return payload
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def attachment_rows(self, rows: list[tuple[str, str, int, str, str | None]]) -> Envelope:
        """Give the envelope its attachments as ``(role, name, size, sha256, media_type)``
        rows: to_xml writes them as they are, and the Attachment objects are made only if
        ``attachments`` is read (an accept of a document with 40 attachments never reads
        it; making them was 3% of its work). Returns the envelope."""
        d = self.__dict__
        d.pop("attachments", None)
        d.pop("_attachments_el", None)
        d["_attachment_rows"] = rows
        d["_tree"] = None
        d["_plain"] = False  # like setting a field: plain_text() comes after
        return self

    def written_payload(self, data: bytes) -> Envelope:
        """Give the envelope its payload as the UTF-8 XML text of one element, written by
        this node from a request model its API validated (e.g.
        :func:`systems.documents.payload.payload_xml`): to_xml copies the text as it is, the
        element is parsed only if ``payload`` is read (an accept never reads it), and
        :func:`gateway.pipeline.accept` does not check it against the payload XSD again, for
        the writer is held to that XSD by tests for every value its model accepts. Setting
        ``payload`` replaces it. Returns the envelope."""
        d = self.__dict__
        d.pop("payload", None)
        d["_payload_xml"] = data
        d["_tree"] = None
        return self

    @property
    def payload_written(self) -> bool:
        """True when the payload is text this node wrote from a validated model (see
        :meth:`written_payload`), False for one given or parsed as an element."""
        return "_payload_xml" in self.__dict__

    def tree(self) -> etree._Element:
        """The envelope as an element tree, to read (XPath), never to change: the tree it was
        parsed from, or one built from its fields on first use. Setting a field drops it (a
        list changed in place is not noticed: build a new Envelope instead)."""
        if self._tree is None:
            object.__setattr__(self, "_tree", self.to_element())
        assert self._tree is not None
        return self._tree

    def plain_text(self) -> Envelope:
        """Declare that none of the envelope's values (its payload aside, which lxml writes)
        holds a character XML must escape or cannot carry, as the caller has established
        (e.g. :func:`gateway.xmlsafe.plain_json` of the JSON they all came from): to_xml then
        writes them without looking at each character. Setting any field afterwards takes
        the declaration back. Returns the envelope."""
        self.__dict__["_plain"] = True
        return self

    @property
    def urgency_rank(self) -> int:
        return URGENCY_RANK.get(self.urgency, 2)

    @property
    def clearance_needed(self) -> int:
        return CLASSIFICATION_LEVEL[self.classification]

    def body(self) -> Attachment | None:
        return next((a for a in self.attachments if a.role == "body"), None)

    # -- XML ---------------------------------------------------------------------------
    def to_element(self) -> etree._Element:
        root = etree.Element(E + "envelope", nsmap={None: NS}, version="1")
        h = etree.SubElement(root, E + "header")
        etree.SubElement(h, E + "message-id").text = self.message_id
        etree.SubElement(h, E + "subsystem").text = self.subsystem
        etree.SubElement(h, E + "type").text = self.type
        etree.SubElement(h, E + "created").text = self.created.isoformat()
        s = etree.SubElement(h, E + "sender", unit=self.sender_unit)
        if self.sender_node:
            s.set("node", self.sender_node)
        if self.sender_name:
            s.set("name", self.sender_name)
        rs = etree.SubElement(h, E + "recipients")
        for r in self.recipients:
            el = etree.SubElement(rs, E + "recipient", unit=r.unit)
            for attr, val in (("name", r.name), ("copy-type", r.copy_type), ("copy-no", r.copy_no)):
                if val:
                    el.set(attr, val)
        c = etree.SubElement(h, E + "classification")
        c.text = self.classification
        if self.classification_period:
            c.set("period", self.classification_period)
        etree.SubElement(h, E + "urgency").text = self.urgency
        if self.in_reply_to:
            etree.SubElement(h, E + "in-reply-to").text = self.in_reply_to
        if self.conversation_id:
            etree.SubElement(h, E + "conversation-id").text = self.conversation_id
        p = etree.SubElement(root, E + "payload")
        p.append(_copy(self.payload))
        if self.attachments:
            atts = etree.SubElement(root, E + "attachments")
            for a in self.attachments:
                el = etree.SubElement(
                    atts, E + "attachment", role=a.role, name=a.name, size=str(a.size), sha256=a.sha256
                )
                if a.media_type:
                    el.set("media-type", a.media_type)
        return root

    def to_xml(self) -> bytes:
        """The envelope as UTF-8 XML: byte for byte what ``etree.tostring(self.to_element(),
        xml_declaration=True, encoding="UTF-8")`` gives (tests/test_envelope_xml.py holds it to
        that), written as text because building the element tree costs a quarter of the CPU of
        an accept with 40 attachments."""
        if not self.payload_written and NS in self.payload.nsmap.values():
            # lxml would merge those declarations: leave it to lxml
            return etree.tostring(self.to_element(), xml_declaration=True, encoding="UTF-8")
        if self._plain:
            return _write(self)
        # One check over every value decides whether any needs escaping (usually none does);
        # if one does, the text is written from an escaped copy, with the same code.
        values = "".join([
            self.message_id, self.subsystem, self.type, self.sender_unit, self.sender_node or "",
            self.sender_name or "", self.classification, self.classification_period or "", self.urgency,
            self.in_reply_to or "", self.conversation_id or "",
            *[f"{r.unit}{r.name or ''}{r.copy_type or ''}{r.copy_no or ''}" for r in self.recipients],
            *[f"{a.name}{a.media_type or ''}" for a in self.attachments]])
        # the attachments' roles and SHA-256s are letters and digits: told for all at once at
        # a fraction of the cost of the check above (ASCII bytes, one table lookup each)
        codes = "".join([f"{a.role}{a.sha256}" for a in self.attachments])
        plain_codes = codes.isascii() and (not codes or codes.encode().isalnum())
        return _write(self if _plain(values) and (plain_codes or _plain(codes)) else self._escaped())

    def _escaped(self) -> Envelope:
        """A copy whose values are escaped as text or as attribute values, as each is written
        (raises ValueError for a character XML cannot carry, as lxml does)."""
        t, a = escape_text, escape_attr

        def opt(f: Callable[[str], str], v: str | None) -> str | None:
            return f(v) if v else v

        written = self.__dict__.get("_payload_xml")  # carried over as text, not parsed to be copied
        out = dataclasses.replace(
            self, payload=None if written is not None else self.payload,
            message_id=t(self.message_id), subsystem=t(self.subsystem), type=t(self.type),
            classification=t(self.classification), urgency=t(self.urgency),
            in_reply_to=opt(t, self.in_reply_to), conversation_id=opt(t, self.conversation_id),
            sender_unit=a(self.sender_unit), sender_node=opt(a, self.sender_node),
            sender_name=opt(a, self.sender_name), classification_period=opt(a, self.classification_period),
            recipients=[Recipient(a(r.unit), opt(a, r.name), opt(a, r.copy_type), opt(a, r.copy_no))
                        for r in self.recipients],
            attachments=[Attachment(a(x.role), a(x.name), x.size, a(x.sha256), opt(a, x.media_type))
                         for x in self.attachments])
        return out if written is None else out.written_payload(written)

    @classmethod
    def from_xml(cls, data: bytes | str | etree._Element, *, validate: bool = True) -> Envelope:
        root: etree._Element
        if isinstance(data, etree._Element):
            root, owned = data, False
        else:
            root, owned = xmlsafe.parse(data), True  # a tree we parsed ourselves needs no copy
        if validate:
            _validate(root)
        # one pass over the children instead of a find() each: lxml's find() and findtext()
        # parse their path in Python every time, and this runs for every delivery
        top = _children(root)
        h = top[E + "header"]
        head = _children(h)

        def text(tag: str) -> str:
            el = head.get(E + tag)
            return "" if el is None else (el.text or "")

        def optional(tag: str) -> str | None:
            el = head.get(E + tag)
            return None if el is None else (el.text or "")

        sender, cls_el, payload = head[E + "sender"], head[E + "classification"], top[E + "payload"]
        atts = top.get(E + "attachments")
        env = cls(
            message_id=text("message-id"),
            subsystem=text("subsystem"),
            type=text("type"),
            created=datetime.fromisoformat(text("created")),
            sender_unit=sender.get("unit", ""),
            sender_node=sender.get("node"),
            sender_name=sender.get("name"),
            recipients=[
                Recipient(r.get("unit", ""), r.get("name"), r.get("copy-type"), r.get("copy-no"))
                for r in head[E + "recipients"]
            ],
            classification=cls_el.text or "",
            classification_period=cls_el.get("period"),
            urgency=text("urgency"),
            in_reply_to=optional("in-reply-to"),
            conversation_id=optional("conversation-id"),
            payload=payload[0] if owned else _copy(payload[0]),
        )
        if atts is not None and len(atts):
            if owned:  # read on first use (see __getattr__); the tree is this envelope's own
                del env.__dict__["attachments"]
                env.__dict__["_attachments_el"] = atts
            else:
                object.__setattr__(env, "attachments", _attachments(atts))
        if owned:  # the tree just parsed is this envelope: tree() need not build another
            object.__setattr__(env, "_tree", root)
        return env


def _children(el: etree._Element) -> dict[str, etree._Element]:
    """An element's child elements by tag (the first of each, as find() would give)."""
    out: dict[str, etree._Element] = {}
    for child in el:
        out.setdefault(child.tag, child)  # type: ignore[call-overload]
    return out


def _attachments(el: etree._Element) -> list[Attachment]:
    return [Attachment(a.get("role", ""), a.get("name", ""), int(a.get("size", "0")), a.get("sha256", ""),
                       a.get("media-type")) for a in el]


_XML_HEAD = f"<?xml version='1.0' encoding='UTF-8'?>\n<envelope xmlns=\"{NS}\" version=\"1\">"
#: what XML 1.0 cannot carry; lxml refuses it when a tree is built, and so does Envelope.to_xml
_NOT_XML = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\ud800-\\udfff\\ufffe\\uffff]")
#: a string without any of these is written as it is (the common case, checked in one scan)
_PLAIN = re.compile('[&<>"\\t\\n\\r\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\ud800-\\udfff\\ufffe\\uffff]')


def _escape(value: str, attribute: bool) -> str:
    if _NOT_XML.search(value):
        raise ValueError("All strings must be XML compatible: Unicode or ASCII, no NULL bytes or control characters")
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    if attribute:
        value = value.replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
    return value


def _plain(values: str) -> bool:
    """True when ``values`` holds nothing to escape and nothing XML cannot carry. Most text
    is printable (no control characters, surrogates or U+FFFE/U+FFFF), which ``isprintable``
    tells at C speed; text that is not (an ideographic space U+3000, say) is checked by the
    exact pattern."""
    if values.isprintable():
        return not ("&" in values or "<" in values or ">" in values or '"' in values)
    return _PLAIN.search(values) is None


def _write(e: Envelope) -> bytes:
    """The XML text of ``e``, whose values need no escaping (see Envelope.to_xml)."""
    sender = (f'<sender unit="{e.sender_unit}"' + (f' node="{e.sender_node}"' if e.sender_node else "")
              + (f' name="{e.sender_name}"' if e.sender_name else "") + "/>")
    if e.recipients:
        recipients = "".join(["<recipients>", *[
            f'<recipient unit="{r.unit}"' + (f' name="{r.name}"' if r.name else "")
            + (f' copy-type="{r.copy_type}"' if r.copy_type else "")
            + (f' copy-no="{r.copy_no}"' if r.copy_no else "") + "/>" for r in e.recipients], "</recipients>"])
    else:
        recipients = "<recipients/>"
    period = f' period="{e.classification_period}"' if e.classification_period else ""
    reply = f"<in-reply-to>{e.in_reply_to}</in-reply-to>" if e.in_reply_to else ""
    conversation = f"<conversation-id>{e.conversation_id}</conversation-id>" if e.conversation_id else ""
    rows = e.__dict__.get("_attachment_rows") if "attachments" not in e.__dict__ else None
    if rows is None:  # Attachment objects (given, parsed, or made from rows when read)
        rows = [(a.role, a.name, a.size, a.sha256, a.media_type) for a in e.attachments]
    if rows:
        attachments = "".join(["<attachments>", *[
            f'<attachment role="{role}" name="{name}" size="{size}" sha256="{sha}"'
            + (f' media-type="{mt}"/>' if mt else "/>") for role, name, size, sha, mt in rows],
            "</attachments>"])
    else:
        attachments = ""
    # the payload as lxml writes it in UTF-8 (or as this node wrote it: written_payload),
    # not as text to be encoded again
    payload = e.__dict__.get("_payload_xml")
    return b"".join([
        (f"{_XML_HEAD}<header><message-id>{e.message_id}</message-id><subsystem>{e.subsystem}</subsystem>"
         f"<type>{e.type}</type><created>{e.created.isoformat()}</created>{sender}{recipients}"
         f"<classification{period}>{e.classification}</classification><urgency>{e.urgency}</urgency>"
         f"{reply}{conversation}</header><payload>").encode(),
        payload if payload is not None else etree.tostring(e.payload, encoding="UTF-8"),
        f"</payload>{attachments}</envelope>".encode()])


def escape_text(value: str) -> str:
    """``value`` as element text in XML, escaped as lxml escapes it (ValueError for a
    character XML cannot carry, as lxml raises)."""
    return _escape(value, False)


def escape_attr(value: str) -> str:
    """``value`` as an attribute value in double quotes, escaped as lxml escapes it."""
    return _escape(value, True)


def _copy(el: etree._Element) -> etree._Element:
    return copy.deepcopy(el)


_BUILD = threading.Lock()


@lru_cache(maxsize=1)
def _schema() -> etree.XMLSchema:
    # lxml (libxml2) corrupts a schema built by several threads at once, for good: one at a time
    with _BUILD:
        doc = etree.parse(str(SCHEMAS / "envelope.xsd"), etree.XMLParser(resolve_entities=False, no_network=True))
        return etree.XMLSchema(doc)


def schema() -> etree.XMLSchema:
    return _schema()


def validate(root: etree._Element) -> None:
    _validate(root)


def _validate(root: etree._Element) -> None:
    """XSD validation plus the checks XSD cannot express (unit code check characters)."""
    schema = _schema()
    if not schema.validate(root):
        found = [(f"line {e.line}", e.message) for e in schema.error_log]  # type: ignore[attr-defined]
        raise EnvelopeError(found[:10])
    errors: list[tuple[str, str]] = []
    for el in root.iter(E + "sender", E + "recipient"):
        problem = uscc_problem(el.get("unit"))
        if problem:
            errors.append((f"{etree.QName(el).localname}/@unit {el.get('unit')}", problem))
    if errors:
        raise EnvelopeError(errors)


# -- receipts (回执) -----------------------------------------------------------------------
#: REFUSED: the legacy system could not take the copy (e.g. the SFTP drop's reader moved it
#: to failed/ with a note); the copy fails, with that note as its reason
RECEIPT_ACTIONS = ("ARRIVED", "SIGNED", "RETURNED", "RECALLED", "REFUSED")


@dataclass
class Receipt:
    """A receipt (回执) for one recipient of one message, whatever adapter it came through.

    It names the delivery either by ``message_id`` (+ ``unit``) or by ``remote_ref``, the
    per-delivery reference the adapter used at the legacy system (see
    :attr:`adapters.base.Delivery.remote_ref`); the gateway matches on whichever is set.
    """

    unit: str
    action: str  # one of RECEIPT_ACTIONS
    message_id: str | None = None
    remote_ref: str | None = None
    time: datetime | None = None
    signer: str | None = None
    receipt_no: str | None = None
    reason: str | None = None

    def to_element(self) -> etree._Element:
        R = "{%s}" % RECEIPT_NS
        el = etree.Element(R + "receipt", nsmap={None: RECEIPT_NS}, action=self.action)
        if self.message_id:
            etree.SubElement(el, R + "message-id").text = self.message_id
        if self.remote_ref:
            etree.SubElement(el, R + "remote-ref").text = self.remote_ref
        etree.SubElement(el, R + "unit").text = self.unit
        for tag, val in (("signer", self.signer), ("receipt-no", self.receipt_no), ("reason", self.reason)):
            if val:
                etree.SubElement(el, R + tag).text = val
        if self.time:
            etree.SubElement(el, R + "time").text = self.time.isoformat()
        return el
