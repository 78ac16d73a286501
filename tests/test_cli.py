"""The ``gateway`` command line, run as a user would run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gateway(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}  # no node of the caller's
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**inherited, **(env or {})})


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
    assert ok.returncode == 0 and "4 entries" in ok.stdout  # schema.upgrade and the three keys
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
    conf.write_text('[node]\nid = "county-a"\n[[routes]]\nunits = ["1152230107CTPD8U2P"]\nnode = "ghost"\n',
                    encoding="utf-8")
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert r.returncode != 0 and "routes[0].node: 'ghost' is not one of [peers]" in r.stderr, r.stderr
    conf.write_text('[node]\nid = "xx"\n[adapters.box]\ntype = "xml-exchange"\n'
                    'address = "https://gw:S3cretPass@box.internal"\n', encoding="utf-8")
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert r.returncode != 0 and "adapters.box.address: holds a user name or password" in r.stderr
    assert "S3cretPass" not in r.stderr
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


_WSDL = ROOT / "schemas" / "legacy" / "docexchange.wsdl"


def test_a_wrong_adapter_setting_stops_every_start_naming_the_file_and_the_key(tmp_path):
    """Adapter settings are checked when the node starts (serve, worker, gunicorn's app
    factory, adapters list), not at the first delivery: a misspelt key must not become its
    default, nor a missing key file fail every delivery for days."""
    cases = {
        # key -> (adapter table, what the message must name)
        "soap": (f'type = "soap"\nwsdl = "{_WSDL}"\nadress = "http://127.0.0.1:9/x"\n',
                 "adapters.legacy.adress: unknown setting"),
        "xml": ('type = "xml-exchange"\nmode = "folder"\nfolder = "box"\nmax_per_pol = 5\n',
                "adapters.legacy.max_per_pol: unknown setting"),
        "sftp-key": ('type = "sftp"\nhost = "127.0.0.1"\nusername = "gw"\nprivate_key_file = "keys/none"\n'
                     'host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGSy9x5ZWvMVOrbrVyLbRYrhVjAdXsc5gRRAnBC9SZwy"\n',
                     "adapters.legacy.private_key_file"),
        "type": ('type = "carrier-pigeon"\n',
                 "adapters.legacy.type: 'carrier-pigeon' is not a known adapter type; expected one of "
                 "sftp, soap, xml-exchange"),
        "secret": ('type = "xml-exchange"\nmode = "folder"\nfolder = "box"\n'
                   'callback_token_env = "GW_TEST_UNSET_TOKEN"\n',
                   "adapters.legacy.callback_token_env: environment variable GW_TEST_UNSET_TOKEN is not set"),
    }
    route = '[[routes]]\nunits = ["1152230107CTPD8U2P"]\nadapter = "legacy"\n'
    for case, (table, named) in cases.items():
        conf = _config(tmp_path, f"[adapters.legacy]\n{table}{route}")
        for args in (("adapters", "list"), ("worker", "--once"), ("serve", "--bind", "127.0.0.1:9")):
            r = gateway("-c", str(conf), *args, cwd=tmp_path, timeout=60)
            assert r.returncode != 0, (case, args, r.stdout)
            assert "Traceback" not in r.stderr, (case, args, r.stderr)
            assert str(conf) in r.stderr and named in r.stderr, (case, args, r.stderr)
    # production: gunicorn with the app factory stops at once with the message alone
    r = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config" / "gunicorn.conf.py"),
                        "--bind", "127.0.0.1:0", "--workers", "1", "gateway.app:create_app()"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GATEWAY_CONFIG": str(conf)})
    assert r.returncode != 0
    assert named in r.stderr and str(conf) in r.stderr
    assert "Traceback" not in r.stderr and "App failed to load" in r.stderr


def test_a_retry_table_with_a_misspelt_key_is_refused_when_the_file_is_read(tmp_path):
    conf = _config(tmp_path, '[adapters.box]\ntype = "xml-exchange"\nmode = "folder"\nfolder = "box"\n'
                             '[adapters.box.retry]\nmax_attemps = 3\n')
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{conf}: adapters.box.retry.max_attemps: Extra inputs are not permitted" in r.stderr


def test_adapter_and_peer_retry_tables_take_what_they_leave_out_from_worker_retry():
    from gateway import config

    cfg = config.from_mapping({
        "worker": {"retry": {"max_attempts": 10, "base_delay": 2.0, "max_delay": 900.0}},
        "webhooks": {"retry": {"max_attempts": 5}},
        "adapters": {"soapy": {"type": "soap", "retry": {"max_attempts": 12}},
                     "plain": {"type": "soap"}},
        "peers": {"county-a": {"url": "http://127.0.0.1:9", "public_key": "ed25519:0/bdvI4sRy9xjQDCYbSRMbuX+550TV1uBZaUD9p7t80=",
                               "retry": {"base_delay": 5.0}}},
    })
    got = {k: cfg.retry_for(*k).model_dump() for k in
           [("deliver", "soapy"), ("deliver", "plain"), ("forward", "county-a"), ("webhook", "x")]}
    assert got == {
        ("deliver", "soapy"): {"max_attempts": 12, "base_delay": 2.0, "max_delay": 900.0},
        ("deliver", "plain"): {"max_attempts": 10, "base_delay": 2.0, "max_delay": 900.0},
        ("forward", "county-a"): {"max_attempts": 10, "base_delay": 5.0, "max_delay": 900.0},
        ("webhook", "x"): {"max_attempts": 5, "base_delay": 1.0, "max_delay": 600.0},
    }


def test_adapters_check_without_a_configuration_says_why_it_checks_nothing(tmp_path):
    for cmd in ("list", "check"):
        r = gateway("adapters", cmd, cwd=tmp_path)
        assert r.returncode == 0 and "no adapters configured" in r.stdout and "--config" in r.stdout


def test_operator_mistakes_get_a_message_naming_what_was_expected_never_a_traceback(tmp_path):
    conf = _config(tmp_path)
    bad_utf8 = tmp_path / "gbk.toml"
    bad_utf8.write_bytes("[node]\nname = \"州政府\"\n".encode("gb18030"))
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    (tmp_path / "u").mkdir()
    (tmp_path / "p").mkdir()
    url_conf = _config(tmp_path / "u", '[database]\nurl = "notaurl"\n')
    pw_conf = _config(tmp_path / "p", '[database]\nurl = "postgresql://gw:S3cret@db.internal/gw"\n')
    cases = [
        (["-c", str(bad_utf8), "adapters", "list"], [str(bad_utf8), "not UTF-8"]),
        (["-c", str(a_file / "x.toml"), "adapters", "list"], [str(a_file / "x.toml"), "cannot read"]),
        (["-c", str(url_conf), "adapters", "list"], [str(url_conf), "database.url", "'notaurl'", "postgresql://"]),
        (["-c", str(pw_conf), "adapters", "list"], [str(pw_conf), "database.url", "password", "url_env"]),
        (["-c", str(conf), "serve", "--bind", "garbage"], ["--bind", "HOST:PORT"]),
        (["-c", str(conf), "serve", "--bind", "127.0.0.1:notaport"], ["--bind", "HOST:PORT"]),
        (["-c", str(conf), "serve", "--threads", "0"], ["--threads", "0"]),
        (["-c", str(conf), "keys", "list"], ["gateway db upgrade"]),  # not migrated yet
        (["-c", str(conf), "serve", "--bind", "127.0.0.1:9"], ["gateway db upgrade"]),  # once, not a restart loop
        (["-c", str(conf), "audit", "verify"], ["gateway db upgrade"]),
        (["-c", str(conf), "audit", "verify", "--expect-head", "garbage"], ["--expect-head", "SEQ:HASH"]),
    ]
    for args, named in cases:
        r = gateway(*args, cwd=tmp_path)
        assert r.returncode != 0, (args, r.stdout)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        for text in named:
            assert text in r.stderr, (args, text, r.stderr)
    assert "S3cret" not in gateway("-c", str(pw_conf), "adapters", "list", cwd=tmp_path).stderr
    # on a migrated node: keys are checked before anything is stored; clearances are shown by name
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    for opts, named in [(["--unit", "123"], "unit '123'"), (["--webhook-url", "notaurl"], "webhook URL"),
                        (["--webhook-url", "https://u:pw@oa.internal/hook"], "no user name or password"),
                        (["--name", " "], "name: empty")]:
        r = gateway("-c", str(conf), "keys", "create", "--name", "OA", "--scope", "documents:send", *opts,
                    cwd=tmp_path)
        assert r.returncode != 0 and named in r.stderr and "Traceback" not in r.stderr, (opts, r.stderr)
    assert "gw_" in gateway("-c", str(conf), "keys", "create", "--name", "OA", "--scope", "documents:read",
                            "--clearance", "机密", cwd=tmp_path).stdout
    listed = gateway("-c", str(conf), "keys", "list", cwd=tmp_path).stdout
    assert listed.count("\n") == 1 and "clearance=机密" in listed
    r = gateway("-c", str(conf), "federation", "ping", cwd=tmp_path)
    assert r.returncode == 0 and "no peers configured" in r.stdout
    r = gateway("-c", str(conf), "sync", "directory", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no directory source" in r.stderr


def _ferry_node(tmp_path: Path) -> Path:
    """A migrated node with one ferry peer, county-b (folders out/ and in/, not made)."""
    from gateway import nodekey
    from gateway.federation.keys import public_text

    (tmp_path / "peer").mkdir()
    peer_key = public_text(nodekey.load_or_create(tmp_path / "peer"))
    conf = _config(tmp_path, f'[peers.county-b]\npublic_key = "{peer_key}"\nlink = "ferry"\n'
                             f'ferry_out = "{tmp_path / "out"}"\nferry_in = "{tmp_path / "in"}"\n')
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    return conf


def test_ferry_resend_and_skip_say_what_they_can_do(tmp_path):
    conf = _ferry_node(tmp_path)
    r = gateway("-c", str(conf), "ferry", "resend", "county-b", "1", cwd=tmp_path)
    assert r.returncode == 1 and "written files 1..0" in r.stderr and "Traceback" not in r.stderr
    r = gateway("-c", str(conf), "ferry", "skip", "county-b", "2", "--reason", "丢失", cwd=tmp_path)
    assert r.returncode == 1 and "waiting for file 1, not 2" in r.stderr
    r = gateway("-c", str(conf), "ferry", "skip", "county-b", "1", "--reason", "网闸故障", cwd=tmp_path)
    assert r.returncode == 1 and "does not exist or is not a folder (is the isolation device's share mounted?)" \
        in r.stderr and "--force" in r.stderr
    # the device's folders are not made up by the gateway: a run without them fails, saying so
    r = gateway("-c", str(conf), "sync", "ferry-in", cwd=tmp_path)
    assert r.returncode == 1 and "share mounted" in r.stdout and not (tmp_path / "in").exists()
    (tmp_path / "in").mkdir()
    r = gateway("-c", str(conf), "ferry", "skip", "county-b", "1", "--reason", "网闸故障", cwd=tmp_path)
    assert r.returncode == 1 and "no file after county-b_county-a_0000000001.ferry has arrived" in r.stderr
    r = gateway("-c", str(conf), "ferry", "skip", "county-b", "1", "--reason", "网闸故障", "--force", cwd=tmp_path)
    assert r.returncode == 0 and "county-b_county-a_0000000001.ferry" in r.stdout
    r = gateway("-c", str(conf), "ferry", "resend", "county-x", "1", cwd=tmp_path)
    assert r.returncode == 1 and "not a ferry peer" in r.stderr


def test_keys_get_an_upload_quota_of_their_own_and_the_list_shows_it(tmp_path):
    """``keys create --upload-quota`` and ``keys quota``: sizes as operators write them, none
    and default; a value that is not one is refused naming the option and what it takes."""
    import json
    import sqlite3

    conf = _config(tmp_path, "[api]\nupload_quota_bytes_per_day = 10737418240\n")
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    r = gateway("-c", str(conf), "keys", "create", "--name", "州OA", "--scope", "blobs:write",
                "--upload-quota", "20GiB", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key_id = r.stdout.strip().split("_")[1]
    assert gateway("-c", str(conf), "keys", "create", "--name", "甲县OA", "--scope", "blobs:write",
                   cwd=tmp_path).returncode == 0
    listed = gateway("-c", str(conf), "keys", "list", cwd=tmp_path).stdout.splitlines()
    assert "upload-quota=20 GiB/day" in listed[0] and "州OA" in listed[0]
    assert "upload-quota=node default (10 GiB/day)" in listed[1]
    r = gateway("-c", str(conf), "keys", "quota", key_id, "none", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"{key_id}: upload quota none (was 20 GiB/day)", r.stderr
    r = gateway("-c", str(conf), "keys", "quota", key_id, "default", cwd=tmp_path)
    assert r.stdout.strip() == f"{key_id}: upload quota node default (10 GiB/day) (was none)"
    for args, named in [(["keys", "create", "--name", "x", "--scope", "blobs:write", "--upload-quota", "20G"],
                         "--upload-quota"),
                        (["keys", "quota", key_id, "lots"], "VALUE"),
                        (["keys", "quota", key_id, "0"], "is no bytes at all")]:
        r = gateway("-c", str(conf), *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert named in r.stderr and ("expected a number of bytes, optionally with a unit" in r.stderr
                                      or "expected a size such as 20GiB" in r.stderr), r.stderr
    r = gateway("-c", str(conf), "keys", "quota", "nosuchkey", "1GiB", cwd=tmp_path)
    assert r.returncode == 1 and "no active key with id nosuchkey" in r.stderr
    with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
        rows = db.execute("SELECT action, detail FROM audit_log ORDER BY seq").fetchall()
    assert [a for a, _ in rows] == ["schema.upgrade", "admin.key.create", "admin.key.create", "admin.key.quota",
                                    "admin.key.quota"]
    assert json.loads(rows[1][1])["upload_quota_bytes_per_day"] == 20 * 2**30
    assert json.loads(rows[4][1]) == {"before": 0, "upload_quota_bytes_per_day": None}
    assert gateway("-c", str(conf), "audit", "verify", cwd=tmp_path).returncode == 0


def test_outbox_retry_needs_rows_or_all_and_says_so(tmp_path):
    """The rows to put back are named or --all is given, not both, and filters narrow only
    --all: each mistake is a usage error (exit 2) that says what to give, before anything runs."""
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    for args, said in [((), "name the rows to retry"), (("3", "--all"), "name the rows to retry"),
                       (("3", "--target", "docexchange"), "narrow --all"), (("x",), "'x' is not a valid integer"),
                       (("--all", "--kind", "mail"), "'mail' is not one of")]:
        r = gateway("-c", str(conf), "outbox", "retry", *args, cwd=tmp_path)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = gateway("-c", str(conf), "outbox", "list", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "0 dead-lettered rows.", r.stdout + r.stderr
    r = gateway("-c", str(conf), "outbox", "retry", "--all", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "0 rows put back in the queue; 0 copies failed → queued"


def test_db_upgrade_says_why_it_cannot_migrate_in_one_line(tmp_path):
    """An unreachable database, a data folder that is a file, a file that is no database, a
    schema migrated by a newer version: one message naming the key, never a traceback."""
    import sqlite3

    (tmp_path / "afile").write_text("x")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    cases = [
        ('[database]\nurl = "postgresql+psycopg://gw@127.0.0.1:1/gw"\n', "Connection refused"),
        (f'[database]\nurl = "sqlite:///{tmp_path / "afile" / "gw.db"}"\n', "File exists"),
        (f'[database]\nurl = "sqlite:///{tmp_path / "junk.db"}"\n', "file is not a database"),
    ]
    for body, said in cases:
        conf = _config(tmp_path, body)
        r = gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{conf}: database.url: cannot migrate the database at" in r.stderr and said in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "var" / "gateway.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    for args in (("db", "upgrade"), ("keys", "list")):
        r = gateway("-c", str(conf), *args, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "schema revision 9999_from_the_future, which this version of the gateway does not know" in r.stderr
        assert "run 'gateway db upgrade'" not in r.stderr  # upgrading is what cannot help


def test_audit_verify_takes_the_empty_logs_head_it_printed(tmp_path):
    from gateway import migrate

    conf = _config(tmp_path)
    migrate.upgrade(f"sqlite:///{tmp_path / 'var' / 'gateway.db'}")  # `gateway db upgrade` would audit it
    r = gateway("-c", str(conf), "audit", "verify", cwd=tmp_path)
    empty = r.stdout.split("head ")[1].strip()
    assert empty == "0:" + "0" * 64
    assert gateway("-c", str(conf), "audit", "verify", "--expect-head", empty, cwd=tmp_path).returncode == 0
    assert gateway("-c", str(conf), "keys", "create", "--name", "x", "--scope", "documents:send",
                   cwd=tmp_path).returncode == 0
    r = gateway("-c", str(conf), "audit", "verify", "--expect-head", empty, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # entries added after it: the chain still starts there
    r = gateway("-c", str(conf), "audit", "verify", "--expect-head", "0:" + "1" * 64, cwd=tmp_path)
    assert r.returncode == 1 and "AUDIT LOG BROKEN: the recorded head" in r.stderr and "None" not in r.stderr
    r = gateway("-c", str(conf), "audit", "verify", "--expect-head", "9" * 25 + ":" + "0" * 64, cwd=tmp_path)
    assert r.returncode == 2 and "expected SEQ:HASH" in r.stderr and "Traceback" not in r.stderr


def test_sizes_past_what_a_column_keeps_are_refused_naming_the_option(tmp_path):
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    r = gateway("-c", str(conf), "keys", "create", "--name", "x", "--scope", "blobs:write", "--upload-quota",
                "9" * 30 + "GiB", cwd=tmp_path)
    assert r.returncode == 2 and "--upload-quota" in r.stderr and "at most 9223372036854775807 bytes" in r.stderr
    assert "Traceback" not in r.stderr
    r = gateway("-c", str(conf), "keys", "quota", "anykey", "9" * 5000 + ".5", cwd=tmp_path)
    assert r.returncode == 2 and "at most" in r.stderr and "Traceback" not in r.stderr
    assert gateway("-c", str(conf), "keys", "list", cwd=tmp_path).stdout == ""  # nothing was stored


def test_a_job_with_nothing_to_work_for_fails_saying_so(tmp_path):
    """A federation job on a node without the peers it needs, and a receipts poll through an
    adapter whose secret is missing, are configuration mistakes: exit 1, naming them."""
    import json

    conf = _config(tmp_path, '[adapters.s]\ntype = "soap"\nwsdl = "schemas/legacy/docexchange.wsdl"\n'
                             'address = "http://127.0.0.1:9/x"\nusername = "u"\npassword_env = "NO_SUCH_PW_VAR"\n')
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    for job, said in [("push", 'no peer on a batch link (link = "batch")'), ("pull", "batch link"),
                      ("reconcile", "no peer it can ask"), ("ferry-out", "ferry_out folder"),
                      ("ferry-in", "ferry_in folder"), ("receipts", "NO_SUCH_PW_VAR is not set")]:
        r = gateway("-c", str(conf), "sync", job, cwd=tmp_path)
        assert r.returncode == 1, (job, r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out["outcome"] == "failed" and said in out["detail"]["message"], (job, out)


def test_adapters_check_names_the_adapters_there_are(tmp_path):
    conf = _config(tmp_path, '[adapters.docexchange]\ntype = "soap"\nwsdl = "schemas/legacy/docexchange.wsdl"\n'
                             'address = "http://127.0.0.1:9/x"\n')
    r = gateway("-c", str(conf), "adapters", "check", "nosuch", cwd=tmp_path)
    assert r.returncode == 2 and "no adapter named 'nosuch' is configured; expected one of docexchange" in r.stderr
    r = gateway("demo", "--timeout", "-5", cwd=tmp_path)
    assert r.returncode == 2 and "--timeout" in r.stderr


def test_an_empty_gateway_config_is_refused_not_taken_for_the_embedded_default(tmp_path):
    """A unit file whose variable came out empty must not start simulated legacy systems."""
    r = gateway("keys", "list", cwd=tmp_path, env={"GATEWAY_CONFIG": ""})
    assert r.returncode == 2 and "GATEWAY_CONFIG is set but empty" in r.stderr
    assert not (tmp_path / "var").exists()


def test_adapters_list_checks_the_node_files_and_tls_files_with_no_adapter_too(tmp_path):
    """The documented settings check reads what the node reads at start: a metrics token file
    that is not there fails it even with no adapter, and a CA bundle or known_hosts file that
    holds nothing usable fails it naming the key."""
    conf = _config(tmp_path, f'[api]\nmetrics_token_file = "{tmp_path / "no-such-token"}"\n')
    r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
    assert r.returncode == 1 and "api.metrics_token_file" in r.stderr, r.stdout + r.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text('id = "abc"\nnot a certificate\n')
    for body, key in [(f'[adapters.a]\ntype = "soap"\nwsdl = "schemas/legacy/docexchange.wsdl"\n'
                       f'address = "https://127.0.0.1:9/x"\nca_file = "{junk}"\n', "adapters.a.ca_file"),
                      (f'[adapters.b]\ntype = "xml-exchange"\nmode = "http"\naddress = "https://127.0.0.1:9"\n'
                       f'ca_file = "{junk}"\n', "adapters.b.ca_file"),
                      (f'[adapters.c]\ntype = "sftp"\nhost = "127.0.0.1"\nusername = "u"\n'
                       f'private_key_file = "{tmp_path / "k"}"\nknown_hosts_file = "{junk}"\n',
                       "adapters.c.known_hosts_file")]:
        (tmp_path / "k").write_text("")
        conf = _config(tmp_path, body)
        r = gateway("-c", str(conf), "adapters", "list", cwd=tmp_path)
        assert r.returncode == 1 and key in r.stderr and "Traceback" not in r.stderr, (key, r.stderr)


def test_ferry_resend_names_a_backward_range(tmp_path):
    conf = _ferry_node(tmp_path)
    r = gateway("-c", str(conf), "ferry", "resend", "county-b", "5", "--to", "2", cwd=tmp_path)
    assert r.returncode == 1 and "--to 2 is before file 5" in r.stderr


def test_a_damaged_node_key_stops_the_start_and_is_never_replaced(tmp_path):
    """Peers pinned the node key: one that cannot be read is named, never silently made anew."""
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    key = tmp_path / "var" / "node-ed25519.pem"
    key.write_text("garbage\n")
    for args in (("federation", "key"), ("worker", "--once"), ("adapters", "list")):
        r = gateway("-c", str(conf), *args, cwd=tmp_path)
        assert r.returncode == 1 and "the node key:" in r.stderr and "restore the file" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert key.read_text() == "garbage\n"


def test_db_downgrade_steps_the_schema_down_for_a_rollback_keeping_the_data(tmp_path, database_url):
    """A rollback: with the newer version still installed, ``db downgrade REV`` steps the schema
    down to the newest revision of the older version (audited, the chain intact, the rows
    kept); a revision it does not know, or one not below the database's, is one clear line."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from gateway import audit, migrate

    conf = _config(tmp_path, f'[database]\nurl = "{database_url}"\n')
    r = gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path)
    assert r.returncode == 0 and f"(revision {migrate.head()})" in r.stdout, r.stdout + r.stderr
    assert gateway("-c", str(conf), "keys", "create", "--name", "州OA", "--scope", "documents:send",
                   cwd=tmp_path).returncode == 0

    r = gateway("-c", str(conf), "db", "downgrade", "0010", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"is at schema revision 0010 (was {migrate.head()})" in r.stdout
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0010"
            assert conn.execute(text("SELECT name FROM api_keys")).scalars().all() == ["州OA"]
            last = conn.execute(text("SELECT action, detail FROM audit_log ORDER BY seq DESC LIMIT 1")).one()
        with Session(engine) as s:  # (gateway audit verify itself waits for the schema the version needs)
            assert audit.verify(s).ok and audit.verify(s).entries == 3
    finally:
        engine.dispose()
    assert last[0] == "schema.downgrade" and '"to":"0010"' in last[1]

    for rev, said in (("9999", "no schema revision '9999'"), ("0011", "at schema revision 0010, not above 0011")):
        r = gateway("-c", str(conf), "db", "downgrade", rev, cwd=tmp_path)
        assert r.returncode == 1 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0  # and up again
