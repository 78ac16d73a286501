"""The OpenAPI document says what the API does, for a caller who generates its client from it:
every answer's status, media type, headers and body are in it, and what its schemas admit the
server takes (and what they refuse it refuses)."""
from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from adapters.base import PolledItem
from gateway.envelope import Receipt
from gateway.inbound import collect
from gateway.worker import Worker
from systems.documents import rules
from systems.documents.schemas import RECIPIENT_STATUSES
from tests.plugins.gatewaynode import COUNTY_A, Api


@pytest.fixture
def spec(sqlite_api) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return sqlite_api.client.get("/api/v1/openapi.json").get_json()


def _conforms(spec: dict[str, Any], method: str, path: str, r) -> None:  # type: ignore[no-untyped-def]
    """``r`` is an answer the document lists for ``method path``: its status, its media type,
    every header it marks required, and a body its schema admits."""
    responses = spec["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, (method, path, r.status_code, r.get_data(as_text=True))
    documented = responses[str(r.status_code)]
    assert r.mimetype in documented.get("content", {}), (method, path, r.status_code, r.mimetype)
    for name, header in documented.get("headers", {}).items():
        if header.get("required"):
            assert name in r.headers, (method, path, r.status_code, name)
        if name in r.headers:
            jsonschema.validate(_typed(r.headers[name], header["schema"]), header["schema"])
    schema = documented["content"][r.mimetype]["schema"]
    if r.mimetype.endswith("json"):
        jsonschema.validate(r.get_json(), {**schema, "components": spec["components"]},
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _typed(value: str, schema: dict[str, Any]) -> object:
    return int(value) if schema.get("type") == "integer" else value


def test_the_document_is_valid_openapi_with_an_id_summary_and_security_for_each_operation(spec):
    validate(spec)  # OpenAPI 3.1, every $ref resolves
    ids = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ids.append(op["operationId"])
            assert op["summary"], (method, path)
            if path.startswith(("/api/v1/documents", "/api/v1/blobs")):
                assert op["security"] == [{"apiKey": []}, {"apiKeyHeader": []}], (method, path)
                assert "401" in op["responses"] and "403" in op["responses"], (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400 and path != "/readyz":  # /readyz answers 503 with its checks
                    assert list(resp["content"]) == ["application/problem+json"], (method, path, status)
    assert len(ids) == len(set(ids))


def test_every_answer_of_a_documents_life_keeps_to_the_document(sqlite_api, spec):
    api = sqlite_api
    blob = api.post("/api/v1/blobs", data=b"body of a document", content_type="application/octet-stream")
    _conforms(spec, "post", "/api/v1/blobs", blob)
    _conforms(spec, "get", "/api/v1/blobs/{sha256}", api.get(blob.headers["Location"]))
    doc = api.document()
    sent = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "oa-1"})
    _conforms(spec, "post", "/api/v1/documents", sent)
    again = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "oa-1"})
    _conforms(spec, "post", "/api/v1/documents", again)
    assert again.headers["Idempotent-Replayed"] == "true"
    as_xml = api.post("/api/v1/documents", json=api.document(), headers={"Accept": "application/xml"})
    _conforms(spec, "post", "/api/v1/documents", as_xml)
    doc_id = sent.get_json()["id"]
    Worker(api.node).drain()
    rec = api.node.adapter("rec")
    rec.pending_items = [PolledItem(key="rec:1", receipt=Receipt(
        unit=COUNTY_A, action="SIGNED", remote_ref=rec.delivered[0].remote_ref, signer="李某", receipt_no="JXF-1",
        time=datetime(2026, 11, 20, 10, 15, tzinfo=UTC)))]
    assert collect(api.node, "rec") == {"signed": 1}
    got = api.get(f"/api/v1/documents/{doc_id}")
    assert got.get_json()["recipients"][0]["receipts"]  # a receipt is in the answer checked
    _conforms(spec, "get", "/api/v1/documents/{id}", got)
    _conforms(spec, "get", "/api/v1/documents/{id}", api.get(f"/api/v1/documents/{doc_id}",
                                                              headers={"Accept": "application/xml"}))
    _conforms(spec, "get", "/api/v1/documents", api.get("/api/v1/documents?limit=1"))
    recall = api.post(f"/api/v1/documents/{as_xml.headers['Location'].rsplit('/', 1)[1]}/recall",
                      headers={"Idempotency-Key": "recall-1"})
    _conforms(spec, "post", "/api/v1/documents/{id}/recall", recall)
    _conforms(spec, "post", "/api/v1/documents/{id}/recall",
              api.post(f"/api/v1/documents/{doc_id}/recall"))  # signed for: 409
    _conforms(spec, "get", "/api/v1/documents/{id}", api.client.get(f"/api/v1/documents/{doc_id}"))  # 401
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/webhooks/public-key"):
        _conforms(spec, "get", path, api.client.get(path))


def test_list_parameters_are_described_as_the_server_reads_them(sqlite_api, spec):
    params = {p["name"]: p["schema"] for p in spec["paths"]["/api/v1/documents"]["get"]["parameters"]}
    assert params["limit"]["minimum"] == 1 and "maximum" not in params["limit"]  # a larger limit gives 200
    assert sqlite_api.get("/api/v1/documents?limit=0").status_code == 400
    assert sqlite_api.get("/api/v1/documents?limit=1000").status_code == 200
    for status in params["status"]["enum"]:
        assert sqlite_api.get(f"/api/v1/documents?status={status}").status_code == 200, status
    assert sqlite_api.get("/api/v1/documents?status=archived").status_code == 400


def test_the_idempotency_key_is_described_with_the_length_the_server_takes(sqlite_api, spec):
    for path in ("/api/v1/documents", "/api/v1/documents/{id}/recall"):
        header = next(p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "Idempotency-Key")
        assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 200)
    api = sqlite_api
    assert api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": "k" * 200}).status_code == 202
    assert api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": "k" * 201}).status_code == 400


def test_headers_sent_with_an_answer_are_in_the_document(spec):
    paths = spec["paths"]
    assert paths["/api/v1/documents"]["post"]["responses"]["202"]["headers"]["Location"]["required"]
    assert "Idempotent-Replayed" in paths["/api/v1/documents"]["post"]["responses"]["202"]["headers"]
    assert "Idempotent-Replayed" in paths["/api/v1/documents/{id}/recall"]["post"]["responses"]["202"]["headers"]
    assert paths["/api/v1/blobs"]["post"]["responses"]["201"]["headers"]["Location"]["required"]
    assert paths["/api/v1/blobs"]["post"]["responses"]["429"]["headers"]["Retry-After"]["required"]
    for path, method in (("/api/v1/documents/{id}", "get"), ("/metrics", "get")):
        assert "WWW-Authenticate" in paths[path][method]["responses"]["401"]["headers"], path
    # a legacy system's callback can be refused as a receipt (422) or for a token set wrong (503)
    assert {"413", "422", "503"} <= set(paths["/api/v1/callbacks/{adapter}"]["post"]["responses"])


def test_fields_every_answer_carries_are_required_so_a_client_need_not_guess(spec):
    schemas = spec["components"]["schemas"]
    for name in ("DocumentOut", "RecipientStatus", "ReceiptOut", "DocumentList", "BlobOut"):
        assert set(schemas[name]["required"]) == set(schemas[name]["properties"]), name
    # null where there is no value, said by the type; enumerations as the envelope carries them
    assert {"type": "null"} in schemas["DocumentOut"]["properties"]["title"]["anyOf"]
    assert schemas["RecipientStatus"]["properties"]["status"]["enum"] == list(RECIPIENT_STATUSES)
    assert "特提" in schemas["DocumentOut"]["properties"]["urgency"]["enum"]


def _document_in(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec["components"]["schemas"]["DocumentIn"], "components": spec["components"]}


def test_every_value_the_documents_enumerations_list_is_accepted(sqlite_api, spec):
    props = spec["components"]["schemas"]["DocumentIn"]["properties"]
    assert set(props["doc_type"]["enum"]) == set(rules.DOC_TYPES)
    api = sqlite_api
    for field in ("doc_type", "classification", "urgency"):
        for value in props[field]["enum"]:
            extra = {"signer": "王某某", "classification_period": "长期"}  # 请示 and 报告; classified
            r = api.post("/api/v1/documents", json=api.document(**{field: value}, **extra))
            assert r.status_code == 202, (field, value, r.get_json())
        outside = api.document(**{field: "其他"})
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(outside, _document_in(spec))
        assert api.post("/api/v1/documents", json=outside).status_code == 422, field


def test_values_outside_the_patterns_are_refused_by_both(sqlite_api, spec):
    api = sqlite_api
    for field, value in (("sender_unit", "11522300GDR9YB955O"), ("doc_number", "州政发[2026]12号"),
                         ("doc_number", "州政发〔2026〕012号"), ("doc_number", "州政发〔1900〕1号"),
                         ("written_date", "2026年011月20日"), ("written_date", "20261120"),
                         ("recipients", [{"unit": COUNTY_A, "copy_no": "12345"}])):
        doc = api.document(**{field: value})
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, _document_in(spec))
        assert api.post("/api/v1/documents", json=doc).status_code == 422, (field, value)


def _patterns() -> tuple[str, str]:
    import systems.documents.api  # noqa: F401 - its routes, and so its operations, are registered
    from gateway.api.spec import document

    props = document()["components"]["schemas"]["DocumentIn"]["properties"]
    return props["doc_number"]["pattern"], props["written_date"]["pattern"]


_DOC_NUMBER, _WRITTEN_DATE = _patterns()


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(number=st.from_regex(_DOC_NUMBER, fullmatch=True), date=st.from_regex(_WRITTEN_DATE, fullmatch=True))
def test_a_doc_number_or_date_the_patterns_admit_the_rules_admit(number, date):
    """What a client generated from the document may send, the server takes (a date the
    calendar lacks, such as 2月30日, is beyond a pattern and refused with a reason)."""
    assert rules.doc_number_problem(number) is None, number
    _, problem = rules.written_date(date)
    assert problem is None or "not a calendar date" in problem, (date, problem)


def test_a_location_leads_back_where_the_gateway_is_mounted_under_a_prefix(sqlite_api):
    api = sqlite_api
    blob = api.client.post("/api/v1/blobs", base_url="http://localhost/gw", headers=api.headers, data=b"x",
                           content_type="application/octet-stream")
    assert blob.status_code == 201 and blob.headers["Location"].startswith("/gw/api/v1/blobs/")
    sent = api.client.post("/api/v1/documents", base_url="http://localhost/gw", headers=api.headers,
                           json=api.document())
    assert sent.status_code == 202 and sent.headers["Location"].startswith("/gw/api/v1/documents/")


def test_operation_ids_are_names_a_generated_client_can_use(spec):
    """A generator (openapi-python-client, openapi-generator) makes a function of each
    operationId: they are snake_case identifiers that say what the call does, not the path
    spelt out (get_api_v1_webhooks_public-key was no identifier at all)."""
    ids = {(method, path): op["operationId"] for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*", i) for i in ids.values()), ids
    assert {ids[("post", "/api/v1/blobs")], ids[("get", "/api/v1/blobs/{sha256}")],
            ids[("post", "/api/v1/documents")], ids[("get", "/api/v1/documents")],
            ids[("get", "/api/v1/documents/{id}")], ids[("post", "/api/v1/documents/{id}/recall")],
            ids[("get", "/api/v1/webhooks/public-key")]} == {
        "upload_blob", "get_blob", "send_document", "list_documents", "get_document", "recall_document",
        "get_webhook_public_key"}


def test_every_call_that_reads_the_database_documents_its_503_with_retry_after(spec):
    """A node whose database cannot be reached answers 503 with Retry-After
    (tests/test_crash_postgres.py shows it): a generated client must know that answer."""
    for path, ops in spec["paths"].items():
        if not path.startswith(("/api/v1/documents", "/api/v1/blobs")):
            continue
        for method, op in ops.items():
            answer = op["responses"].get("503")
            assert answer is not None, (method, path)
            assert "Retry-After" in answer["headers"], (method, path)


def test_the_webhook_posts_are_in_the_document_and_a_real_post_keeps_to_it(sqlite_api, spec):
    """OpenAPI 3.1 ``webhooks``: the body a receiver gets (its schema from events.WebhookEvent,
    every field required), the signature headers and the answers the gateway takes; a post
    the worker sends over real HTTP has each required header and a body the schema admits."""
    from tests.test_webhooks_and_ops import Receiver

    hook = spec["webhooks"]["documentStatus"]["post"]
    assert hook["summary"] and hook["operationId"] == "on_document_status"
    assert set(hook["responses"]) == {"2XX", "default"}
    headers = {p["name"]: p for p in hook["parameters"]}
    assert set(headers) == {"Gateway-Timestamp", "Gateway-Node", "Gateway-Signature"}
    assert all(p["in"] == "header" and p["required"] for p in headers.values())
    schema = hook["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/WebhookEvent"}
    event = spec["components"]["schemas"]["WebhookEvent"]
    assert set(event["required"]) == set(event["properties"])
    assert event["properties"]["status"]["enum"] == list(RECIPIENT_STATUSES)
    receiver = Receiver()
    try:
        api = Api(sqlite_api.node, webhook_url=receiver.url)
        api.post("/api/v1/documents", json=api.document())
        Worker(api.node).drain()
        assert receiver.posts, "no webhook was posted"
        for sent, body in receiver.posts:
            for name, p in headers.items():
                assert name in sent, name
                jsonschema.validate(sent[name], p["schema"])
            posted = json.loads(body)
            jsonschema.validate(posted, {**schema, "components": spec["components"]},
                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            assert set(posted) == set(event["properties"])
    finally:
        receiver.server.shutdown()
