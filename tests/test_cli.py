"""The ``gateway`` command line, run as a user would run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gateway(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "GATEWAY_CONFIG": "", **(env or {})})


def _config(tmp_path: Path, body: str = "") -> Path:
    p = tmp_path / "node.toml"
    p.write_text(f'[node]\nid = "county-a"\ndata_dir = "{tmp_path / "var"}"\n' + body, encoding="utf-8")
    return p


def test_demo_delivers_through_all_three_adapters_and_across_three_nodes(tmp_path):
    r = gateway("demo", "--timeout", "60", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    single, nodes = r.stdout.split("== 二、跨节点")
    assert single.count("已签收") == 3
    for channel in ("SOAP", "SFTP", "XML"):
        assert channel in single
    # prefecture -> units at both counties and one of its own; county A -> county B, relayed
    assert nodes.count("已签收") == 4 and nodes.count("全部签收") == 1
    for route in ("转发至甲县节点", "转发至乙市节点", "本节点公文交换", "经州节点中转"):
        assert route in nodes
    assert "Traceback" not in r.stderr


def test_federation_key_prints_the_key_a_peer_pins(tmp_path):
    from gateway import nodekey
    from gateway.federation.keys import public_text

    conf = _config(tmp_path)
    r = gateway("-c", str(conf), "federation", "key", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == public_text(nodekey.load_or_create(tmp_path / "var"))
    assert r.stdout.startswith("ed25519:")


def test_a_bad_schedule_is_a_clear_error_before_anything_starts(tmp_path):
    conf = _config(tmp_path, '[schedules.push]\ncron = "every day"\n')
    r = gateway("-c", str(conf), "worker", "--once", cwd=tmp_path)
    assert r.returncode != 0
    assert "schedules.push.cron" in r.stderr and "Traceback" not in r.stderr


def test_keys_create_prints_a_key_stored_only_hashed(tmp_path):
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    r = gateway("-c", str(conf), "keys", "create", "--name", "州OA", "--scope", "documents:send",
                "--clearance", "秘密", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("gw_")
    secret = key.split("_", 2)[2]
    assert secret.encode() not in (tmp_path / "var" / "gateway.db").read_bytes()
    listed = gateway("-c", str(conf), "keys", "list", cwd=tmp_path).stdout
    assert "州OA" in listed and secret not in listed


def test_unknown_scope_is_a_clear_cli_error(tmp_path):
    conf = _config(tmp_path)
    gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path)
    r = gateway("-c", str(conf), "keys", "create", "--name", "x", "--scope", "documents:everything", cwd=tmp_path)
    assert r.returncode != 0
    assert "unknown scope 'documents:everything'" in r.stderr and "Traceback" not in r.stderr


def test_audit_verify_passes_then_fails_after_tampering(tmp_path):
    import sqlite3

    conf = _config(tmp_path)
    gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path)
    for name in ("a", "b", "c"):
        gateway("-c", str(conf), "keys", "create", "--name", name, "--scope", "*", cwd=tmp_path)
    ok = gateway("-c", str(conf), "audit", "verify", cwd=tmp_path)
    assert ok.returncode == 0 and "3 entries" in ok.stdout
    head = ok.stdout.strip().split("head ")[1]
    with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
        db.execute("UPDATE audit_log SET actor = 'someone else' WHERE seq = 2")
    bad = gateway("-c", str(conf), "audit", "verify", cwd=tmp_path)
    assert bad.returncode == 1 and "entry 2" in bad.stderr and "altered" in bad.stderr
    with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
        db.execute("DELETE FROM audit_log WHERE seq >= 2")
    r = gateway("-c", str(conf), "audit", "verify", "--expect-head", head, cwd=tmp_path)
    assert r.returncode == 1 and "removed" in r.stderr


def test_config_errors_name_the_file_the_key_and_the_expectation(tmp_path):
    conf = _config(tmp_path, '[[routes]]\nunits = ["1152230107CTPD8U2P"]\nadapter = "nowhere"\n')
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(conf) in r.stderr and "routes[0].adapter" in r.stderr and "'nowhere' is not defined" in r.stderr
    conf.write_text('[node]\nid = "xx"\n[adapters.a]\ntype = "soap"\npassword = "hunter2"\n', encoding="utf-8")
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert "adapters.a.password" in r.stderr and "password_env" in r.stderr
    assert "hunter2" not in r.stderr


def test_example_configurations_are_valid_and_agree_with_each_other():
    from gateway import config, scheduler
    from gateway.federation import keys

    cfgs = {n: config.load(ROOT / "config" / f"{n}.toml") for n in ("prefecture", "county-a", "county-b")}
    assert set(cfgs["prefecture"].adapters) == {"docexchange", "countydrop", "exchangebox"}
    for name, cfg in cfgs.items():
        assert cfg.node.id == name
        scheduler.validate(cfg)
        for peer_id, peer in cfg.peers.items():
            keys.peer_key(cfg, peer_id, peer)  # every pinned key parses
            # the two sides of a link agree on its kind and on who serves which units
            assert cfgs[peer_id].peers[name].link == peer.link
            assert set(peer.units) == set(cfgs[peer_id].node.units)


def test_a_plain_postgresql_url_means_psycopg_3_and_another_driver_is_a_clear_error(tmp_path, database_url):
    """``postgresql://`` (SQLAlchemy alone would pick psycopg2, which the gateway does not ship)
    reaches the server through psycopg 3; ``+psycopg2``/``+asyncpg`` is refused by name at start."""
    if not database_url.startswith("postgresql"):
        assert gateway("-c", str(_config(tmp_path, f'[database]\nurl = "{database_url}"\n')), "db", "upgrade",
                       cwd=tmp_path).returncode == 0  # SQLite URLs are left as they are
        return
    plain = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    conf = _config(tmp_path, '[database]\nurl_env = "GW_TEST_DB"\n')
    r = gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path, env={"GW_TEST_DB": plain})
    assert r.returncode == 0, r.stderr
    r = gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path,
                env={"GW_TEST_DB": database_url.replace("+psycopg://", "+asyncpg://", 1)})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert str(conf) in r.stderr and "database.url_env (GW_TEST_DB)" in r.stderr and "'asyncpg'" in r.stderr
    assert "postgresql+psycopg://" in r.stderr
