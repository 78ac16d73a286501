"""Envelope.to_xml writes the envelope as text; it must be byte for byte what lxml writes for
Envelope.to_element (the reference), for any values, and refuse what XML cannot carry."""
from __future__ import annotations

import dataclasses
import json
import typing
from datetime import UTC, datetime

import pytest
import typing_extensions
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from pydantic import BaseModel, ValidationError

from gateway import xmlsafe
from gateway.envelope import Attachment, Envelope, Recipient

XML_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00") \
    .filter(lambda c: c in "\t\n\r" or c >= " " and c not in "\ufffe\uffff")
TEXT = st.text(XML_CHARS, min_size=1, max_size=20)
OPTIONAL = st.none() | TEXT


def _reference(env: Envelope) -> bytes:
    return etree.tostring(env.to_element(), xml_declaration=True, encoding="UTF-8")


def _payload(text: str, attr: str) -> etree._Element:
    p = etree.Element("{urn:egov:gateway:documents:v1}document", nsmap={None: "urn:egov:gateway:documents:v1"})
    t = etree.SubElement(p, "{urn:egov:gateway:documents:v1}title", note=attr)
    t.text = text
    return p


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(TEXT, min_size=8, max_size=8), optional=st.lists(OPTIONAL, min_size=7, max_size=7),
       recipients=st.lists(st.tuples(TEXT, OPTIONAL, OPTIONAL, OPTIONAL), max_size=4),
       attachments=st.lists(st.tuples(TEXT, st.integers(0, 2**40), OPTIONAL,
                                      st.sampled_from(["attachment", "body"]) | TEXT,  # role
                                      st.just("a" * 64) | st.just("0f" * 32) | TEXT), max_size=4))  # sha256
def test_text_writer_matches_lxml(texts, optional, recipients, attachments):  # type: ignore[no-untyped-def]
    env = Envelope(subsystem=texts[0], type=texts[1], sender_unit=texts[2], message_id=texts[3],
                   recipients=[Recipient(*r) for r in recipients], payload=_payload(texts[4], texts[5]),
                   classification=texts[6], urgency=texts[7], classification_period=optional[0],
                   sender_node=optional[1], sender_name=optional[2], in_reply_to=optional[3],
                   conversation_id=optional[4],
                   attachments=[Attachment(role, n, size, sha, mt) for n, size, mt, role, sha in attachments],
                   created=datetime(2026, 11, 26, 8, 0, tzinfo=UTC))
    assert env.to_xml() == _reference(env)


def test_payload_from_a_parsed_envelope_with_prefixes():  # type: ignore[no-untyped-def]
    doc = etree.fromstring(
        b'<w xmlns:d="urn:egov:gateway:documents:v1" xmlns:o="urn:other"><d:document o:x="1">'
        b'<d:title>t</d:title><o:extra>e</o:extra></d:document>tail</w>')
    for payload in (doc[0], etree.fromstring(etree.tostring(doc[0], with_tail=False))):
        env = Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                       recipients=[Recipient("1152230107CTPD8U2P")], payload=payload)
        assert env.to_xml() == _reference(env)


def test_payload_that_redeclares_the_envelope_namespace_is_left_to_lxml():  # type: ignore[no-untyped-def]
    p = etree.fromstring(b'<r:receipt xmlns:r="urn:egov:gateway:receipt:v1" '
                         b'xmlns:e="urn:egov:gateway:envelope:v1"><e:x/></r:receipt>')
    env = Envelope(subsystem="documents", type="receipt", sender_unit="11522300GDR9YB9550", recipients=[],
                   payload=p)
    assert env.to_xml() == _reference(env)


@pytest.mark.parametrize("where", ["recipient", "role", "sha256"])
@pytest.mark.parametrize("bad", ["a\x00b", "\x07", "x\x1f", "\ufffe"])
def test_what_xml_cannot_carry_is_refused_like_lxml(bad, where):  # type: ignore[no-untyped-def]
    env = Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                   recipients=[Recipient("1152230107CTPD8U2P", name=bad if where == "recipient" else None)],
                   payload=_payload("t", "a"),
                   attachments=[Attachment(bad if where == "role" else "body", "正文.ofd", 1,
                                           bad if where == "sha256" else "a" * 64)])
    with pytest.raises(ValueError):
        _reference(env)
    with pytest.raises(ValueError):
        env.to_xml()


def test_tree_is_the_parsed_tree_until_a_field_changes():  # type: ignore[no-untyped-def]
    env = Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                   recipients=[Recipient("1152230107CTPD8U2P", name="甲县")], payload=_payload("标题", "a"))
    built = env.tree()
    assert env.tree() is built  # built once
    assert etree.tostring(built) == etree.tostring(env.to_element())
    env.urgency = "特急"  # any field set: the old tree no longer describes the envelope
    assert env.tree() is not built and env.tree().findtext("{urn:egov:gateway:envelope:v1}header/"
                                                           "{urn:egov:gateway:envelope:v1}urgency") == "特急"
    parsed = Envelope.from_xml(env.to_xml(), validate=False)
    assert etree.tostring(parsed.tree()) == etree.tostring(env.to_element())
    assert parsed.tree() is parsed.payload.getparent().getparent()  # the tree it was parsed from, not a copy


def test_generated_message_ids_are_uuid7_and_sort_by_time():
    """New message ids are UUIDv7: a valid UUID whose first 48 bits are the time in ms, so ids
    made later sort after earlier ones (index locality in the database)."""
    import time
    import uuid

    from gateway.envelope import new_message_id

    first = new_message_id()
    u = uuid.UUID(first)
    assert (u.version, u.variant) == (7, uuid.RFC_4122) and str(u) == first  # canonical form
    assert abs(int(u.hex[:12], 16) - time.time_ns() // 1_000_000) < 5_000
    time.sleep(0.002)
    later = [new_message_id() for _ in range(100)]
    assert all(first < x for x in later)
    assert len(set(later)) == 100


def test_attachments_read_on_first_use_match_the_xml():
    """from_xml leaves the attachment list to first use; it is then what the XML says, the
    parsed tree stays valid, and the envelope writes the same XML."""
    import copy

    from gateway.envelope import Attachment, Envelope, Recipient
    from lxml import etree

    payload = etree.fromstring(b'<p xmlns="urn:egov:gateway:legacy:v1">x</p>')
    atts = [Attachment("body", "正文.ofd", 10, "a" * 64, "application/ofd"),
            Attachment("attachment", "附件1.pdf", 20, "b" * 64)]
    built = Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                     recipients=[Recipient("1152230107CTPD8U2P")], payload=payload, attachments=atts)
    xml = built.to_xml()
    env = Envelope.from_xml(xml, validate=False)
    assert "attachments" not in vars(env)  # not read yet
    tree = env.tree()
    twin = copy.deepcopy(env)
    assert env.body() == atts[0]
    assert env.attachments == atts and env.tree() is tree  # reading them kept the tree
    assert twin.attachments == atts
    assert Envelope.from_xml(xml, validate=False).to_xml() == xml  # writing reads them too
    env.attachments = atts[:1]
    assert env.attachments == atts[:1] and env._tree is None  # setting them drops the tree
    empty = Envelope.from_xml(Envelope(subsystem="documents", type="document", sender_unit="x",
                                       recipients=[], payload=payload).to_xml(), validate=False)
    assert empty.attachments == []
    try:
        env.no_such_field  # noqa: B018
    except AttributeError as exc:
        assert "no_such_field" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


# -- plain text from JSON (xmlsafe.plain_json, Envelope.plain_text) --------------------------
#: characters a caller's text may hold: what XML must escape, what it cannot carry, line
#: breaks, a backslash, fullwidth forms and CJK (U+FFxx share their first UTF-8 bytes with
#: U+FFFE / U+FFFF), an emoji beyond the BMP
_JSON_CHARS = st.sampled_from(list("&<>\"'\\\t\n\r\x01\x1f\x7f\ufffe\uffff，：（）甲乙丙a1 ./") + ["\U0001F4C4"])
_JSON_TEXT = st.text(_JSON_CHARS, min_size=1, max_size=12)
_BASE = {"sender_unit": "11522300GDR9YB9550", "issuer": "州人民政府办公室", "doc_type": "通知",
         "doc_number": "州政办发〔2026〕37号", "title": "关于做好冬季值班工作的通知", "written_date": "2026-11-20",
         "classification": "秘密", "classification_period": "1年", "signer": "王某某", "note": "附注",
         "publish_level": "不公开", "conversation_id": "conv-1",
         "recipients": [{"unit": "1152230107CTPD8U2P", "name": "甲县人民政府办公室", "copy_no": "000001"}],
         "body": {"sha256": "a" * 64, "name": "正文.ofd", "media_type": "application/ofd"},
         "attachments": [{"sha256": "b" * 64, "name": "附件1.pdf", "media_type": "application/pdf"}],
         "printer": {"name": "州人民政府办公室", "date": "2026-11-21"}}


def _set(doc: dict, path: tuple, value: str) -> dict:
    out = json.loads(json.dumps(doc))
    at = out
    for p in path[:-1]:
        at = at[p]
    at[path[-1]] = value
    return out


def _text_paths(model: type, prefix: tuple = ()) -> list[tuple]:
    """Every string field of ``model`` (a pydantic model or a TypedDict) and of the models
    in it (the first item of a list)."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        fields = {name: f.annotation for name, f in model.model_fields.items()}
    else:
        fields = typing.get_type_hints(model)  # a TypedDict (Annotated stripped)
    paths = []
    for name, annotation in fields.items():
        args = typing.get_args(annotation) if typing.get_origin(annotation) is not list else ()
        if typing.get_origin(annotation) is list:
            paths += _text_paths(typing.get_args(annotation)[0], (*prefix, name, 0))
        elif inner := [a for a in (*args, annotation) if typing_extensions.is_typeddict(a)
                       or isinstance(a, type) and issubclass(a, BaseModel)]:
            paths += _text_paths(inner[0], (*prefix, name))
        elif annotation is str or str in args or typing.get_origin(annotation) is typing.Literal:
            paths.append((*prefix, name))
    return paths


def test_every_text_field_of_a_document_refuses_what_xml_cannot_carry():
    """xmlsafe.plain_json does not look for U+FFFE / U+FFFF (JSON carries them unescaped):
    DocumentIn must refuse them in every string field, those added later included. Control
    characters make the JSON not plain (JSON escapes them), and the text writers would raise
    on them: the model must refuse them too, so that they are a 422 naming the field."""
    from systems.documents.schemas import DocumentIn

    DocumentIn.model_validate_json(json.dumps(_BASE, ensure_ascii=False))  # the base is valid
    paths = _text_paths(DocumentIn)
    assert ("attachments", 0, "name") in paths and ("printer", "date") in paths and ("body", "sha256") in paths \
        and len(paths) >= 26, paths
    for path in paths:
        for bad in ("\ufffe", "\uffff", "\x01", "\x1f", "\x00"):
            at = _BASE
            for p in path:
                at = at.get(p, "") if isinstance(at, dict) else at[p]
            value = (at if isinstance(at, str) else "") + bad
            data = json.dumps(_set(_BASE, path, value), ensure_ascii=False).encode()
            assert xmlsafe.plain_json(data) is (bad in "\ufffe\uffff")  # left to the model, or not plain
            with pytest.raises(ValidationError) as exc:  # … and the model refuses it, naming the field
                DocumentIn.model_validate_json(data)
            assert [e["loc"] for e in exc.value.errors()] == [path], (path, bad)


def _payload_tree(doc):  # type: ignore[no-untyped-def]
    """The reference for systems.documents.payload.payload_xml: the payload built as an lxml
    tree (as the API did before it wrote the text itself)."""
    from systems.documents import rules

    d = "{urn:egov:gateway:documents:v1}"
    el = etree.Element(d + "document", nsmap={None: "urn:egov:gateway:documents:v1"})
    etree.SubElement(el, d + "doc-type").text = doc.doc_type
    etree.SubElement(el, d + "issuer").text = doc.issuer
    prefix, year, serial = rules.split_doc_number(doc.doc_number)
    etree.SubElement(el, d + "doc-number", prefix=prefix, year=year, serial=serial).text = doc.doc_number
    etree.SubElement(el, d + "title").text = doc.title
    if doc.signer is not None:
        etree.SubElement(el, d + "signer").text = doc.signer
    etree.SubElement(el, d + "written-date").text = doc.written_date
    if doc.publish_level is not None:
        etree.SubElement(el, d + "publish-level").text = doc.publish_level
    etree.SubElement(el, d + "sealed").text = "true" if doc.sealed else "false"
    if doc.note is not None:
        etree.SubElement(el, d + "note").text = doc.note
    if doc.printer:
        etree.SubElement(el, d + "printer", name=doc.printer.name, date=doc.printer.date)
    return el


def _check_written(data: bytes, plain: bool) -> None:
    """What the API does with a JSON document's bytes, held to the references: the envelope
    and its payload as lxml writes them, and a payload the payload XSD accepts."""
    from gateway import payloads
    from systems.documents.payload import payload_xml, to_envelope
    from systems.documents.schemas import DocumentIn

    model = DocumentIn.model_validate_json(data)
    tree = _payload_tree(model)
    payloads.validate(tree)  # raises if the XSD refuses what the model accepted
    lxml_bytes = etree.tostring(tree, encoding="UTF-8")
    assert payload_xml(model, plain) == payload_xml(model, False) == lxml_bytes
    env = to_envelope(model, message_id=None, node_id="prefecture", sizes={"a" * 64: 1, "b" * 64: 2}, plain=plain)
    assert env._plain is plain and env.payload_written
    twin = dataclasses.replace(env, payload=tree)  # every field as it is, the payload an lxml tree
    assert not twin.payload_written
    assert env.to_xml() == _reference(twin)
    assert etree.tostring(env.payload, encoding="UTF-8") == lxml_bytes  # parsed when read


_DOC_NUMBER_TEXT = st.text(st.sampled_from(list("&<>\"'\\\ufffe\uffff，：甲乙a1./") + ["\U0001F4C4"]),
                           min_size=1, max_size=6).map(lambda p: f"{p}〔2026〕12号")


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.tuples(st.sampled_from([
    ("issuer",), ("title",), ("note",), ("signer",), ("publish_level",), ("classification_period",),
    ("conversation_id",), ("recipients", 0, "name"), ("body", "name"), ("body", "media_type"),
    ("attachments", 0, "name"), ("attachments", 0, "media_type"), ("printer", "name")]), _JSON_TEXT),
    min_size=1, max_size=6), ascii_only=st.booleans(), doc_number=st.none() | _DOC_NUMBER_TEXT,
    doc_type=st.sampled_from(["通知", "请示", "令", "纪要", "函"]), sealed=st.booleans(),
    absent=st.sets(st.sampled_from(["note", "signer", "publish_level", "printer", "attachments"])),
    written_date=st.sampled_from(["2026-11-20", "2026年1月5日", "1949年10月1日", "2099-12-31"]))
def test_json_documents_are_written_as_lxml_writes_them(values, ascii_only, doc_number, doc_type, sealed, absent,
                                                        written_date):  # type: ignore[no-untyped-def]
    """The API writes a JSON document's envelope and payload as text (and declares the
    envelope plain when xmlsafe.plain_json says so, so its values are not looked at again):
    for any document the model accepts, the bytes are lxml's and the payload is one the
    payload XSD accepts (the accept path no longer checks it: Envelope.written_payload)."""
    from systems.documents.schemas import DocumentIn

    doc = {**_BASE, "doc_type": doc_type, "sealed": sealed, "written_date": written_date}
    if doc_number is not None:
        doc["doc_number"] = doc_number
    for path, text in values:
        doc = _set(doc, path, text)
    for name in absent:
        doc.pop(name)
    data = json.dumps(doc, ensure_ascii=ascii_only).encode()
    try:
        DocumentIn.model_validate_json(data)
    except ValidationError:
        return
    _check_written(data, xmlsafe.plain_json(data))


def test_every_payload_field_at_its_limits_is_written_as_lxml_writes_it():
    """The longest and shortest values the model accepts, every optional element there and
    absent: the XSD accepts each payload (it is never checked on the accept path)."""
    limits = {"issuer": 200, "title": 500, "signer": 100, "note": 2000, "publish_level": 20}
    for size in ("shortest", "longest"):
        doc = dict(_BASE, printer={"name": "印" * (200 if size == "longest" else 1), "date": "2026年11月21日"})
        for name, longest in limits.items():
            doc[name] = "字" * (longest if size == "longest" else 1)
        doc["doc_number"] = ("州" * 150 if size == "longest" else "州") + "〔2026〕999999号"
        _check_written(json.dumps(doc, ensure_ascii=False).encode(), True)
        for name in ("signer", "note", "publish_level", "printer"):
            _check_written(json.dumps({k: v for k, v in doc.items() if k != name}, ensure_ascii=False).encode(), True)


@pytest.mark.parametrize("name", ["signer", "note", "publish_level", "issuer", "title"])
def test_an_empty_text_is_refused_by_the_model_as_the_payload_xsd_would(name):
    """The payload XSD's texts have at least one character; the model says so itself, naming
    the field (an empty 签发人 was refused by the XSD check of the accept path before)."""
    from systems.documents.schemas import DocumentIn

    with pytest.raises(ValidationError) as exc:
        DocumentIn.model_validate({**_BASE, name: ""})
    assert [e["loc"] for e in exc.value.errors()] == [(name,)]


def test_a_written_payload_is_parsed_when_read_and_replaced_when_set():  # type: ignore[no-untyped-def]
    from systems.documents.payload import to_envelope
    from systems.documents.schemas import DocumentIn

    model = DocumentIn.model_validate({**_BASE, "issuer": "州&<政府>"})  # escaped, not plain
    env = to_envelope(model, message_id="m-00000001", node_id="prefecture", sizes={"a" * 64: 1, "b" * 64: 2})
    assert "payload" not in vars(env) and env.payload_written
    xml = env.to_xml()
    assert "payload" not in vars(env)  # writing did not parse it
    assert b"<issuer>\xe5\xb7\x9e&amp;&lt;\xe6\x94\xbf\xe5\xba\x9c&gt;</issuer>" in xml
    assert Envelope.from_xml(xml).payload.findtext("{urn:egov:gateway:documents:v1}issuer") == "州&<政府>"
    assert env.payload.findtext("{urn:egov:gateway:documents:v1}issuer") == "州&<政府>"  # parsed on first read
    assert env.payload is env.payload and env.payload_written
    env.payload = _payload("新标题", "a")  # set: the written text is gone
    assert not env.payload_written and "新标题".encode() in env.to_xml() and env.to_xml() == _reference(env)


def test_plain_text_is_forgotten_when_a_field_is_set():  # type: ignore[no-untyped-def]
    env = Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                   recipients=[Recipient("1152230107CTPD8U2P")], payload=_payload("t", "a")).plain_text()
    env.sender_name = "A&B"
    assert not env._plain
    assert b'name="A&amp;B"' in env.to_xml() and env.to_xml() == _reference(env)
    env.plain_text().attachment_rows([("body", "<正文>.ofd", 1, "a" * 64, None)])  # new rows, too
    assert not env._plain and env.to_xml() == _reference(env)


def test_attachment_rows_are_written_and_read_like_attachments():  # type: ignore[no-untyped-def]
    rows = [("body", "正文&.ofd", 3, "a" * 64, "application/ofd"), ("attachment", "附件\"1\".pdf", 0, "b" * 64, None)]

    def new() -> Envelope:
        return Envelope(subsystem="documents", type="document", sender_unit="11522300GDR9YB9550",
                        recipients=[Recipient("1152230107CTPD8U2P")], payload=_payload("t", "a"),
                        created=datetime(2026, 11, 26, 8, 0, tzinfo=UTC), message_id="m-00000001")

    plain = [("body", "正文.ofd", 3, "a" * 64, "application/ofd"), ("attachment", "附件1.pdf", 0, "b" * 64, None)]
    for items, declared in ((plain, True), (plain, False), (rows, False)):
        env = new().attachment_rows(items)
        if declared:
            env.plain_text()  # written from the rows as they are
        twin = new()
        twin.attachments = [Attachment(*r) for r in items]
        assert env.to_xml() == twin.to_xml() == _reference(twin)
        assert "attachments" not in env.__dict__ or not declared  # the rows were not made into objects
        assert env.attachments == twin.attachments and env.body() == Attachment(*items[0])  # made when read
    env = new().attachment_rows(rows)
    env.attachments = []  # set afterwards: the rows are gone
    assert b"<attachments" not in env.to_xml() and env.to_xml() == _reference(env)
