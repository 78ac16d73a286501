"""Rare characters (生僻字) in GB18030: 4-byte codes (CJK Ext B and later) and the 18 characters
GB18030-2022 moved out of the Private Use Area, on the legacy side's files."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from adapters.archive import parse_receipt, read_archive, write_archive
from adapters.base import Delivery
from gateway import xmlsafe
from gateway.blobs import BlobStore
from gateway.envelope import Attachment, Envelope

DATA = Path(__file__).parent / "data"
NS = "{urn:egov:gateway:documents:v1}"
RARE = "𠀀𪚥𬌗"  # U+20000, U+2A6A5, U+2C317: 4-byte codes, beyond GBK
MOVED = "\u9fb4\ufe10"  # 龴 and ︐: GB18030-2022 FE59 and A6D9, the 2005 edition's U+E81E and U+E78D


def receipt(signer: str, encoding: str = "GB18030") -> bytes:
    return (f'<?xml version="1.0" encoding="{encoding}"?>\n'
            f'<receipt action="SIGN" archiveid="8f14e45f-ceea-467a-9575-3b1b2d0e8a01">'
            f'<unit trustorgno="1152230107CTPD8U2P" name="甲县{RARE}办"/><signer>{signer}</signer>'
            f'<time>2026-11-20T10:15:00+08:00</time><receiptno>JXF-2026-0002</receiptno></receipt>'
            ).encode("gb18030")


@pytest.mark.parametrize("encoding", ["GB18030", "GBK", "GB2312", "windows-936", "GB_2312-80"])
def test_a_4_byte_signer_is_read_whatever_gb_encoding_the_file_declares(encoding: str) -> None:
    assert parse_receipt(receipt(f"王{RARE}·某", encoding)).signer == f"王{RARE}·某"


def test_a_2022_peers_two_byte_codes_read_as_the_standard_characters() -> None:
    data = receipt("王").replace("王".encode("gb18030"), b"\xfe\x59\xa6\xd9")  # as a 2022 peer writes 龴︐
    assert parse_receipt(data).signer == MOVED


def test_characters_moved_out_of_the_pua_go_out_in_the_code_both_editions_read(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    env = Envelope.from_xml((DATA / "envelope-document.xml").read_bytes())
    sha, size = blobs.put_bytes(b"body")
    env.attachments = [Attachment("body", f"正文{RARE}.ofd", size, sha, None)]
    env.payload.find(NS + "title").text = f"关于{MOVED}{RARE}〔2026〕的通知"
    out = io.BytesIO()
    write_archive(env, env.recipients[0], blobs, out, archive_id="ref-00000001")
    data = out.getvalue()
    assert b"\xfe\x59\xa6\xd9" in data  # not U+9FB4's 4-byte code, which a 2022 reader takes for U+E81E
    back, _ = read_archive(data)
    assert back.payload.findtext(NS + "title") == f"关于{MOVED}{RARE}〔2026〕的通知"
    assert back.attachments[0].name == f"正文{RARE}.ofd"
    assert xmlsafe.gb18030_decode(data).count(RARE) == 2


def test_a_peer_nodes_status_keeps_what_the_columns_hold(api, gw_node) -> None:  # type: ignore[no-untyped-def]
    """signer and receipt_no are VARCHAR(100), counted in characters on PostgreSQL: a longer
    one from a peer is cut there, not refused by the database with the whole batch; a 退回
    reason is kept whole."""
    from sqlalchemy import select

    from gateway.federation.transfer import apply_status
    from gateway.models import Delivery
    from tests.plugins.gatewaynode import COUNTY_A

    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    with gw_node.db.begin() as s:
        d = s.scalars(select(Delivery).where(Delivery.message_id == mid)).one()
        d.route_kind, d.target = "node", "county-a"
    with gw_node.db.begin() as s:
        assert apply_status(s, "county-a", {"message_id": mid, "unit": COUNTY_A, "status": "returned",
                                            "signer": "𪚥" * 150, "receipt_no": "𠀀" * 150,
                                            "reason": "文号有误" + "𬌗" * 300}) == "returned"
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert (got["signer"], got["receipt_no"], got["reason"]) == ("𪚥" * 100, "𠀀" * 100, "文号有误" + "𬌗" * 300)


@pytest.mark.parametrize("declared", ["GB18030", "GBK"])
@pytest.mark.parametrize("where", ["declaration", "content-type"])
def test_a_soap_service_answering_in_gb18030_gives_the_signer_unchanged(
        soap_service, make_soap_adapter, document, http_endpoint, declared: str, where: str) -> None:  # type: ignore[no-untyped-def]
    """A service that declares GBK but writes GB18030 (a 4-byte signer): read, not refused;
    also when only its Content-Type names the charset (no XML declaration), which XML over
    HTTP makes authoritative (RFC 7303): read as GB18030, not as UTF-8."""
    import requests

    def in_gb(body: bytes, content_type: str) -> tuple[int, bytes, str]:
        r = requests.post(soap_service.url, data=body, headers={"Content-Type": content_type}, timeout=5)
        head = f'<?xml version="1.0" encoding="{declared}"?>' if where == "declaration" else ""
        text = r.content.decode("utf-8").replace("<?xml version='1.0' encoding='UTF-8'?>", head)
        assert ("encoding=" in text[:100]) == (where == "declaration")
        return r.status_code, text.encode("gb18030"), f"text/xml; charset={declared}"

    http_endpoint.handler = in_gb
    adapter = make_soap_adapter(address=http_endpoint.url)
    delivery = Delivery(document.message_id, document.recipients[0], document)
    adapter.deliver(delivery)
    soap_service.state.sign(delivery.remote_ref, f"王{RARE}{MOVED}", receipt_no="QS-2026-0042")
    assert [i.receipt.signer for i in adapter.poll()] == [f"王{RARE}{MOVED}"]
