"""The baseline of bench/accept_rate.py: a bare Flask app under the same gunicorn settings
(config/gunicorn.conf.py) that only parses the JSON body and answers 202.

    gunicorn -c config/gunicorn.conf.py --pythonpath bench '_bare_app:create_app()'
"""
from __future__ import annotations

from flask import Flask, Response, request


def create_app() -> Flask:
    app = Flask("bare")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024  # the gateway's api.max_json_bytes default

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status": "ok"}', mimetype="application/json")

    @app.post("/api/v1/documents")
    def documents() -> Response:
        doc = request.get_json()
        return Response('{"accepted": %d}' % len(doc["recipients"]), status=202, mimetype="application/json")

    return app
