"""The simulated legacy systems run inside ``gateway serve`` (embedded default) for as long
as the node does: what they remember must stay bounded however many documents pass."""
from __future__ import annotations

from werkzeug.test import Client

from adapters.simulators.exchange_box import ExchangeBox, ExchangeBoxState
from adapters.simulators.soap_service import DocExchangeState

UNIT = "1152230107CTPD8U2P"


def _archive(i: int) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><archive action="sendArchive" archiveid="A{i:05d}">'
            f"<archiveparameters><title>通知 {i}</title></archiveparameters>"
            f'<receivers><receiver trustorgno="{UNIT}" appid="OA" name="甲县"/></receivers></archive>').encode()


def test_exchange_box_keeps_only_the_newest_archives_callbacks_and_rejections() -> None:
    box = ExchangeBox(ExchangeBoxState(max_archives=20, max_log=5))
    client = Client(box)
    for i in range(200):
        r = client.post("/ArchiveHandleServlet", data=_archive(i), content_type="application/xml")
        assert r.status_code == 200, r.get_data(as_text=True)
        client.post("/ArchiveHandleServlet", data=b"<nope/>", content_type="application/xml")
    assert box.state.counters["accepted"] == 200
    assert len(box.state.archives) == 20
    assert ("A00199", UNIT) in box.state.archives and ("A00179", UNIT) not in box.state.archives
    assert len(box.state.rejections) == 5
    for i in range(180, 200):
        assert box.sign(f"A{i:05d}", UNIT).done.is_set()  # no callback_url: settled at once
    assert len(box.state.callbacks) == 5


def test_exchange_box_holds_at_most_max_bytes_of_archives() -> None:
    one = len(_archive(0))
    box = ExchangeBox(ExchangeBoxState(max_bytes=10 * one + 50))
    client = Client(box)
    for i in range(100):
        client.post("/ArchiveHandleServlet", data=_archive(i), content_type="application/xml")
    assert len(box.state.archives) == 10
    assert sum(len(r.body) for r in box.state.archives.values()) <= 10 * one + 50


def _send(state: DocExchangeState, n: int, body: bytes = b"x" * 1000) -> None:
    for i in range(n):
        state.send_document({"doc_id": f"D{i}", "title": "通知", "issuer": "州人民政府办公室",
                             "doc_number": f"州政办发〔2026〕{i + 1}号", "doc_type": "通知",
                             "classification": "非密", "urgency": "平件", "recipient_unit": UNIT,
                             "body_name": "正文.ofd", "body": body})


def test_soap_service_holds_at_most_max_body_bytes() -> None:
    state = DocExchangeState(max_body_bytes=10_000)
    try:
        _send(state, 100, b"y" * 1000)
        assert [state.query_status(f"D{i}") for i in (89, 90, 99)] == ["UNKNOWN", "RECEIVED", "RECEIVED"]
        assert len(state.arrived([f"D{i}" for i in range(100)])) == 100  # times are small: kept by count
    finally:
        state.close()


def test_soap_service_keeps_only_the_newest_documents() -> None:
    state = DocExchangeState(max_docs=20)
    try:
        for i in range(200):
            state.send_document({"doc_id": f"D{i}", "title": "通知", "issuer": "州人民政府办公室",
                                 "doc_number": f"州政办发〔2026〕{i + 1}号", "doc_type": "通知",
                                 "classification": "非密", "urgency": "平件", "recipient_unit": UNIT,
                                 "body_name": "正文.ofd", "body": b"x" * 1000})
        assert state.query_status("D199") == "RECEIVED"
        assert state.query_status("D0") == "UNKNOWN"
        assert len(state.arrived([f"D{i}" for i in range(200)])) == 20
    finally:
        state.close()
