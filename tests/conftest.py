"""Shared test set-up. Fixtures live in ``tests/plugins/*.py`` (one module per real peer:
PostgreSQL, OpenSSH, the SOAP service ...) and are all loaded here."""
from pathlib import Path

pytest_plugins = sorted(
    f"tests.plugins.{p.stem}" for p in (Path(__file__).parent / "plugins").glob("*.py") if p.stem != "__init__"
)
