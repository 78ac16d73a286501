"""Adapters: the cut-off between the gateway's one message path and legacy protocols.

See :mod:`adapters.base` for the contract. Importing this package registers the built-in
adapter types (``soap``, ``sftp``, ``xml-exchange``).
"""
from adapters.base import (  # noqa: F401
    Adapter,
    AdapterContext,
    Delivery,
    DeliveryResult,
    Health,
    PermanentError,
    PolledItem,
    RetryableError,
    create,
    register,
    registered_types,
)


def load_builtin() -> None:
    """Import the built-in adapter modules so they register themselves."""
    import importlib

    for mod in ("adapters.soap", "adapters.sftp", "adapters.xmlexchange"):
        importlib.import_module(mod)
