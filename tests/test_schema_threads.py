"""The XML schemas are built once per process; lxml corrupts one built by several threads at
once (seen as 500s on every request of a freshly started node). Eight threads race to build
them in a fresh interpreter, several times."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RACE = """
import threading
from gateway import envelope, payloads
errors = []
def build():
    try:
        payloads._schema("payload-documents.xsd")
        envelope._schema()
    except Exception as exc:  # the failure this test looks for
        errors.append(repr(exc))
threads = [threading.Thread(target=build) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(errors), errors[:1])
"""


def test_schemas_built_by_racing_threads_are_sound() -> None:
    for _ in range(6):
        r = subprocess.run([sys.executable, "-c", RACE], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith("0 "), r.stdout
