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


#: built-in adapter types and the modules that register them (imported on first use)
BUILTIN = {"soap": "adapters.soap", "sftp": "adapters.sftp", "xml-exchange": "adapters.xmlexchange"}


def load_builtin(type_name: str | None = None) -> None:
    """Import built-in adapter modules so they register themselves: one type, or all."""
    import importlib

    for t, mod in BUILTIN.items():
        if type_name is None or t == type_name:
            importlib.import_module(mod)
