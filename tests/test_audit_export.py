"""Reading the audit log without SQL (GB/T 22239 audit): ``gateway audit export`` with its
filters, streamed in pages, and ``gateway audit verify-export`` proving an exported slice
unaltered, on SQLite and PostgreSQL."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select, update

from gateway import audit
from gateway.cli import main
from gateway.models import AuditEntry
from tests.plugins.gatewaynode import Api


def _cli(node, tmp_path: Path, *args: str):  # type: ignore[no-untyped-def]
    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nid = "prefecture"\ndata_dir = "{node.config.node.data_dir}"\n'
                    f'[database]\nurl = "{node.config.database.url}"\n', encoding="utf-8")
    return CliRunner().invoke(main, ["-c", str(conf), "audit", *args], catch_exceptions=False)


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _some_history(node) -> tuple[Api, str, str]:  # type: ignore[no-untyped-def]
    """A classified document sent and read, a document sent, a refused request."""
    api = Api(node)
    secret = api.post("/api/v1/documents", json=api.document(classification="秘密",
                                                             classification_period="1年")).get_json()["id"]
    assert api.get(f"/api/v1/documents/{secret}").status_code == 200
    plain = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    assert api.client.get("/api/v1/documents", headers={"Authorization": "Bearer gw_0bad_x"}).status_code == 401
    return api, plain, secret


def test_export_writes_every_entry_and_its_filters_narrow_it(gw_node, tmp_path):
    api, plain, secret = _some_history(gw_node)
    with gw_node.db.sessions() as s:
        head = audit.verify(s).head
    r = _cli(gw_node, tmp_path, "export")
    assert r.exit_code == 0, r.output
    everything = _lines(r.stdout)
    assert [e["seq"] for e in everything] == list(range(1, len(everything) + 1))
    assert f"{everything[-1]['seq']}:{everything[-1]['hash']}" == head
    assert list(everything[0]) == list(audit.EXPORT_FIELDS)
    assert f"{len(everything)} entries exported" in r.stderr
    with gw_node.db.sessions() as s:  # the export is audited: who read how much of the log
        [exported] = s.scalars(select(AuditEntry).where(AuditEntry.action == "audit.export")).all()
        assert exported.seq == len(everything) + 1 and exported.actor.startswith("cli:")
        assert json.loads(exported.detail) == {"filters": {}, "entries": len(everything), "to": "stdout"}

    key = api.key.split("_")[1]
    by = {e["action"]: e for e in everything}
    assert by["document.read"]["actor"] == f"key:{key}(测试系统)"
    assert json.loads(by["message.accept"]["detail"])["subsystem"]  # detail: the JSON text the hash covers

    def only(*args: str) -> list[tuple[str, str]]:  # (among the entries before the exports)
        r = _cli(gw_node, tmp_path, "export", "--to-seq", str(len(everything)), *args)
        assert r.exit_code == 0, r.output
        return [(e["action"], e["object"]) for e in _lines(r.stdout)]

    assert only("--action", "document.read") == [("document.read", f"message:{secret}")]
    assert only("--action", "api.*", "--outcome", "unauthenticated") == [("api.refuse", "GET /api/v1/documents")]
    assert {a for a, _ in only("--actor", f"key:{key}*")} == {"message.accept", "blob.store", "document.read"}
    assert only("--actor", "key:") == []  # exact unless it ends in *
    assert only("--message", plain) == [("message.accept", f"message:{plain}")]
    assert only("--from-seq", "2", "--to-seq", "3") == [(e["action"], e["object"]) for e in everything[1:3]]
    assert len(only("--action", "audit.export")) == 0  # before the exports
    now = datetime.now(UTC)
    assert len(only("--since", (now - timedelta(minutes=5)).isoformat())) == len(everything)
    assert only("--until", (now - timedelta(minutes=5)).isoformat()) == []
    # a time without an offset is UTC; one with +08:00 is the same instant
    assert only("--since", (now + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M")) == []
    beijing = (now - timedelta(minutes=5)).astimezone(datetime.now().astimezone().tzinfo)
    assert len(only("--since", beijing.isoformat())) == len(everything)


def test_export_reads_in_pages_and_the_slice_verifies_off_the_node(gw_node, tmp_path):
    _some_history(gw_node)
    with gw_node.db.sessions() as s:
        whole = list(audit.export(s, audit.Filters()))
        assert list(audit.export(s, audit.Filters(), batch=2)) == whole  # pages join without gaps or repeats
        assert list(audit.export(s, audit.Filters(from_seq=2), batch=1)) == whole[1:]
        head = audit.verify(s).head
    out = tmp_path / "audit.jsonl"
    r = _cli(gw_node, tmp_path, "export", "--output", str(out))
    assert r.exit_code == 0 and out.stat().st_mode & 0o777 == 0o600
    r = _cli(gw_node, tmp_path, "verify-export", str(out), "--expect-head", head)
    assert r.exit_code == 0, r.output
    assert f"export intact: {len(whole)} entries in one linked run" in r.stdout
    # a filtered slice: each line still proves itself; the gaps are said
    r = _cli(gw_node, tmp_path, "export", "--action", "message.accept", "-o", str(tmp_path / "accepts.jsonl"))
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "accepts.jsonl"))
    assert r.exit_code == 0 and "2 entries in 2 linked runs" in r.stdout

    lines = out.read_text(encoding="utf-8").splitlines()
    e = json.loads(lines[1])
    e["actor"] = "someone else"
    (tmp_path / "altered.jsonl").write_text("\n".join([lines[0], json.dumps(e, ensure_ascii=False), *lines[2:]]),
                                            encoding="utf-8")
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "altered.jsonl"))
    assert r.exit_code == 1 and "line 2: entry 2 was altered" in r.stderr
    (tmp_path / "cut.jsonl").write_text("\n".join([lines[0], *lines[2:]]), encoding="utf-8")
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "cut.jsonl"), "--expect-head", head)
    assert r.exit_code == 0 and "in 2 linked runs" in r.stdout  # a removed line shows as a gap
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:-1]), encoding="utf-8")
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "short.jsonl"), "--expect-head", head)
    assert r.exit_code == 1 and f"the recorded head {head} is not in the export" in r.stderr

    # an entry altered in the database and exported: its line does not prove itself
    with gw_node.db.begin() as s:
        s.execute(update(AuditEntry).where(AuditEntry.seq == 1).values(outcome="rejected"))
    _cli(gw_node, tmp_path, "export", "--to-seq", "1", "-o", str(tmp_path / "one.jsonl"))
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "one.jsonl"))
    assert r.exit_code == 1 and "entry 1 was altered" in r.stderr


def test_bad_filters_and_files_are_named(gw_node, tmp_path):
    for args, words in [
        (["export", "--since", "yesterday"], ["--since", "ISO 8601"]),
        (["export", "--until", "2026-13-01"], ["--until", "ISO 8601"]),
        (["export", "--since", "2026-06-02", "--until", "2026-06-01"], ["--since", "not before"]),
        (["export", "--from-seq", "5", "--to-seq", "4"], ["--from-seq", "after"]),
        (["export", "--from-seq", "0"], ["--from-seq"]),
        (["export", "--actor", "*"], ["--actor", "empty"]),
        (["verify-export", str(tmp_path / "none.jsonl")], ["none.jsonl"]),
        (["verify-export", str(tmp_path / "node.toml"), "--expect-head", "12"], ["--expect-head", "SEQ:HASH"]),
    ]:
        r = _cli(gw_node, tmp_path, *args)
        assert r.exit_code == 2, (args, r.output)
        assert all(w in r.output for w in words), (args, r.output)
    r = _cli(gw_node, tmp_path, "export", "--output", str(tmp_path / "no-such-folder" / "audit.jsonl"))
    assert r.exit_code == 1 and "no-such-folder/audit.jsonl: cannot write" in r.output
    (tmp_path / "junk.jsonl").write_text('{"seq": 1}\n', encoding="utf-8")
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "junk.jsonl"))
    assert r.exit_code == 1 and "line 1: not an exported entry" in r.stderr and "Traceback" not in r.output
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    r = _cli(gw_node, tmp_path, "verify-export", str(tmp_path / "binary.jsonl"))
    assert r.exit_code == 1 and "not UTF-8" in r.stderr
