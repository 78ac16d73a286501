"""``gateway serve``: gunicorn (one gthread worker: gateway.gunicorn_worker) hosting the API, with
the delivery worker and the collector started inside that worker process, so one node needs one
command."""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

from gunicorn.app.base import BaseApplication


class _Gunicorn(BaseApplication):
    def __init__(self, app_factory: Callable[[], Any], options: dict[str, Any]) -> None:
        self.app_factory = app_factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for k, v in self.options.items():
            if k in self.cfg.settings:  # type: ignore[union-attr] # (older gunicorns lack some settings)
                self.cfg.set(k, v)  # type: ignore[union-attr]

    def load(self) -> Any:
        return self.app_factory()


#: gunicorn's default, but the request line without its query string (a callback's ?token=)
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s"'


def run(app_factory: Callable[[], Any], *, bind: str, threads: int, post_worker_init: Callable[[Any], None],
        worker_exit: Callable[[Any, Any], None]) -> None:
    _Gunicorn(app_factory, {
        "bind": bind, "workers": 1, "worker_class": "gateway.gunicorn_worker.GatewayThreadWorker", "threads": threads,
        "logger_class": "gateway.gunicorn_worker.GatewayLogger",
        "post_worker_init": post_worker_init, "worker_exit": worker_exit,
        "accesslog": "-", "errorlog": "-", "timeout": 120, "graceful_timeout": 20,
        "access_log_format": ACCESS_LOG_FORMAT,
        "preload_app": False,
        # no control socket: several nodes on one host would take ~/.gunicorn/gunicorn.ctl from each other
        "control_socket_disable": True,
    }).run()
