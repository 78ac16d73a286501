"""What one accept costs, counted in CPU instructions instead of timed: a figure that does not
move with the machine's load, for telling whether a change to the accept path made it cheaper
(bench/accept_rate.py's ratio moves by ±0.05 from one run to the next on the shared 2-core
machine; a change worth 3% is invisible there).

Both apps are run in one process under valgrind's callgrind, through Flask's test client (the
WSGI apps gunicorn runs, without HTTP, gunicorn or a load generator): POST /api/v1/documents of
the gateway (SQLite node as in accept_rate, the same 20 KB document with one recipient and its
attachments, every accept committed and fsynced) and the bare Flask endpoint of
bench/_bare_app.py. Then the steps of an accept one by one, on the same document: the request
model (pydantic, against ``json.loads`` of the same bytes), the envelope (its payload written
as text), its XML, and ``pipeline.accept`` (which writes the XML again, then the rows, the
audit entry and the commit). Each segment is
delimited by callgrind dumps (``--dump-before``), so its count is its own, the threads the node
runs in the background included. Prints one line; instruction counts are millions per request.

Not a target: the issue's target is accept_rate's throughput ratio. This in-process ratio is
lower than that one, since gunicorn's and the load generator's work, the same for both apps,
is not in it. Needs ``valgrind`` (Debian package); takes about two minutes.

    .venv/bin/python bench/accept_cost.py [--count N] [--no-attachments]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

#: the marker between segments: a C function nothing on the measured path calls
MARK_FUNCTION = "os_getppid"
WRITES = ("gateway request", "accept")
SEGMENTS = ("gateway request", "bare request", "request model", "json.loads", "to_envelope", "to_xml", "accept")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="requests (and calls of each step) counted (default 200)")
    ap.add_argument("--no-attachments", action="store_true", help="the same document without its attachments")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the run under valgrind
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        _inner(a)
        return
    if shutil.which("valgrind") is None:
        sys.exit("accept_cost: valgrind is not installed (Debian: apt-get install valgrind)")
    c.install_cleanup()
    tmp = c.tempdir("accept-cost")
    out = tmp / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--dump-before={MARK_FUNCTION}",
           c.PY, __file__, "--inner", "--dir", str(tmp), "--count", str(a.count)]
    if a.no_attachments:
        cmd.append("--no-attachments")
    c.log(f"running {len(SEGMENTS)} segments of {a.count} under callgrind (about two minutes) …")
    # a fixed hash seed: dictionaries and sets lay out the same way in every run
    p = subprocess.run(cmd, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"accept_cost: the run under valgrind failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    info = json.loads((tmp / "info.json").read_text())
    # dump 1 ends the set-up and warm-up; dump k+1 holds segment k; the rest is in the final file
    counts = [_instructions(Path(f"{out}.{i}")) for i in range(2, len(SEGMENTS) + 2)]
    per = {name: n / a.count / 1e6 for name, n in zip(SEGMENTS, counts)}
    gw, bare = per["gateway request"], per["bare request"]
    steps = ", ".join(f"{name} {per[name]:.2f}" for name in SEGMENTS[2:]) + " (to_xml included)"
    print(f"accept_cost: gateway {gw:.2f} M instructions a request, bare flask {bare:.2f} M, ratio "
          f"{bare / gw:.2f} (in process, no HTTP; steps: {steps}) [{info['bytes']} B JSON, "
          f"{info['attachments']} attachments, {a.count} each, callgrind]", flush=True)


def _instructions(dump: Path) -> int:
    """The instruction count of one callgrind dump (its ``summary:``/``totals:`` line)."""
    text = dump.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(m.group(1))


def _inner(a: argparse.Namespace) -> None:
    """Under valgrind: set up, warm up, then each segment between two marker calls."""
    from gateway import xmlsafe
    from gateway.app import create_app
    from gateway.pipeline import accept
    from systems.documents import payload
    from systems.documents.schemas import DocumentIn

    tmp = Path(a.dir)
    (tmp / "var").mkdir()
    conf = c.write_node_config(tmp / "node.toml", c.node_config(tmp / "var", f"sqlite:///{tmp / 'var' / 'gateway.db'}"))
    node, key = c.prepare_node(conf)
    # no checkpoints in the background, where they would land in whichever segment runs: the
    # segments that write end with one (so their count holds copying their pages once)
    node.db.CHECKPOINT_SECONDS = 10**6
    body = c.store_blob(node, c.body_bytes(64 * 1024, "body"), key)
    atts = [c.store_blob(node, c.body_bytes(2048, f"att{i}"), key) for i in range(99)]
    doc = c.padded_document(body, atts)
    if a.no_attachments:
        d = json.loads(doc)
        d["attachments"] = []
        doc = json.dumps(d, ensure_ascii=False).encode("utf-8")
    n_atts = len(json.loads(doc)["attachments"])
    (tmp / "info.json").write_text(json.dumps({"bytes": len(doc), "attachments": n_atts}))
    gateway = create_app(node=node).test_client()
    bare = __import__("_bare_app").create_app().test_client()
    gw_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    model = DocumentIn.model_validate_json(doc)
    sizes = {sha: node.blobs.size(sha) for sha in [model.body["sha256"], *(x["sha256"] for x in model.attachments)]}

    def new_envelope():  # type: ignore[no-untyped-def]
        return payload.to_envelope(model, message_id=None, node_id=node.id, sizes=sizes, plain=xmlsafe.plain_json(doc))

    env = new_envelope()
    summary = {"doc_number": model.doc_number, "title": model.title, "doc_type": model.doc_type}
    kid = c.key_id(key)

    def post(client, headers):  # type: ignore[no-untyped-def]
        r = client.post("/api/v1/documents", data=doc, headers=headers)
        if r.status_code != 202:
            raise SystemExit(f"answered {r.status_code}: {r.get_data(as_text=True)[:500]}")

    envelopes: list = []  # built before the segment: it counts accept() alone

    def store() -> None:
        accept(node, envelopes.pop(), actor=f"key:{kid}", api_key_id=kid, summary=summary, new_id=True)

    steps = {
        "gateway request": lambda: post(gateway, gw_headers),
        "bare request": lambda: post(bare, {"Content-Type": "application/json"}),
        "request model": lambda: DocumentIn.model_validate_json(doc),
        "json.loads": lambda: json.loads(doc),
        "to_envelope": new_envelope,
        "to_xml": env.to_xml,
        "accept": store,
    }
    assert tuple(steps) == SEGMENTS
    for name, fn in steps.items():  # warm-up: imports, caches, statement caches, the first WAL pages
        for _ in range(50):
            if name == "accept":
                envelopes.append(new_envelope())
            fn()
    node.db.checkpoint()
    envelopes[:] = [new_envelope() for _ in range(a.count)]
    for name, fn in steps.items():
        os.getppid()  # a dump: what came before is not counted in the next segment
        for _ in range(a.count):
            fn()
        if name in WRITES:
            node.db.checkpoint()
    os.getppid()
    node.close()


if __name__ == "__main__":
    main()
