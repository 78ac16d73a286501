"""The federation's scheduled jobs (``[schedules.push]`` … and ``gateway sync push``).
The scheduler imports this module; each job takes the node and returns a detail dict."""
from __future__ import annotations

import importlib

from gateway.federation import batch, reconcile
from gateway.scheduler import register

register("push", batch.push, "send the items queued for batch peers (links up only part of the time)")
register("pull", batch.pull, "fetch and apply the items batch peers have queued for this node")
register("reconcile", reconcile.run, "compare forwarded copies with each peer and repair the gaps")

try:  # the signed directory (its own module registers the 'directory' job)
    importlib.import_module("gateway.federation.directory")
except ModuleNotFoundError as exc:  # pragma: no cover - only while it is being built
    if exc.name != "gateway.federation.directory":
        raise
