"""Fixtures for the exchange box (交换箱): the simulated box over real HTTP, and a small real
HTTP endpoint standing in for the gateway's callback route."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from adapters.simulators.exchange_box import ExchangeBox, ExchangeBoxServer

#: handler(body, content_type) -> (status, body, content_type)
Handler = Callable[[bytes, str], tuple[int, bytes, str]]


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class HttpEndpoint:
    """A tiny real HTTP server: every request goes to ``handler``; ``requests`` records
    (method, path, content type, body) of each one."""

    handler: Handler = lambda body, ct: (200, b"", "text/plain")
    requests: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    _server: BaseWSGIServer | None = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        body = req.get_data()
        ct = req.headers.get("Content-Type", "")
        self.requests.append((req.method, req.path, ct, body))
        status, out, out_ct = self.handler(body, ct)
        return Response(out, status=status, content_type=out_ct)(environ, start_response)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> HttpEndpoint:
        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=_Quiet)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def exchange_box() -> Iterator[ExchangeBoxServer]:
    """A simulated exchange box on a free local port (fast callback retries)."""
    server = ExchangeBoxServer(ExchangeBox(callback_backoff=0.05)).start()
    yield server
    server.stop()


@pytest.fixture
def http_endpoint() -> Iterator[HttpEndpoint]:
    """A real HTTP endpoint whose answers the test decides (set ``.handler``)."""
    ep = HttpEndpoint().start()
    yield ep
    ep.stop()
