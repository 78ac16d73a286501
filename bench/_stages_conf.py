"""gunicorn settings for bench/stages.py: the production settings file ($STAGES_BASE_CONF,
config/gunicorn.conf.py), plus timers put into each worker after its own start-up
(bench/_stages_hook.py)."""
import os
import runpy
import sys

_base = runpy.run_path(os.environ["STAGES_BASE_CONF"])
globals().update({k: v for k, v in _base.items() if not k.startswith("_")})
_base_post_worker_init = _base.get("post_worker_init")


def post_worker_init(worker):  # noqa: ANN001, ANN201
    if _base_post_worker_init is not None:
        _base_post_worker_init(worker)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _stages_hook

    _stages_hook.install(worker)
