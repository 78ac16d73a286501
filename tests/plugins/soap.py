"""Fixtures for the SOAP peer: the simulated document exchange service (公文交换服务) on a real
port, and SOAP adapters pointed at it. No mocks: zeep talks HTTP to a threaded WSGI server."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import AdapterContext
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from adapters.soap import SoapAdapter
from gateway.blobs import BlobStore
from gateway.envelope import Attachment, Envelope

DOCEXCHANGE_WSDL = "schemas/legacy/docexchange.wsdl"
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "envelope-document.xml"
BODY = "正文：请各单位认真做好冬季值班和突发事件信息报送工作。\n".encode() * 40


class DictState:
    """An in-memory :class:`adapters.base.StateStore` (the gateway's is durable)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.data.get(key, default)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value

    def advance(self, key: str, value: int) -> None:
        if value > int(self.get(key) or "0"):
            self.set(key, str(value))


@pytest.fixture
def soap_service_factory() -> Iterator[Callable[..., SoapServiceServer]]:
    """Start simulated services (``username``/``password`` turn WS-Security on); all are
    closed at teardown."""
    servers: list[SoapServiceServer] = []

    def start(state: DocExchangeState | None = None, **kwargs: Any) -> SoapServiceServer:
        server = SoapServiceServer(state, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def soap_service(soap_service_factory: Callable[..., SoapServiceServer]) -> SoapServiceServer:
    """The simulated document exchange service on a free 127.0.0.1 port (``.url``, ``.state``)."""
    return soap_service_factory()


@pytest.fixture
def soap_blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture
def document(soap_blobs: BlobStore) -> Envelope:
    """The sample document envelope, its body (正文) really in the blob store."""
    env = Envelope.from_xml(SAMPLE.read_bytes())
    sha, size = soap_blobs.put_bytes(BODY)
    env.attachments = [Attachment("body", "正文.ofd", size, sha, "application/ofd")]
    return env


@pytest.fixture
def soap_state() -> DictState:
    """The adapter state store shared by every adapter a test makes (survives "restarts")."""
    return DictState()


@pytest.fixture
def make_soap_adapter(
    soap_blobs: BlobStore, soap_state: DictState, tmp_path: Path
) -> Iterator[Callable[..., SoapAdapter]]:
    """``make_soap_adapter(service, secrets={...}, **config)``: a SoapAdapter named
    ``docexchange`` pointing at ``service`` (unless ``address``/``wsdl`` say otherwise)."""
    adapters: list[SoapAdapter] = []

    def make(service: SoapServiceServer | None = None, *, name: str = "docexchange",
             secrets: dict[str, str] | None = None, state: DictState | None = None,
             **config: Any) -> SoapAdapter:
        cfg: dict[str, Any] = {"type": "soap", "wsdl": DOCEXCHANGE_WSDL, "timeout": 5}
        if service is not None:
            cfg["address"] = service.url
        cfg.update(config)
        cfg = {k: v for k, v in cfg.items() if v is not None}  # None = leave the key out
        context = AdapterContext(
            blobs=soap_blobs, state=state if state is not None else soap_state,
            base_dir=tmp_path, secrets=(secrets or {}).get,
        )
        adapter = SoapAdapter(name, cfg, context)
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        adapter.close()
