"""The application factory. ``gunicorn 'gateway.app:create_app()'`` reads the node's
configuration from ``$GATEWAY_CONFIG`` (a TOML file); without it the embedded default runs."""
from __future__ import annotations

import logging
import os

from flask import Flask
from gunicorn.errors import AppImportError

from gateway import config as config_mod
from gateway.api import auth, blobs, ops, problems
from gateway.config import Config, ConfigError
from gateway.node import Node

log = logging.getLogger("gateway.app")


def record_config(node: Node, process: str) -> None:
    """:meth:`Node.record_config`; a database that cannot take it yet (not migrated, not
    reachable) does not stop the start, and the log says so: the API answers 503 while the
    database is away (and, not migrated, /readyz says not ready). The configuration is then
    recorded at the process's next start, not when the database comes back."""
    try:
        node.record_config(process)
    except Exception as exc:  # noqa: BLE001
        orig = getattr(exc, "orig", None) or exc
        log.error("the configuration in force could not be recorded in the audit log (config.change): %s: %s; "
                  "it is recorded when this process next starts with the database reachable and migrated",
                  type(orig).__name__, " ".join(str(orig).split())[:300])


def create_app(cfg: Config | str | None = None, node: Node | None = None) -> Flask:
    if node is None:
        try:
            if cfg is None or isinstance(cfg, str):
                cfg = config_mod.load(cfg or os.environ.get("GATEWAY_CONFIG"))
            node = Node(cfg)
            node.check_adapters()
        except ConfigError as exc:
            # gunicorn prints this message alone and stops (no traceback, no worker restarts)
            raise AppImportError(f"gateway: the configuration is not valid:\n{exc}") from None
        record_config(node, "api")
    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = node.config.api.max_json_bytes
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["gateway.node"] = node
    app.extensions["gateway.on_problem"] = auth.Refusals(node.db)
    problems.install(app)
    app.register_blueprint(ops.bp)
    app.register_blueprint(blobs.bp)
    from systems.documents.api import bp as documents_bp

    app.register_blueprint(documents_bp)
    from gateway.federation.api import bp as federation_bp
    from gateway.federation.directory import bp as directory_bp

    app.register_blueprint(federation_bp)
    app.register_blueprint(directory_bp)
    return app
