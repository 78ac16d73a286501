"""A wrong configuration is refused when it is read, with one message naming the file, the
dotted key and what was expected: never accepted silently, never a traceback later."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import config as config_mod
from gateway.config import ConfigError, from_mapping, load, read_secret, url_problem
from gateway.federation import keys

ROOT = Path(__file__).resolve().parent.parent
KEY = keys.public_text(Ed25519PrivateKey.generate())
PEER = {"url": "https://gw.county-a.internal:8443", "public_key": KEY}


def ok(tmp_path: Path, raw: dict[str, Any]) -> config_mod.Config:
    return from_mapping(raw, source="node.toml", base_dir=str(tmp_path))


def refused(tmp_path: Path, raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        from_mapping(raw, source="node.toml", base_dir=str(tmp_path))
    return str(e.value)


# -- 1. numbers: finite, and within bounds that timedelta and sleep can take --------------------
NUMBERS = [
    ("worker", "lease_seconds"), ("worker", "idle_sleep"), ("worker", "poll_interval"),
    ("worker.retry", "base_delay"), ("worker.retry", "max_delay"), ("webhooks", "timeout"),
    ("webhooks.retry", "max_delay"), ("federation", "max_skew"), ("federation", "directory_ttl_hours"),
    ("peers.county-a", "timeout"), ("peers.county-a", "ferry_settle"), ("peers.county-a", "ferry_keep_days"),
    ("peers.county-a.retry", "max_delay"),
]


def _nested(section: str, key: str, value: object) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    table = raw
    for part in section.split("."):
        if part == "county-a" and "county-a" not in table:
            table[part] = dict(PEER)
        table = table.setdefault(part, {})
    table[key] = value
    return raw


@pytest.mark.parametrize(("section", "key"), NUMBERS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e15, 1e308, -3])
def test_a_number_that_is_not_finite_or_out_of_bounds_is_refused_naming_its_key(tmp_path, section, key, value):
    if value == -3 and key in ("ferry_settle", "ferry_keep_days"):
        value = -3.5  # 0 is allowed there; negative is not
    msg = refused(tmp_path, _nested(section, key, value))
    assert msg.startswith(f"node.toml: {section}.{key}: "), msg
    assert len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize(("section", "key"), NUMBERS)
def test_a_sane_number_is_accepted_where_a_wrong_one_is_refused(tmp_path, section, key):
    cfg = ok(tmp_path, _nested(section, key, 30))
    assert "county-a" not in section or cfg.peers["county-a"].url == PEER["url"]


def test_the_documented_messages_for_numbers(tmp_path):
    assert refused(tmp_path, {"worker": {"lease_seconds": math.inf}}) == \
        "node.toml: worker.lease_seconds: Input should be a finite number (got inf)"
    assert refused(tmp_path, {"webhooks": {"timeout": -3}}) == \
        "node.toml: webhooks.timeout: Input should be greater than 0 (got -3)"
    assert "less than or equal to 86400" in refused(tmp_path, {"federation": {"max_skew": 1e308}})
    assert refused(tmp_path, {"database": {"pool_size": 9999999999999}}).startswith("node.toml: database.pool_size: ")
    assert refused(tmp_path, {"api": {"max_blob_bytes": 2**64}}).startswith("node.toml: api.max_blob_bytes: ")


def test_inf_or_nan_in_an_adapter_table_is_refused_naming_its_key(tmp_path):
    base = {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl"}
    ok(tmp_path, {"adapters": {"a": {**base, "timeout": 15.0}}})
    assert refused(tmp_path, {"adapters": {"a": {**base, "timeout": math.inf}}}).startswith(
        "node.toml: adapters.a.timeout: inf is not a finite number")
    assert refused(tmp_path, {"adapters": {"a": {**base, "send": {"limits": [1.0, math.nan]}}}}).startswith(
        "node.toml: adapters.a.send.limits[1]: nan is not a finite number")
    assert refused(tmp_path, {"adapters": {"a": {**base, "retry": {"max_delay": math.inf}}}}).startswith(
        "node.toml: adapters.a.retry.max_delay: Input should be a finite number")


def test_inf_read_from_a_file_is_refused(tmp_path):
    conf = tmp_path / "inf.toml"
    for body, key in [("[worker]\nlease_seconds = inf\n", "worker.lease_seconds"),
                      ("[worker]\nidle_sleep = 1e400\n", "worker.idle_sleep"),
                      ("[worker.retry]\nmax_delay = nan\n", "worker.retry.max_delay")]:
        conf.write_text(body)
        with pytest.raises(ConfigError, match=f"^{conf}: {key}: Input should be a finite number"):
            load(conf)


# -- 2. the data folder ------------------------------------------------------------------------
def test_a_data_dir_that_cannot_be_a_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    ok(tmp_path, {"node": {"data_dir": "fresh/var"}})  # missing folders are created later: fine
    assert not (tmp_path / "fresh").exists()  # and not by reading the configuration
    msg = refused(tmp_path, {"node": {"data_dir": "afile"}})
    assert msg.startswith(f"node.toml: node.data_dir: {tmp_path / 'afile'} is a file, not a folder; expected a folder")
    msg = refused(tmp_path, {"node": {"data_dir": str(tmp_path / "afile" / "var")}})
    assert msg.startswith(f"node.toml: node.data_dir: {tmp_path / 'afile' / 'var'} cannot be created: "
                          f"{tmp_path / 'afile'} is a file, not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "symbolic link to nothing" in refused(tmp_path, {"node": {"data_dir": "dangling/var"}})


def test_a_data_dir_this_user_cannot_write_is_refused(tmp_path, monkeypatch):
    """Tests run as root, which may write anywhere: the check asks os.access, as a service
    user's would answer, about the nearest folder that exists."""
    (tmp_path / "ro").mkdir()
    asked = []

    def access(path: object, mode: int) -> bool:
        asked.append(Path(str(path)))
        return Path(str(path)) != tmp_path / "ro"

    monkeypatch.setattr(config_mod.os, "access", access)
    ok(tmp_path, {"node": {"data_dir": "elsewhere/var"}})
    assert asked[-1] == tmp_path
    msg = refused(tmp_path, {"node": {"data_dir": "ro/var"}})
    assert msg.startswith(f"node.toml: node.data_dir: {tmp_path / 'ro' / 'var'} cannot be created: "
                          f"{tmp_path / 'ro'} is not writable by this user"), msg
    assert "is not writable by this user" in refused(tmp_path, {"node": {"data_dir": "ro"}})


# -- 3. peers ----------------------------------------------------------------------------------
def test_peer_ids_follow_the_node_id_rule(tmp_path):
    ok(tmp_path, {"peers": {"county-a": PEER}})
    for bad, shown in [("Bad_Peer", "Bad_Peer"), ("../../escape", '"../../escape"'), ("x", "x")]:
        msg = refused(tmp_path, {"peers": {bad: PEER}})
        assert msg.startswith(f"node.toml: peers.{shown}: {bad!r} is not a node id; expected 2-32"), msg


def test_peer_urls_must_be_absolute_http_urls_with_a_host_and_a_port_that_exists(tmp_path):
    for url in ("http://10.1.2.3:8080", "https://gw.prefecture.internal", "https://[::1]:8443/base"):
        assert ok(tmp_path, {"peers": {"pa": {**PEER, "url": url}}}).peers["pa"].url == url
    for url, said in [("not a url", "contains a space"), ("ftp://x", "is not an http:// or https:// URL"),
                      ("http://", "has no host"), ("gw.internal:8443", "is not an http:// or https:// URL"),
                      ("http://exa mple/x", "contains a space"), ("http://gw:99999", "Port out of range"),
                      ("http://gw:0/", "port 0"), ("http://gw:http/", "is not a valid URL")]:
        msg = refused(tmp_path, {"peers": {"pa": {**PEER, "url": url}}})
        assert msg.startswith(f"node.toml: peers.pa.url: {url!r} ") and said in msg, msg
        assert "expected an absolute http:// or https:// URL with a host" in msg


def test_a_pinned_key_that_does_not_parse_is_refused_when_the_file_is_read(tmp_path):
    where = "node.toml: peers.pa.public_key: "
    assert refused(tmp_path, {"peers": {"pa": {**PEER, "public_key": "ed25519:AAAA"}}}) == \
        where + "not a valid Ed25519 public key (32 bytes expected, got 3)"
    assert refused(tmp_path, {"peers": {"pa": {**PEER, "public_key": "ed25519:x"}}}).startswith(
        where + "not a valid Ed25519 public key")
    assert refused(tmp_path, {"peers": {"pa": {**PEER, "public_key": "rsa:xyz"}}}).startswith(where + "expected PEM")
    assert refused(tmp_path, {"peers": {"pa": {**PEER, "public_key": "sm2:AAAA"}}}).startswith(
        where + "not a valid public key")
    # a ferry peer (no url) is checked too
    ferry = {"public_key": "ed25519:AAAA", "link": "ferry", "ferry_out": "out", "ferry_in": "in"}
    assert refused(tmp_path, {"peers": {"pa": ferry}}).startswith(where + "not a valid Ed25519 public key")


def test_a_pinned_key_file_must_exist_and_hold_a_public_key(tmp_path):
    pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pa.pem").write_bytes(pem)
    peer = {"url": PEER["url"], "public_key_file": "pa.pem"}
    assert ok(tmp_path, {"peers": {"pa": peer}}).peers["pa"].public_key_file == "pa.pem"
    msg = refused(tmp_path, {"peers": {"pa": {**peer, "public_key_file": "nope.pem"}}})
    assert msg == f"node.toml: peers.pa.public_key_file: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    (tmp_path / "garbage.pem").write_text("garbage\n")
    msg = refused(tmp_path, {"peers": {"pa": {**peer, "public_key_file": "garbage.pem"}}})
    assert msg.startswith(f"{tmp_path / 'garbage.pem'} (peers.pa.public_key_file): expected PEM text"), msg
    (tmp_path / "binary.der").write_bytes(b"\x30\x82\xff\xfe")
    msg = refused(tmp_path, {"peers": {"pa": {**peer, "public_key_file": "binary.der"}}})
    assert msg.startswith("node.toml: peers.pa.public_key_file: ") and "is not text" in msg
    assert "is a directory" in refused(tmp_path, {"peers": {"pa": {**peer, "public_key_file": "."}}}).lower()


# -- 4. URLs: one helper for every URL setting -------------------------------------------------
@pytest.mark.parametrize("url", ["http://h", "https://h.example:8443/x?y=1", "http://10.0.0.1:1/", "HTTPS://H",
                                 "http://[fe80::1]:65535", "http://政务.内网/x", "http://gw_1.internal"])
def test_url_problem_accepts_absolute_http_urls(url):
    assert url_problem(url) is None


@pytest.mark.parametrize(("url", "said"), [
    ("http://", "has no host"), ("http:///path", "has no host"), ("https://:8443", "has no host"),
    ("http://exa mple", "contains a space"), ("http://h:99999", "Port out of range"), ("http://h:-1", "not a valid"),
    ("http://h:0", "port 0"), ("http://[::1", "not a valid URL"), ("ftp://h", "not an http"), ("h:80", "not an http"),
    ("/rel/path", "not an http"), ("http://h\x00", "control character"), ("http://a<b>/", "no valid host"),
    (8080, "is not a string"),
])
def test_url_problem_says_what_is_wrong(url, said):
    problem = url_problem(url)
    assert problem is not None and said in problem, problem


def test_adapter_http_addresses_and_wsdl_urls_are_checked_at_load(tmp_path):
    soap = {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl"}
    ok(tmp_path, {"adapters": {"a": {**soap, "address": "https://docexchange.internal:8443/docexchange"}}})
    ok(tmp_path, {"adapters": {"a": {**soap, "wsdl": "https://docexchange.internal/ws?wsdl"}}})
    ok(tmp_path, {"adapters": {"x": {"type": "xml-exchange", "mode": "folder", "folder": "box"}}})
    for key, value, said in [("address", "http://", "has no host"), ("address", "http://exa mple:99999/x", "space"),
                             ("address", "https://box:70000", "Port out of range"),
                             ("wsdl", "http:///docexchange.wsdl", "has no host")]:
        msg = refused(tmp_path, {"adapters": {"a": {**soap, key: value}}})
        assert msg.startswith(f"node.toml: adapters.a.{key}: {value!r} ") and said in msg, msg
    msg = refused(tmp_path, {"adapters": {"a": {**soap, "wsdl": "htp://x/y.wsdl"}}})
    assert msg.startswith("node.toml: adapters.a.wsdl: 'htp://x/y.wsdl' is not a URL the gateway can fetch")
    # credentials in a URL are still refused first, without showing them
    msg = refused(tmp_path, {"adapters": {"a": {**soap, "address": "https://u:S3cret@h"}}})
    assert "holds a user name or password" in msg and "S3cret" not in msg


# -- 5. route subsystems -----------------------------------------------------------------------
def test_a_route_names_a_subsystem_that_exists(tmp_path):
    base = {"adapters": {"rec": {"type": "recording"}}}
    for subsystem in ("*", *config_mod.SUBSYSTEMS):
        cfg = ok(tmp_path, {**base, "routes": [{"subsystem": subsystem, "adapter": "rec"}]})
        assert cfg.routes[0].subsystem == subsystem
    assert len(config_mod.SUBSYSTEMS) == 9 and "info-reports" in config_mod.SUBSYSTEMS
    for bad in ("document", "bogus", "", "Documents"):
        msg = refused(tmp_path, {**base, "routes": [{"adapter": "rec"}, {"subsystem": bad, "adapter": "rec"}]})
        assert msg == (f"node.toml: routes[1].subsystem: {bad!r} is not a subsystem; expected * or one of "
                       f"documents, approvals, mail, meetings, duty, supervision, info-reports, emergency, mobile")


# -- 6. internal fields are not keys of the file -----------------------------------------------
def test_internal_fields_are_unknown_keys_in_a_file(tmp_path):
    for key, value in [("simulators", True), ("source", "fake"), ("base_dir", "/nonexistent")]:
        msg = refused(tmp_path, {key: value})
        assert msg.startswith(f"node.toml: {key}: Extra inputs are not permitted (unknown key; expected one of "
                              f"node, database, api, worker, webhooks, adapters, routes, federation, peers, "
                              f"schedules)"), msg
    msg = refused(tmp_path, {"simulators": True, "worker": {"threads": 0}})  # all errors at once
    assert "node.toml: simulators:" in msg and "node.toml: worker.threads:" in msg
    cfg = ok(tmp_path, {})
    assert (cfg.simulators, cfg.source, cfg.base_dir) == (False, "node.toml", str(tmp_path))
    assert config_mod.embedded_default().simulators  # the gateway itself still sets them


# -- 7. a secret from _env or _file, not both --------------------------------------------------
def test_a_secret_given_both_ways_is_refused(tmp_path):
    xml = {"type": "xml-exchange", "mode": "folder", "folder": "box"}
    for key in ("password", "passphrase", "callback_token"):
        ok(tmp_path, {"adapters": {"a": {**xml, f"{key}_env": "X"}}})
        msg = refused(tmp_path, {"adapters": {"a": {**xml, f"{key}_env": "X", f"{key}_file": "x"}}})
        assert msg == f"node.toml: adapters.a: {key}_env and {key}_file are both set; expected one of them"
    msg = refused(tmp_path, {"peers": {"pa": {**PEER, "public_key_file": "pa.pem"}}})
    assert msg == "node.toml: peers.pa: public_key and public_key_file are both set; expected one of them"
    sftp = {"host": "drop", "username": "gw", "private_key_file": "k", "host_key": "ssh-ed25519 AAAA",
            "passphrase_env": "P"}
    ferry = {"public_key": KEY, "link": "ferry", "ferry_in": "in"}
    ok(tmp_path, {"peers": {"pa": {**ferry, "ferry_out": sftp}}})
    msg = refused(tmp_path, {"peers": {"pa": {**ferry, "ferry_out": {**sftp, "passphrase_file": "p"}}}})
    assert msg == "node.toml: peers.pa.ferry_out: passphrase_env and passphrase_file are both set; expected one of them"
    msg = refused(tmp_path, {"database": {"url": "sqlite:///gw.db", "url_env": "GW_DB"}})
    assert msg == "node.toml: database: url and url_env are both set; expected one of them"
    with pytest.raises(ConfigError, match="api: metrics_token_env and metrics_token_file are both set"):
        ok(tmp_path, {"api": {"metrics_token_env": "T", "metrics_token_file": "t"}}).metrics_token()
    with pytest.raises(ValueError, match="^token_file: token_env is set too; expected one of"):
        read_secret({"token_env": "T", "token_file": "t"}, "token", tmp_path, lambda _: "x")
    assert read_secret({"token_env": "T", "token_file": None}, "token", tmp_path, lambda _: "x") == "x"


# -- 8. names ----------------------------------------------------------------------------------
def test_adapter_names_follow_a_rule_and_differ_from_peer_ids(tmp_path):
    xml = {"type": "xml-exchange", "mode": "folder", "folder": "box"}
    names = ["docexchange", "countydrop", "exchangebox", "rec2", "rec-prefecture", "a", "duty_drop"]
    assert set(ok(tmp_path, {"adapters": {n: xml for n in names}}).adapters) == set(names)
    for bad, shown in [("", '""'), ("a/b c", '"a/b c"'), ("Upper", "Upper"), ("1st", "1st"), ("x" * 65, "x" * 65)]:
        msg = refused(tmp_path, {"adapters": {bad: xml}})
        assert msg.startswith(f"node.toml: adapters.{shown}: {bad!r} is not an adapter name; expected 1-64"), msg
    msg = refused(tmp_path, {"adapters": {"pa": xml}, "peers": {"pa": PEER}})
    assert msg.startswith("node.toml: peers.pa: also the name of [adapters.pa]; expected a name each")


def test_a_unit_listed_twice_in_node_units_is_refused(tmp_path):
    ok(tmp_path, {"node": {"units": ["11522300GDR9YB9550", "11522300QNNHM83X1E"]}})
    msg = refused(tmp_path, {"node": {"units": ["11522300GDR9YB9550", "11522300QNNHM83X1E", "11522300GDR9YB9550"]}})
    assert msg == "node.toml: node.units: 11522300GDR9YB9550 listed more than once; expected each unit once"


# -- 9. the file itself ------------------------------------------------------------------------
def test_a_byte_order_mark_is_skipped(tmp_path):
    conf = tmp_path / "bom.toml"
    conf.write_bytes(b"\xef\xbb\xbf" + '[node]\nid = "county-a"\nname = "甲县"\n'.encode())
    cfg = load(conf)
    assert (cfg.node.id, cfg.node.name) == ("county-a", "甲县")


def test_a_file_larger_than_1_mib_is_refused_without_reading_it_all(tmp_path):
    conf = tmp_path / "big.toml"
    conf.write_bytes(b"# " + b"x" * (config_mod.MAX_CONFIG_BYTES - 3) + b"\n")  # exactly 1 MiB: read
    assert load(conf).node.id == "local"
    conf.write_bytes(b"# " + b"x" * (config_mod.MAX_CONFIG_BYTES - 2) + b"\n")  # one byte more: refused
    with pytest.raises(ConfigError, match=f"^{conf}: larger than 1 MiB; expected a configuration file"):
        load(conf)
    with pytest.raises(ConfigError, match="^/dev/zero: larger than 1 MiB"):
        load("/dev/zero")


def test_an_empty_path_is_refused_not_read_as_the_current_folder():
    with pytest.raises(ConfigError, match=r"^the configuration file's path is empty \(is \$GATEWAY_CONFIG set"):
        load("")
    assert load(None).simulators  # no path at all: the embedded default


def test_an_unknown_key_says_which_keys_that_place_takes(tmp_path):
    assert refused(tmp_path, {"node": {"nmae": "x"}}) == \
        "node.toml: node.nmae: Extra inputs are not permitted (unknown key; expected one of id, name, units, data_dir, timezone)"
    assert refused(tmp_path, {"worker": {"retry": {"max_attemps": 3}}}).endswith(
        "worker.retry.max_attemps: Extra inputs are not permitted (unknown key; expected one of max_attempts, "
        "base_delay, max_delay)")
    assert refused(tmp_path, {"routes": [{"adapter": "x", "unit": []}]}).startswith(
        "node.toml: routes[0].unit: Extra inputs are not permitted (unknown key; expected one of subsystem, type, "
        "units, adapter, node)")
    msg = refused(tmp_path, {"adapters": {"a": {"type": "soap", "retry": {"max_attemps": 3}}}})
    assert msg.endswith("adapters.a.retry.max_attemps: Extra inputs are not permitted (unknown key; expected one "
                        "of max_attempts, base_delay, max_delay)")
    assert refused(tmp_path, {"node": "x"}) == "node.toml: node: expected a table"


# -- 10. relative paths are read from the configuration file's folder --------------------------
def test_a_relative_sqlite_path_is_read_from_the_configuration_files_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    conf = tmp_path / "conf" / "node.toml"
    conf.write_text('[database]\nurl = "sqlite:///rel.db"\n[node]\ndata_dir = "var"\n')
    monkeypatch.chdir(tmp_path)  # another folder than the file's, as under systemd or gunicorn
    cfg = load("conf/node.toml")
    assert cfg.database_url() == f"sqlite:///{tmp_path / 'conf' / 'rel.db'}"
    assert cfg.data_dir == tmp_path / "conf" / "var"
    for url in (f"sqlite:///{tmp_path / 'abs.db'}", "sqlite://", "sqlite:///:memory:"):
        conf.write_text(f'[database]\nurl = "{url}"\n')
        assert load(conf).database_url() == url
    conf.write_text('[database]\nurl = "sqlite+pysqlite:///sub/rel.db?timeout=5"\n')
    assert load(conf).database_url() == f"sqlite+pysqlite:///{tmp_path / 'conf' / 'sub' / 'rel.db'}?timeout=5"


def test_the_sample_configurations_still_load():
    for name in ("prefecture", "county-a", "county-b"):
        cfg = load(ROOT / "config" / f"{name}.toml")
        assert cfg.node.id == name and cfg.peers


def test_keep_ingested_days_is_0_or_a_week_or_more_and_outlasts_the_pauses_of_the_receipts_runs(tmp_path):
    """The keys of legacy items are forgotten once not seen at their source for that long
    (gateway.prune): a shorter time, or collection runs further apart, could forget the key
    of an item still there, which would then be taken twice."""
    from gateway import scheduler

    msg = refused(tmp_path, {"worker": {"keep_ingested_days": 3}})
    assert msg.startswith("node.toml: worker.keep_ingested_days: 3 days is too short") and "0 (kept for ever)" in msg
    assert refused(tmp_path, {"worker": {"keep_ingested_days": -1}}).startswith("node.toml: worker.keep_ingested_days")
    assert [ok(tmp_path, {"worker": {"keep_ingested_days": d}}).worker.keep_ingested_days for d in (0, 7)] == [0, 7]
    assert ok(tmp_path, {}).worker.keep_ingested_days == 90
    monthly = {"receipts": {"cron": "0 3 1 * *"}}
    with pytest.raises(ConfigError) as e:
        scheduler.validate(ok(tmp_path, {"worker": {"keep_ingested_days": 30}, "schedules": monthly}))
    assert str(e.value).startswith("node.toml: schedules.receipts.cron: '0 3 1 * *' leaves up to 3"), str(e.value)
    assert "keep_ingested_days = 30" in str(e.value)
    scheduler.validate(ok(tmp_path, {"schedules": monthly}))  # 90 days: two runs at least
    scheduler.validate(ok(tmp_path, {"worker": {"keep_ingested_days": 0}, "schedules": monthly}))
    scheduler.validate(ok(tmp_path, {"worker": {"keep_ingested_days": 7}, "schedules": {"receipts": {"cron": "*/5 * * * *"}}}))


def test_keep_peer_items_days_is_0_or_a_week_or_more_and_keep_job_runs_days_a_day_or_more(tmp_path):
    """What peers sent is forgotten once not sent again for keep_peer_items_days (a link down
    for a few days sends its unanswered items again); job runs go after keep_job_runs_days (a
    tick more than a minute late is never run, so a day is enough to keep it to one run)."""
    msg = refused(tmp_path, {"worker": {"keep_peer_items_days": 3}})
    assert msg.startswith("node.toml: worker.keep_peer_items_days: 3 days is too short") and "0 (kept for ever)" in msg
    assert [ok(tmp_path, {"worker": {"keep_peer_items_days": d}}).worker.keep_peer_items_days for d in (0, 7)] == [0, 7]
    assert refused(tmp_path, {"worker": {"keep_job_runs_days": 0}}).startswith("node.toml: worker.keep_job_runs_days")
    assert "greater than or equal to 1" in refused(tmp_path, {"worker": {"keep_job_runs_days": 0}})
    defaults = ok(tmp_path, {}).worker
    assert (defaults.keep_peer_items_days, defaults.keep_job_runs_days) == (90, 90)
