"""A gateway node on a fresh database (SQLite and PostgreSQL via ``database_url``), and a
recording adapter for tests of the path *inside* the gateway (worker, retries, priorities).
The edges — SOAP, SFTP, the exchange box — are tested against real peers elsewhere."""
from __future__ import annotations

import threading
from typing import Any
from collections.abc import Callable

import pytest

from adapters.base import (
    Adapter,
    Delivery,
    DeliveryResult,
    Health,
    PermanentError,
    PolledItem,
    RetryableError,
    register,
)
from gateway import config as config_mod
from gateway import migrate
from gateway.api.auth import create_key
from gateway.app import create_app
from gateway.node import Node

PREFECTURE = "11522300GDR9YB9550"
COUNTY_A = "1152230107CTPD8U2P"
CITY_B = "11522302GRALUMYP76"
EMERGENCY = "11522300QNNHM83X1E"
COUNTY_C = "11522323C4H14TRW96"


@register("recording")
class RecordingAdapter(Adapter):
    """Records deliveries in memory; scripted failures; receipts fed by the test."""

    instances: dict[str, RecordingAdapter] = {}

    def __init__(self, name, config, context):  # type: ignore[no-untyped-def]
        super().__init__(name, config, context)
        self.delivered: list[Delivery] = []
        self.effects: dict[str, int] = {}
        self.failures: list[Exception] = []
        self.pending_items: list[PolledItem] = []
        self.acked: list[str] = []
        self.recalled: list[str | None] = []  # the ref each recall was given
        self.hook: Callable[[Delivery], None] | None = None
        self.lock = threading.Lock()
        RecordingAdapter.instances[name] = self

    def deliver(self, delivery: Delivery) -> DeliveryResult:
        if self.hook:
            self.hook(delivery)
        with self.lock:
            if self.failures:
                raise self.failures.pop(0)
            self.delivered.append(delivery)
            self.effects[delivery.remote_ref] = self.effects.get(delivery.remote_ref, 0) + 1
        return DeliveryResult(remote_id=f"R-{delivery.remote_ref[:8]}")

    def poll(self):  # type: ignore[no-untyped-def]
        items, self.pending_items = self.pending_items, []
        for it in items:
            it._ack = (lambda k=it.key: self.acked.append(k))
        return items

    def recall(self, message_id: str, unit: str, ref: str | None = None) -> bool:
        self.recalled.append(ref)
        return self.config.get("recall_ok", True)

    def check(self) -> Health:
        return Health(True, "in memory")


__all__ = ["RecordingAdapter", "PermanentError", "RetryableError"]


def node_config(tmp_path, database_url: str, **extra: Any) -> config_mod.Config:
    raw: dict[str, Any] = {
        "node": {"id": "prefecture", "name": "州人民政府办公室", "data_dir": str(tmp_path / "var"),
                 "units": [PREFECTURE, EMERGENCY]},
        "database": {"url": database_url},
        "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": 30,
                   "retry": {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.05}},
        "adapters": {"rec": {"type": "recording"}, "rec2": {"type": "recording"}},
        "routes": [{"units": [CITY_B], "adapter": "rec2"},
                   {"units": [COUNTY_A, EMERGENCY, PREFECTURE], "adapter": "rec"}],
    }
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_mod.from_mapping(raw, source="test")


@pytest.fixture
def gw_node(tmp_path, database_url):  # type: ignore[no-untyped-def]
    RecordingAdapter.instances.clear()
    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield n
    n.close()


class Api:
    """The Flask test client with a key of the given scopes."""

    def __init__(self, node: Node, scopes=("*",), clearance: str = "绝密", webhook_url: str | None = None,
                 units=()) -> None:  # type: ignore[no-untyped-def]
        self.node = node
        self.app = create_app(node=node)
        self.client = self.app.test_client()
        self.key = create_key(node.db, name="测试系统", scopes=list(scopes), clearance=clearance,
                              webhook_url=webhook_url, units=list(units))
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, **kw):  # type: ignore[no-untyped-def]
        return self.client.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def get(self, path: str, **kw):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def upload(self, data: bytes) -> str:
        r = self.post("/api/v1/blobs", data=data, content_type="application/octet-stream")
        assert r.status_code == 201, r.get_json()
        return r.get_json()["sha256"]

    def document(self, recipients=(COUNTY_A,), **over):  # type: ignore[no-untyped-def]
        sha = self.upload("关于做好冬季值班工作的通知 正文".encode())
        doc = {"sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
               "doc_number": "州政办发〔2026〕37号", "title": "关于做好2026年冬季值班工作的通知",
               "urgency": "加急", "written_date": "2026年11月20日",
               "recipients": [{"unit": u} for u in recipients],
               "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}}
        doc.update(over)
        return doc


@pytest.fixture
def api(gw_node):  # type: ignore[no-untyped-def]
    return Api(gw_node)


@pytest.fixture
def sqlite_api(tmp_path):  # type: ignore[no-untyped-def]
    """An Api on a fresh SQLite node only (for checks that need no second database)."""
    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield Api(n)
    n.close()
