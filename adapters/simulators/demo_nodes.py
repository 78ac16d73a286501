"""``gateway demo`` across nodes: a prefecture (州) node and two county (县) nodes, each a
separate process on loopback with its own database, key pair and document exchange service.
The prefecture sends a document to units at both counties (and one of its own); county A
sends one to county B, relayed by the prefecture because the two counties have no direct
link. Each recipient's 签收 comes back to the sender. Exit 0 only if every recipient signed."""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from adapters.simulators.cluster import (
    CITY_B, COUNTY_A, EMERGENCY, LAYOUT, PREFECTURE, UNIT_NAMES, Cluster, NodeProc,
)
from adapters.simulators.demo import STATUS_ZH, _pad

ROUTE_ZH = {"county-a": "转发至甲县节点", "county-b": "转发至乙市节点", "prefecture": "经州节点中转",
            "docexchange": "本节点公文交换"}


def _send(node: NodeProc, sender: str, number: str, title: str, recipients: list[str], key: str) -> str:
    http = node.session()
    body = f"{title}\n……".encode()
    r = http.post(f"{node.url}/api/v1/blobs", data=body, headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    doc: dict[str, Any] = {
        "sender_unit": sender, "issuer": UNIT_NAMES[sender], "doc_type": "通知", "doc_number": number,
        "title": title, "urgency": "加急", "written_date": "2026年11月26日",
        "recipients": [{"unit": u, "name": UNIT_NAMES[u]} for u in recipients],
        "body": {"sha256": r.json()["sha256"], "name": "正文.ofd", "media_type": "application/ofd"},
    }
    r = http.post(f"{node.url}/api/v1/documents", json=doc, headers={"Idempotency-Key": key})
    if r.status_code != 202:
        raise RuntimeError(f"{node.id}: 发文失败 (send failed): HTTP {r.status_code} {r.text}")
    return r.json()["id"]


def run(timeout: float = 90.0, echo: Callable[[str], None] = print) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-nodes.") as tmp:
        echo("启动三个节点 (starting three nodes: prefecture, county-a, county-b) …")
        cluster = Cluster(Path(tmp), sign_delay=1.0)
        try:
            cluster.start()
            pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
            for n in cluster.nodes.values():
                echo(f"  {n.id:<11} {n.url}  ({', '.join(UNIT_NAMES[u] for u in LAYOUT[n.id][1])})")
            sent = [
                (pref, _send(pref, PREFECTURE, "州政办发〔2026〕52号", "关于做好冬季森林防火工作的通知",
                             [COUNTY_A, CITY_B, EMERGENCY], "demo-nodes-1")),
                (a, _send(a, COUNTY_A, "甲政办发〔2026〕9号", "关于协助做好跨县道路抢修工作的函", [CITY_B],
                            "demo-nodes-2")),
            ]
            t0 = time.monotonic()
            results: list[tuple[NodeProc, dict]] = []
            while True:
                results = [(n, n.session().get(f"{n.url}/api/v1/documents/{mid}").json()) for n, mid in sent]
                done = all(x["status"] in ("signed", "returned", "failed") for _, d in results
                           for x in d["recipients"])
                if done or time.monotonic() - t0 > timeout:
                    break
                time.sleep(0.5)
            ok = True
            cols = (("收文单位", 22), ("路由", 18), ("状态", 8), ("签收人", 26), ("回执编号", 0))
            for node, doc in results:
                echo("")
                echo(f"{node.id} 发文 {doc['doc_number']}《{doc['title']}》")
                echo("".join(_pad(t, w) for t, w in cols))
                for x in doc["recipients"]:
                    ok = ok and x["status"] == "signed"
                    row = (x["name"] or x["unit"], ROUTE_ZH.get(x["route"], x["route"]),
                           STATUS_ZH.get(x["status"], x["status"]), x["signer"] or "-",
                           x["receipt_no"] or x.get("last_error") or "-")
                    echo("".join(_pad(v, w) for v, (_, w) in zip(row, cols)))
            echo("")
            echo(f"{'全部签收' if ok else '未全部签收'} ({'every recipient at every node signed' if ok else 'not every recipient signed'}) "
                 f"in {time.monotonic() - t0:.1f} s")
            return 0 if ok else 1
        except (RuntimeError, OSError, requests.RequestException) as exc:
            echo(f"演示失败 (demo failed): {exc}")
            return 1
        finally:
            cluster.close()
