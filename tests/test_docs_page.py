"""The browsable API docs in a real browser: the page loads its assets from this node (no
CDN on the intranet) and renders every documents operation from the generated OpenAPI."""
from __future__ import annotations

import threading

from werkzeug.serving import make_server

from gateway.app import create_app


def test_docs_page_renders_the_operations_offline(browser, tmp_path):
    from gateway import config

    server = make_server("127.0.0.1", 0, create_app(config.from_mapping({"node": {"data_dir": str(tmp_path)}})),
                         threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    page = browser.new_page()
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(base) or req.url.startswith("data:")
            else outside.append(req.url))
    try:
        page.goto(f"{base}/api/v1/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=15000)
        assert "接口文档" in page.title()
        paths = {el.get_attribute("data-path") for el in page.query_selector_all(".opblock-summary-path")}
        assert {"/api/v1/documents", "/api/v1/documents/{id}", "/api/v1/documents/{id}/recall",
                "/api/v1/blobs"} <= paths
        text = page.inner_text("body")
        assert "发文" in text and "公文 (documents)" in text
        assert text.index("发送公文分三步") < text.index("/api/v1/documents")  # the Chinese guide comes first
        ops = {el.get_attribute("data-path") for el in page.query_selector_all(".opblock-summary-path")}
        assert {"/healthz", "/readyz", "/metrics", "/api/v1/webhooks/public-key"} <= ops
        # the posts the gateway makes to a caller (OpenAPI 3.1 webhooks), under their own heading
        page.wait_for_selector("text=回调 Webhooks", timeout=15000)
        assert "状态回调 (a copy's status changed)" in page.inner_text("body")
        # Swagger UI's own buttons and headings carry a Chinese label first
        page.wait_for_selector("text=授权 Authorize", timeout=15000)
        page.click(".opblock-summary-path[data-path='/api/v1/documents'] >> xpath=ancestor::*[contains(@class,'opblock-summary')]")
        page.wait_for_selector("text=试用 Try it out", timeout=15000)
        body = page.inner_text("body")
        assert "参数 Parameters" in body and "响应 Responses" in body
        assert "选择应答格式（Accept 请求头） Controls Accept header." in body  # a sentence over several text nodes
        page.click("text=试用 Try it out")
        page.wait_for_selector("text=执行 Execute", timeout=15000)
        assert "取消 Cancel" in page.inner_text("body")
        page.screenshot(path=str(tmp_path / "docs.png"))
    finally:
        page.close()
        server.shutdown()
    assert outside == [], f"the page fetched from outside the node: {outside}"
