"""The documents payload (namespace ``urn:egov:gateway:documents:v1``) and its mapping from
and to the JSON request model."""
from __future__ import annotations

from typing import Any

from lxml import etree

from gateway.envelope import Envelope, EnvelopeError, Recipient
from systems.documents import PAYLOAD_NS, rules
from systems.documents.schemas import DocumentIn

D = "{%s}" % PAYLOAD_NS


_NSMAP = {None: PAYLOAD_NS}
_DOCUMENT, _DOC_TYPE, _ISSUER, _DOC_NUMBER, _TITLE, _SIGNER, _WRITTEN, _PUBLISH, _SEALED, _NOTE, _PRINTER = (
    D + tag for tag in ("document", "doc-type", "issuer", "doc-number", "title", "signer", "written-date",
                        "publish-level", "sealed", "note", "printer"))


def to_payload(doc: DocumentIn) -> etree._Element:
    """The payload element, in the order of the payload XSD (one SubElement call each: this
    runs on every accept)."""
    el = etree.Element(_DOCUMENT, nsmap=_NSMAP)
    sub = etree.SubElement
    sub(el, _DOC_TYPE).text = doc.doc_type
    sub(el, _ISSUER).text = doc.issuer
    prefix, year, serial = rules.split_doc_number(doc.doc_number)
    sub(el, _DOC_NUMBER, prefix=prefix, year=year, serial=serial).text = doc.doc_number
    sub(el, _TITLE).text = doc.title
    if doc.signer is not None:
        sub(el, _SIGNER).text = doc.signer
    sub(el, _WRITTEN).text = doc.written_date
    if doc.publish_level is not None:
        sub(el, _PUBLISH).text = doc.publish_level
    sub(el, _SEALED).text = "true" if doc.sealed else "false"
    if doc.note is not None:
        sub(el, _NOTE).text = doc.note
    if doc.printer:
        sub(el, _PRINTER, name=doc.printer.name, date=doc.printer.date)
    return el


def to_envelope(doc: DocumentIn, *, message_id: str | None, node_id: str, sizes: dict[str, int],
                plain: bool = False) -> Envelope:
    """The canonical envelope of ``doc``. ``plain``: no value of ``doc`` holds a character
    XML must escape or cannot carry (see Envelope.plain_text): xmlsafe.plain_json of the JSON
    it was read from (DocumentIn refuses U+FFFE and U+FFFF in every field, which that check
    leaves to the model; tests/test_envelope_xml.py holds it to both)."""
    recipients = []
    classified = doc.classification != "非密"
    # copy numbers (份号) not given are the lowest ones no recipient was given
    given = {r.copy_no for r in doc.recipients if r.copy_no}
    free = (f"{n:06d}" for n in range(1, 1_000_000) if f"{n:06d}" not in given)
    for r in doc.recipients:
        copy_no = r.copy_no or (next(free) if classified else None)
        recipients.append(Recipient(r.unit, r.name, r.copy_type, copy_no))
    body = doc.body
    rows = [("body", body["name"], sizes[body["sha256"]], body["sha256"], body["media_type"])]
    rows += [("attachment", a["name"], sizes[a["sha256"]], a["sha256"], a["media_type"]) for a in doc.attachments]
    kw: dict[str, Any] = {"message_id": message_id} if message_id else {}
    env = Envelope(subsystem="documents", type="document", sender_unit=doc.sender_unit, sender_node=node_id,
                   sender_name=doc.issuer, recipients=recipients, payload=to_payload(doc),
                   classification=doc.classification, classification_period=doc.classification_period,
                   urgency=doc.urgency, conversation_id=doc.conversation_id, **kw).attachment_rows(rows)
    # the node id (configuration), the generated id and copy numbers, the time, the sizes and
    # the roles are plain by construction; everything else came from the JSON
    return env.plain_text() if plain else env


def from_envelope(env: Envelope) -> dict:
    """The JSON-model fields of a canonical envelope carrying a document (for XML callers:
    their envelope is checked by exactly the same rules as JSON)."""
    p = env.payload
    if p.tag != D + "document":
        raise ValueError(f"payload must be a {{{PAYLOAD_NS}}}document element")
    body = env.body()
    if body is None:
        raise ValueError("the envelope has no attachment with role=\"body\" (正文)")
    printer = p.find(D + "printer")
    return {
        "message_id": env.message_id, "sender_unit": env.sender_unit,
        "issuer": p.findtext(D + "issuer") or env.sender_name or "",
        "doc_type": p.findtext(D + "doc-type") or "", "doc_number": p.findtext(D + "doc-number") or "",
        "title": p.findtext(D + "title") or "", "classification": env.classification,
        "classification_period": env.classification_period, "urgency": env.urgency,
        "signer": p.findtext(D + "signer"), "written_date": p.findtext(D + "written-date") or "",
        "recipients": [{"unit": r.unit, "name": r.name, "copy_type": r.copy_type or "主送", "copy_no": r.copy_no}
                       for r in env.recipients],
        "body": {"sha256": body.sha256, "name": body.name, "media_type": body.media_type},
        "attachments": [{"sha256": a.sha256, "name": a.name, "media_type": a.media_type}
                        for a in env.attachments if a.role == "attachment"],
        "note": p.findtext(D + "note"), "publish_level": p.findtext(D + "publish-level"),
        "sealed": (p.findtext(D + "sealed") or "true") == "true",
        "printer": {"name": printer.get("name"), "date": printer.get("date")} if printer is not None else None,
        "conversation_id": env.conversation_id,
    }


def check_rules(env: Envelope) -> None:
    """The documents rules (GB/T 9704 values, 保密期限, 签发人, 份号 …) on an envelope that
    came in any other way than this node's API (another node, a legacy system): the XSD alone
    lets a 发文字号 with [ ], a 请示 without 签发人 or an urgency the legacy services do not know
    through. Raises EnvelopeError naming the fields."""
    from pydantic import ValidationError

    from systems.documents.schemas import DocumentIn

    try:
        DocumentIn.model_validate(from_envelope(env))
    except ValidationError as exc:
        raise EnvelopeError([(".".join(str(p) for p in e["loc"]) or "payload", e["msg"].removeprefix("Value error, "))
                             for e in exc.errors()]) from None
    except ValueError as exc:
        raise EnvelopeError([("payload", str(exc))]) from None
