"""E-government intranet integration gateway (电子政务内网集成网关)."""
from pathlib import Path

__version__ = "0.1.0"

#: The repository's top-level folders that are data, not Python packages.
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
