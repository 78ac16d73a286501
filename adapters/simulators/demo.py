"""``gateway demo``: one document from the prefecture office to recipients behind each of the
three legacy systems, through the real HTTP API; every clerk signs for it; a table shows each
recipient's 签收. Exit 0 only if every recipient signed for it."""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import requests
from werkzeug.serving import WSGIRequestHandler, make_server

from adapters.simulators import embedded
from gateway import config as config_mod
from gateway import migrate
from gateway.api.auth import create_key
from gateway.app import create_app
from gateway.node import Node
from gateway.runtime import Runtime

RECIPIENTS = [
    (embedded.COUNTY_A, "主送", "SOAP 公文交换服务"),
    (embedded.CITY_B, "主送", "SFTP 县级交换目录"),
    (embedded.EMERGENCY, "抄送", "XML 交换箱"),
]

STATUS_ZH = {"queued": "排队中", "delivered": "已送达", "signed": "已签收", "returned": "已退回",
             "recalled": "已撤回", "failed": "失败"}


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: object, **kwargs: object) -> None:  # keep the table readable
        pass


def _pad(text: str, width: int) -> str:
    """Pad to a display width: CJK characters take two columns in a terminal."""
    shown = sum(2 if ord(c) > 0x2E80 else 1 for c in text)
    return text + " " * max(1, width - shown)


def run(timeout: float = 60.0, echo: Callable[[str], None] = print) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-demo.") as tmp:
        api_port = embedded.free_port()
        base = config_mod.embedded_default()
        base.node.data_dir = str(Path(tmp) / "var")
        sims = embedded.plan(base, api_port=api_port, sign_delay=1.0)
        cfg = sims.config
        migrate.upgrade(cfg.database_url())
        node = Node(cfg)
        server = make_server("127.0.0.1", api_port, create_app(node=node), threaded=True,
                             request_handler=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="demo-api", daemon=True).start()
        sims.start()
        runtime = Runtime(node).start()
        try:
            return _scenario(node, f"http://127.0.0.1:{api_port}", timeout, echo)
        finally:
            runtime.stop()
            server.shutdown()
            sims.stop()
            node.close()


def _scenario(node: Node, base: str, timeout: float, echo: Callable[[str], None]) -> int:
    key = create_key(node.db, name="演示 OA 系统", scopes=["*"], clearance="机密", actor="gateway demo")
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    body = "关于做好2026年冬季值班和突发事件信息报送工作的通知\n各县市人民政府：……".encode()
    r = http.post(f"{base}/api/v1/blobs", data=body, headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    sha = r.json()["sha256"]
    doc: dict[str, Any] = {
        "sender_unit": embedded.PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
        "doc_number": "州政办发〔2026〕37号", "title": "关于做好2026年冬季值班和突发事件信息报送工作的通知",
        "urgency": "加急", "signer": "王某某", "written_date": "2026年11月20日",
        "recipients": [{"unit": u, "name": embedded.UNITS[u], "copy_type": t} for u, t, _ in RECIPIENTS],
        "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"},
    }
    t0 = time.monotonic()
    r = http.post(f"{base}/api/v1/documents", json=doc, headers={"Idempotency-Key": "demo-1"})
    if r.status_code != 202:
        echo(f"发文失败 (send failed): HTTP {r.status_code} {r.text}")
        return 1
    doc_id = r.json()["id"]
    echo(f"已受理 (accepted) {doc['doc_number']} id={doc_id}")
    got = r.json()
    while time.monotonic() - t0 < timeout:
        got = http.get(f"{base}/api/v1/documents/{doc_id}").json()
        if all(x["status"] in ("signed", "returned", "failed") for x in got["recipients"]):
            break
        time.sleep(0.5)
    via = {u: how for u, _, how in RECIPIENTS}
    echo("")
    cols = (("收文单位", 20), ("统一社会信用代码", 20), ("通道", 20), ("状态", 8), ("签收人", 8), ("回执编号", 0))
    echo("".join(_pad(t, w) for t, w in cols))
    ok = True
    for x in got["recipients"]:
        ok = ok and x["status"] == "signed"
        row = (x["name"] or "", x["unit"], via.get(x["unit"], ""), STATUS_ZH.get(x["status"], x["status"]),
               x["signer"] or "-", x["receipt_no"] or x.get("last_error") or "-")
        echo("".join(_pad(v, w) for v, (_, w) in zip(row, cols)))
    echo("")
    echo(f"{'全部签收' if ok else '未全部签收'} ({'every recipient signed for it' if ok else 'not every recipient signed'}) "
         f"in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1
