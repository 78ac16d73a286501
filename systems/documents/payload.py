"""The documents payload (namespace ``urn:egov:gateway:documents:v1``) and its mapping from
and to the JSON request model."""
from __future__ import annotations

from typing import Any

from gateway.envelope import Envelope, EnvelopeError, Recipient, escape_attr, escape_text, new_message_id
from systems.documents import PAYLOAD_NS, rules
from systems.documents.schemas import DocumentIn

D = "{%s}" % PAYLOAD_NS


_OPEN = f'<document xmlns="{PAYLOAD_NS}">'


def _same(value: str) -> str:
    return value


def payload_xml(doc: DocumentIn, plain: bool = False) -> bytes:
    """The payload element (``{urn:egov:gateway:documents:v1}document``, in the order of
    the payload XSD) as UTF-8 XML text: byte for byte what lxml writes for the same element,
    written directly because building the lxml tree and checking it against the XSD cost an
    eighth of an accept (the 500-character title and 2000-character 附注 pass lxml's UTF-8
    check when set and libxml2's length count, twice, when validated).

    tests/test_envelope_xml.py holds it to lxml's bytes and to the payload XSD for every
    document DocumentIn accepts (DocumentIn is stricter than the XSD: non-empty texts
    within its lengths, a 文种 from its list, an ISO 成文日期, a 发文字号 whose year is four
    digits and whose serial has no leading zero). ``plain``: no value holds a character XML
    must escape (see to_envelope); otherwise each value is escaped as lxml escapes it."""
    t, a = (_same, _same) if plain else (escape_text, escape_attr)
    prefix, year, serial = rules.split_doc_number(doc.doc_number)
    parts = [f"{_OPEN}<doc-type>{t(doc.doc_type)}</doc-type><issuer>{t(doc.issuer)}</issuer>"
             f'<doc-number prefix="{a(prefix)}" year="{year}" serial="{serial}">{t(doc.doc_number)}</doc-number>'
             f"<title>{t(doc.title)}</title>"]
    if doc.signer is not None:
        parts.append(f"<signer>{t(doc.signer)}</signer>")
    parts.append(f"<written-date>{doc.written_date}</written-date>")
    if doc.publish_level is not None:
        parts.append(f"<publish-level>{t(doc.publish_level)}</publish-level>")
    parts.append("<sealed>true</sealed>" if doc.sealed else "<sealed>false</sealed>")
    if doc.note is not None:
        parts.append(f"<note>{t(doc.note)}</note>")
    if doc.printer:
        parts.append(f'<printer name="{a(doc.printer.name)}" date="{doc.printer.date}"/>')
    parts.append("</document>")
    return "".join(parts).encode()


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
    # an id this node makes carries its node id (see new_message_id): no other node may take it
    kw: dict[str, Any] = {"message_id": message_id or new_message_id(node_id)}
    env = Envelope(subsystem="documents", type="document", sender_unit=doc.sender_unit, sender_node=node_id,
                   sender_name=doc.issuer, recipients=recipients,
                   payload=None,  # type: ignore[arg-type]  # given as text just below
                   classification=doc.classification, classification_period=doc.classification_period,
                   urgency=doc.urgency, conversation_id=doc.conversation_id,
                   **kw).attachment_rows(rows).written_payload(payload_xml(doc, plain))
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
        doc = DocumentIn.model_validate(from_envelope(env))
    except ValidationError as exc:
        raise EnvelopeError([(".".join(str(p) for p in e["loc"]) or "payload", e["msg"].removeprefix("Value error, "))
                             for e in exc.errors()]) from None
    except ValueError as exc:
        raise EnvelopeError([("payload", str(exc))]) from None
    if doc.classification != "非密":
        # the API numbers copies itself; a classified document from anywhere else must carry them
        missing = [(f"recipients.{i}.copy_no", f"a {doc.classification} document carries a 份号 (six digits) for "
                    f"each copy; the copy for {r.unit} has none") for i, r in enumerate(doc.recipients)
                   if not r.copy_no]
        if missing:
            raise EnvelopeError(missing)
