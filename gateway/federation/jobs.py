"""The federation's scheduled jobs (``[schedules.push]`` … and ``gateway sync push``).
The scheduler imports this module; each job takes the node and returns a detail dict."""
from __future__ import annotations

import importlib

from gateway.federation import batch, reconcile
from gateway.scheduler import register

register("push", batch.push, "send the items queued for batch peers (links up only part of the time)")
register("pull", batch.pull, "fetch and apply the items batch peers have queued for this node")
register("reconcile", reconcile.run, "compare forwarded copies with each peer and repair the gaps")

# modules that register their own jobs: the signed directory, the ferry link
for _module in ("gateway.federation.directory", "gateway.federation.ferry"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as exc:  # pragma: no cover - only while one is being built
        if exc.name != _module:
            raise
