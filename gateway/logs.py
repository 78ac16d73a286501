"""Where the node's own log lines go: standard error, one line each, with the time, the
process, the level and the logger's name (``gateway.scheduler``, ``adapters.sftp``, …), in
the format of gunicorn's error log, so that one ``journalctl -u`` or one file holds both.

Without this, Python prints only WARNING and above, without time or logger name, and the
INFO lines the operator documentation points to (a job started and ended, a directory
stored, a ferry file written or imported) go nowhere. Used by the long-running processes:
``gateway worker``, ``gateway serve`` and gunicorn (``config/gunicorn.conf.py``).
Other libraries (paramiko, zeep, urllib3) keep WARNING: their INFO is one line per connection.
"""
from __future__ import annotations

import logging
import sys

from gateway.api.problems import shown
from gateway.db import outage, outage_text

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S %z"
OURS = ("gateway", "adapters", "systems")


class _OneLine(logging.Formatter):
    """The message's control characters as escapes (a file name from a legacy system with a
    line break or a terminal escape in it cannot forge a line); a traceback stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)


class _OutageOneLine(logging.Filter):
    """A record with a traceback of a database outage (a library's own, such as SQLAlchemy's
    pool failing to reset a connection the server closed): one line with the error instead.
    While the database restarts, every process would otherwise print dozens of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and outage(exc) is not None:
            record.msg, record.args = f"{record.getMessage()}: {outage_text(exc)}", ()
            record.exc_info, record.exc_text = None, None
        return True


def setup(level: int = logging.INFO) -> None:
    """Log the gateway's own INFO and up, and everyone's WARNING and up, to stderr. Does
    nothing to a logging set up already (a handler on the root logger)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(FORMAT, DATEFMT))
    handler.addFilter(_OutageOneLine())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OURS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
