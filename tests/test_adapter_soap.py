"""The SOAP adapter against the simulated document exchange service, over real HTTP.

Specification of :mod:`adapters.soap` under the contract of :mod:`adapters.base` and the fixed
docexchange contract (``shared/legacy/README.md`` section 1).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from adapters.base import ConfigError, Delivery, PermanentError, RetryableError
from adapters.simulators.soap_service import SEND_FIELDS, SoapServiceServer
from adapters.soap import CURSOR_KEY, DEFAULT_SEND_ARGUMENTS, SoapAdapter
from gateway import ROOT, xmlsafe
from gateway.envelope import Envelope
from tests.plugins.soap import DictState

from tests.plugins.soap import BODY  # noqa: E402 - the sample document's body (正文)
COUNTY_A = "1152230107CTPD8U2P"
CITY_B = "11522302GRALUMYP76"

MakeAdapter = Callable[..., SoapAdapter]


def to(env: Envelope, unit: str) -> Delivery:
    return Delivery(env.message_id, next(r for r in env.recipients if r.unit == unit), env)


def with_argument(name: str, expr: str) -> dict[str, Any]:
    return {"send": {"arguments": {**DEFAULT_SEND_ARGUMENTS, name: expr}}}


# -- deliver -------------------------------------------------------------------------------
def test_deliver_hands_over_the_document_with_all_ten_fields_mapped(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    delivery = to(document, COUNTY_A)
    result = make_soap_adapter(soap_service).deliver(delivery)

    doc = soap_service.state.document(delivery.remote_ref)
    assert doc is not None, "the service holds the document under doc_id = remote_ref"
    assert result.remote_id == doc.receipt_id
    assert {f: getattr(doc, f) for f in SEND_FIELDS} == {
        "doc_id": delivery.remote_ref,
        "title": "关于做好2026年冬季值班和突发事件信息报送工作的通知",
        "issuer": "州人民政府办公室",
        "doc_number": "州政办发〔2026〕37号",
        "doc_type": "通知",
        "classification": "非密",
        "urgency": "加急",
        "recipient_unit": COUNTY_A,
        "body_name": "正文.ofd",
        "body": BODY,
    }


def test_redelivery_of_the_same_delivery_has_no_second_effect(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    first = make_soap_adapter(soap_service).deliver(to(document, COUNTY_A))
    again = make_soap_adapter(soap_service).deliver(to(document, COUNTY_A))  # after a "crash"
    assert again.remote_id == first.remote_id
    assert (soap_service.state.send_calls, soap_service.state.documents) == (2, 1)

    other = make_soap_adapter(soap_service).deliver(to(document, CITY_B))
    assert other.remote_id != first.remote_id, "another recipient is another document there"
    assert soap_service.state.documents == 2


@pytest.mark.parametrize("argument, expr", [
    ("urgency", "const:火急"),
    ("classification", "const:内部"),
    ("doc_type", "const:便函"),
    ("title", "const:"),
])
def test_input_the_service_refuses_is_a_permanent_client_fault(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope,
    argument: str, expr: str,
) -> None:
    adapter = make_soap_adapter(soap_service, **with_argument(argument, expr))
    with pytest.raises(PermanentError) as err:
        adapter.deliver(to(document, COUNTY_A))
    assert err.value.code.startswith("Client.")
    assert argument in str(err.value)
    assert soap_service.state.documents == 0


def test_ling_is_accepted_as_a_doc_type(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    delivery = to(document, COUNTY_A)
    make_soap_adapter(soap_service, **with_argument("doc_type", "const:令")).deliver(delivery)
    assert soap_service.state.document(delivery.remote_ref).doc_type == "令"


@pytest.mark.parametrize("kind, error", [
    ("server-fault", RetryableError),
    ("http503", RetryableError),
    ("client-fault", PermanentError),
])
def test_service_trouble_is_classified_and_a_later_attempt_delivers_once(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope,
    kind: str, error: type[Exception],
) -> None:
    adapter = make_soap_adapter(soap_service)
    soap_service.state.fail_next(1, kind, "SendDocument")
    with pytest.raises(error):
        adapter.deliver(to(document, COUNTY_A))
    assert soap_service.state.documents == 0

    adapter.deliver(to(document, COUNTY_A))
    assert (soap_service.state.send_calls, soap_service.state.documents) == (2, 1)


def test_http_404_is_a_setting_to_fix_and_retried(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    """Only Client.* faults are final (legacy README §1). A 404 without a fault means the
    address is wrong: retried, so that the queued documents go once it is corrected."""
    adapter = make_soap_adapter(address=soap_service.url + "-no-such-path")
    with pytest.raises(RetryableError, match="HTTP 404.*address"):
        adapter.deliver(to(document, COUNTY_A))
    assert soap_service.state.documents == 0


def test_service_down_is_retryable_and_delivers_once_when_back(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    adapter = make_soap_adapter(soap_service)
    assert adapter.check().ok

    soap_service.stop()
    with pytest.raises(RetryableError, match="cannot connect"):
        adapter.deliver(to(document, COUNTY_A))

    soap_service.start()
    adapter.deliver(to(document, COUNTY_A))
    assert soap_service.state.documents == 1


def test_a_timeout_is_retryable_and_the_retry_finds_the_document_already_there(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    delivery = to(document, COUNTY_A)
    adapter = make_soap_adapter(soap_service, timeout=0.3)
    soap_service.state.response_delay = 0.8
    with pytest.raises(RetryableError, match="no answer"):
        adapter.deliver(delivery)
    soap_service.state.response_delay = 0
    deadline = time.monotonic() + 3  # the service finishes the slow call on its own
    while soap_service.state.document(delivery.remote_ref) is None and time.monotonic() < deadline:
        time.sleep(0.05)

    result = adapter.deliver(delivery)
    assert result.remote_id == soap_service.state.document(delivery.remote_ref).receipt_id
    assert soap_service.state.documents == 1


def test_a_connection_cut_mid_call_is_retryable_and_the_retry_after_restart_finds_the_document(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    delivery = to(document, COUNTY_A)
    adapter = make_soap_adapter(soap_service)
    soap_service.state.response_delay = 0.5
    outcome: list[BaseException | None] = []

    def deliver() -> None:
        try:
            adapter.deliver(delivery)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=deliver)
    worker.start()
    time.sleep(0.2)  # the call is in flight
    soap_service.stop()
    worker.join(timeout=5)
    assert isinstance(outcome[0], RetryableError)

    soap_service.state.response_delay = 0
    soap_service.start()
    deadline = time.monotonic() + 3  # the cut call still completes at the service
    while soap_service.state.document(delivery.remote_ref) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter.deliver(delivery).remote_id == soap_service.state.document(delivery.remote_ref).receipt_id
    assert soap_service.state.documents == 1


# -- poll ----------------------------------------------------------------------------------
def test_poll_yields_signed_and_returned_receipts_until_acked(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope,
    soap_state: Any,
) -> None:
    adapter = make_soap_adapter(soap_service)
    a, b = to(document, COUNTY_A), to(document, CITY_B)
    adapter.deliver(a)
    adapter.deliver(b)
    soap_service.state.sign(a.remote_ref, "李四", receipt_no="QS-2026-0042")
    soap_service.state.return_document(b.remote_ref, "非本单位职责", "王五")

    items = list(adapter.poll())
    assert [i.key for i in items] == ["docexchange:seq:1", "docexchange:seq:2"]
    signed, returned = (i.receipt for i in items)
    assert (signed.action, signed.remote_ref, signed.unit, signed.signer, signed.receipt_no) == (
        "SIGNED", a.remote_ref, COUNTY_A, "李四", "QS-2026-0042")
    assert (returned.action, returned.remote_ref, returned.unit, returned.reason, returned.receipt_no) == (
        "RETURNED", b.remote_ref, CITY_B, "非本单位职责", "QS00000002")
    assert signed.time is not None and signed.time.tzinfo is not None

    assert [i.key for i in adapter.poll()] == [i.key for i in items], "not acked: again"
    for item in items:
        item.ack()
    assert list(adapter.poll()) == []
    assert list(make_soap_adapter(soap_service).poll()) == [], "the cursor is in the state store"
    assert soap_state.get(CURSOR_KEY) == "2"

    c = to(document, "11522300QNNHM83X1E")
    adapter.deliver(c)
    soap_service.state.sign(c.remote_ref, "赵六")
    assert [i.receipt.remote_ref for i in adapter.poll()] == [c.remote_ref]


def test_ack_never_moves_the_cursor_backwards(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope,
    soap_state: Any,
) -> None:
    adapter = make_soap_adapter(soap_service)
    for unit in (COUNTY_A, CITY_B):
        adapter.deliver(to(document, unit))
        soap_service.state.sign(to(document, unit).remote_ref, "李四")
    first, second = adapter.poll()
    second.ack()
    first.ack()
    assert soap_state.get(CURSOR_KEY) == "2"


def test_a_rejected_receipt_is_skipped_for_good(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope,
    soap_state: Any,
) -> None:
    adapter = make_soap_adapter(soap_service)
    adapter.deliver(to(document, COUNTY_A))
    soap_service.state.sign(to(document, COUNTY_A).remote_ref, "李四")
    (item,) = adapter.poll()
    item.reject("no delivery has this remote_ref")
    assert list(adapter.poll()) == []
    assert soap_state.get(CURSOR_KEY) == "1"


def test_poll_pages_through_full_pages_but_stops_at_max_per_poll(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter
) -> None:
    state = soap_service.state
    for n in range(1200):  # set up at the service itself: a busy week of receipts
        doc_id = f"doc-{n}"
        state.send_document({f: "x" for f in SEND_FIELDS} | {
            "doc_id": doc_id, "classification": "非密", "urgency": "平件", "doc_type": "函",
            "body": b"x"})
        state.sign(doc_id, "李四")
    small = make_soap_adapter(soap_service, max_per_poll=700, state=DictState())
    assert [i.key for i in small.poll()][-1] == "docexchange:seq:700"  # the 2nd page cut short
    state_calls = state.calls("FetchReceipts")

    adapter = make_soap_adapter(soap_service)
    items = list(adapter.poll())
    assert [i.key for i in items] == [f"docexchange:seq:{n}" for n in range(1, 1001)]
    assert state.calls("FetchReceipts") - state_calls == 2  # two full pages of 500
    for item in items:
        item.ack()
    assert len(list(adapter.poll())) == 200
    assert state.calls("FetchReceipts") - state_calls == 3  # a short page ends the poll


# -- recall, check -------------------------------------------------------------------------
def test_recall_succeeds_before_sign_for_and_is_too_late_after(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    adapter = make_soap_adapter(soap_service)
    a, b = to(document, COUNTY_A), to(document, CITY_B)
    adapter.deliver(a)
    adapter.deliver(b)
    soap_service.state.sign(b.remote_ref, "王五")

    assert adapter.recall(document.message_id, COUNTY_A) is True
    assert soap_service.state.query_status(a.remote_ref) == "RECALLED"
    assert adapter.recall(document.message_id, CITY_B) is False
    assert soap_service.state.query_status(b.remote_ref) == "SIGNED"


def test_check_reports_health_and_latency(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter
) -> None:
    adapter = make_soap_adapter(soap_service)
    health = adapter.check()
    assert health.ok and health.latency_ms is not None and health.latency_ms > 0

    soap_service.stop()
    health = adapter.check()
    assert not health.ok
    assert "cannot connect" in health.message and soap_service.url in health.message


# -- WS-Security ---------------------------------------------------------------------------
PASSWORD = "s3cret-Pa55-州办"


@pytest.mark.parametrize("credentials", [
    {},
    {"username": "gateway", "password_env": "DOCEX_PASSWORD"},  # wrong value, see secrets
    {"username": "intruder", "password_env": "RIGHT_PASSWORD"},
])
def test_ws_security_wrong_credentials_are_rejected_permanently(
    soap_service_factory: Callable[..., SoapServiceServer], make_soap_adapter: MakeAdapter,
    document: Envelope, credentials: dict[str, str],
) -> None:
    service = soap_service_factory(username="gateway", password=PASSWORD)
    secrets = {"DOCEX_PASSWORD": "wrong-guess-123", "RIGHT_PASSWORD": PASSWORD}
    adapter = make_soap_adapter(service, secrets=secrets, **credentials)
    with pytest.raises(PermanentError) as err:
        adapter.deliver(to(document, COUNTY_A))
    assert err.value.code == "Client.Authentication"
    assert "wrong-guess-123" not in str(err.value) and PASSWORD not in str(err.value)
    assert service.state.documents == 0
    assert not adapter.check().ok


@pytest.mark.parametrize("digest", [False, True])
def test_ws_security_right_password_is_accepted(
    soap_service_factory: Callable[..., SoapServiceServer], make_soap_adapter: MakeAdapter,
    document: Envelope, tmp_path: Path, digest: bool,
) -> None:
    service = soap_service_factory(username="gateway", password=PASSWORD)
    (tmp_path / "docex.pw").write_text(PASSWORD + "\n")
    adapter = make_soap_adapter(service, username="gateway", password_file="docex.pw",
                                password_digest=digest)
    adapter.deliver(to(document, COUNTY_A))
    assert service.state.documents == 1


# -- WSDL and configuration ----------------------------------------------------------------
def test_the_service_serves_its_wsdl_and_an_adapter_can_load_it_once_the_service_is_up(
    soap_service: SoapServiceServer, make_soap_adapter: MakeAdapter, document: Envelope
) -> None:
    wsdl = xmlsafe.parse(requests.get(soap_service.wsdl_url, timeout=5).content)
    location = wsdl.find(".//{http://schemas.xmlsoap.org/wsdl/soap/}address").get("location")
    assert location == soap_service.url

    soap_service.stop()
    adapter = make_soap_adapter(wsdl=soap_service.wsdl_url)  # building needs no network
    with pytest.raises(RetryableError):
        adapter.deliver(to(document, COUNTY_A))
    soap_service.start()
    adapter.deliver(to(document, COUNTY_A))  # the address comes from the served WSDL
    assert soap_service.state.documents == 1


@pytest.mark.parametrize("config, key", [
    (with_argument("title", "xpath:string(e:payload/d:document/d:title"),
     "send.arguments.title"),
    (with_argument("title", "xpath:string(x:title)"), "send.arguments.title"),
    (with_argument("title", "xpath:$subject"), "send.arguments.title"),
    (with_argument("title", "title"), "send.arguments.title"),
    (with_argument("body", "blob:attachment"), "send.arguments.body"),
    (with_argument("subject", "const:x"), "send.arguments.subject"),
    ({"send": {"arguments": {"doc_id": "xpath:$remote_ref"}}}, "send.arguments"),
    ({"send": {"operation": "SendDocuments"}}, "send.operation"),
    ({"receipts": {"cursor_argument": "since"}}, "receipts.cursor_argument"),
    ({"timeout": 0}, "timeout"),
    ({"wsdl": "schemas/legacy/nope.wsdl"}, "wsdl"),
    ({"address": "docexchange.intranet"}, "address"),
    ({"username": "gateway"}, "password_env"),
    ({"username": "gateway", "password_env": "UNSET_VARIABLE"}, "password_env"),
])
def test_bad_configuration_is_a_config_error_naming_the_key(
    make_soap_adapter: MakeAdapter, config: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_soap_adapter(**{"address": "http://127.0.0.1:9/docexchange", **config})
    assert f"adapters.docexchange.{key}" in str(err.value)


def test_default_mapping_covers_every_send_document_argument() -> None:
    wsdl = xmlsafe.parse((ROOT / "schemas/legacy/docexchange.wsdl").read_bytes())
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    declared = wsdl.xpath("//xs:complexType[@name='SendDocument']//xs:element/@name", namespaces=ns)
    assert sorted(DEFAULT_SEND_ARGUMENTS) == sorted(declared) == sorted(SEND_FIELDS)


def test_debug_logging_never_shows_the_password_or_the_document(
    soap_service_factory: Callable[..., SoapServiceServer], make_soap_adapter: MakeAdapter,
    document: Envelope, caplog: pytest.LogCaptureFixture,
) -> None:
    """Someone looking into a link turns DEBUG on: zeep's transport would log each envelope
    whole, the WS-Security password (PasswordText) and the body (正文) in it."""
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    service = soap_service_factory(username="gateway", password=PASSWORD)
    adapter = make_soap_adapter(service, username="gateway", password_env="RIGHT_PASSWORD",
                                secrets={"RIGHT_PASSWORD": PASSWORD})
    adapter.deliver(to(document, COUNTY_A))
    assert service.state.documents == 1
    assert PASSWORD not in caplog.text and "gateway</wsse:Username>" not in caplog.text
    assert base64.b64encode(BODY).decode()[:24] not in caplog.text
    assert f"HTTP Post to {service.url}" in caplog.text and "of SOAP not logged" in caplog.text
