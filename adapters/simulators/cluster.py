"""Several gateway nodes as separate processes on loopback: a prefecture (州) node and two
county (县) nodes, each with its own database, key pair and simulated document exchange
service (SOAP, auto-signing). Used by ``gateway demo --nodes`` and the federation tests.

Trust is set up as an operator would: each node's key pair is made first, and each node's
configuration pins the public keys of the nodes it talks to. County A and county B have no
link to each other; their traffic is relayed by the prefecture.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from adapters.simulators.embedded import free_port
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from gateway import nodekey

REPO = Path(__file__).resolve().parents[2]

PREFECTURE = "11522300GDR9YB9550"  # 州人民政府办公室
EMERGENCY = "11522300QNNHM83X1E"   # 州应急管理局
COUNTY_A = "1152230107CTPD8U2P"    # 甲县人民政府办公室
CITY_B = "11522302GRALUMYP76"      # 乙市人民政府办公室

UNIT_NAMES = {PREFECTURE: "州人民政府办公室", EMERGENCY: "州应急管理局", COUNTY_A: "甲县人民政府办公室",
              CITY_B: "乙市人民政府办公室"}

#: node id -> (name, units it serves)
LAYOUT: dict[str, tuple[str, list[str]]] = {
    "prefecture": ("州人民政府办公室", [PREFECTURE, EMERGENCY]),
    "county-a": ("甲县人民政府办公室", [COUNTY_A]),
    "county-b": ("乙市人民政府办公室", [CITY_B]),
}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for a node configuration: tables, arrays of tables, scalars, lists."""
    out: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not (
            isinstance(v, list) and v and isinstance(v[0], dict))}
        if prefix and scalars:
            out.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{k} = {_toml(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for row in v:
                    out.append(f"\n[[{name}]]")
                    for rk, rv in row.items():
                        out.append(f"{rk} = {_toml(rv)}")

    table("", doc)
    return "\n".join(out) + "\n"



def stop_process_group(p: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop the process group started for ``p`` (``start_new_session=True``): ``sig`` (SIGTERM),
    then SIGKILL if it has not gone within ``timeout``; a group whose leader has already exited
    may still have children, and is killed."""
    if p.poll() is not None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)

@dataclass
class NodeProc:
    id: str
    root: Path
    port: int
    config_path: Path
    soap: SoapServiceServer
    proc: subprocess.Popen | None = None
    api_key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "var"

    @property
    def database_url(self) -> str:
        return self.extra.get("database_url") or f"sqlite:///{self.data_dir / 'gateway.db'}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(self.config_path), *args],
                              cwd=REPO, capture_output=True, text=True, check=check, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.headers["Authorization"] = f"Bearer {self.api_key}"
        return s


class Cluster:
    """``Cluster(root).start()`` … ``close()``. ``overrides`` adds to or replaces parts of a
    node's configuration (``{"county-a": {"worker": {...}}}``)."""

    def __init__(self, root: Path, *, sign_delay: float = 0.3, overrides: dict[str, dict] | None = None,
                 database_urls: dict[str, str] | None = None, links: dict[tuple[str, str], str] | None = None,
                 echo=None, peer_settings: dict[tuple[str, str], dict[str, Any]] | None = None,
                 ) -> None:  # type: ignore[no-untyped-def]
        self.root = Path(root)
        #: link kinds between two nodes other than "http", e.g. {("prefecture", "county-b"): "batch"};
        #: a "ferry" link gets its folders (see :meth:`ferry_dir`)
        self.links = {frozenset(k): v for k, v in (links or {}).items()}
        #: more settings of one node's [peers.X] table: {("county-b", "prefecture"): {"ferry_settle": 0}}
        self.peer_settings = peer_settings or {}
        self.sign_delay = sign_delay
        self.overrides = overrides or {}
        self.database_urls = database_urls or {}
        self.echo = echo or (lambda *_: None)
        self.nodes: dict[str, NodeProc] = {}
        self.public: dict[str, str] = {}

    # -- set-up ----------------------------------------------------------------------------
    def plan(self) -> Cluster:
        from gateway.federation.keys import public_text

        for node_id in LAYOUT:
            root = self.root / node_id
            (root / "var").mkdir(parents=True, exist_ok=True)
            sm2 = self.overrides.get(node_id, {}).get("federation", {}).get("algorithm") == "sm2"
            key = nodekey.load_or_create_sm2(root / "var") if sm2 else nodekey.load_or_create(root / "var")
            self.public[node_id] = public_text(key)
            soap = SoapServiceServer(DocExchangeState(auto_sign=True, auto_sign_delay=self.sign_delay,
                                                      auto_signer=f"{LAYOUT[node_id][0]}值班员"))
            self.nodes[node_id] = NodeProc(node_id, root, free_port(), root / "node.toml", soap,
                                           extra={"database_url": self.database_urls.get(node_id)})
        for node in self.nodes.values():
            node.config_path.write_text(to_toml(self.config_for(node)), encoding="utf-8")
        return self

    def config_for(self, node: NodeProc) -> dict[str, Any]:
        name, units = LAYOUT[node.id]
        peer_ids = ["county-a", "county-b"] if node.id == "prefecture" else ["prefecture"]
        cfg: dict[str, Any] = {
            "node": {"id": node.id, "name": name, "units": units, "data_dir": str(node.data_dir)},
            "database": {"url": node.database_url},
            "worker": {"threads": 8, "poll_interval": 0.3, "idle_sleep": 0.05, "lease_seconds": 30,
                       "retry": {"max_attempts": 50, "base_delay": 0.2, "max_delay": 2.0}},
            "adapters": {"docexchange": {"type": "soap", "wsdl": str(REPO / "schemas/legacy/docexchange.wsdl"),
                                         "address": f"http://127.0.0.1:{node.soap.port}/docexchange",
                                         # documents crossing the nodes carry 附件; these simulated
                                         # offices take the body alone, knowingly
                                         "timeout": 10, "attachments": "omit"}},
            "federation": {"max_skew": 300} if node.id == "prefecture" else {"parent": "prefecture"},
            "peers": {p: self.peer_config(node.id, p) for p in peer_ids},
            "routes": [{"units": units, "adapter": "docexchange"}]
                      + ([] if node.id == "prefecture" else [{"node": "prefecture"}]),
        }
        for key, val in self.overrides.get(node.id, {}).items():
            cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
        return cfg

    def peer_config(self, node_id: str, peer: str) -> dict[str, Any]:
        """Node ``node_id``'s ``[peers.PEER]`` table."""
        link = self.links.get(frozenset((node_id, peer)), "http")
        cfg: dict[str, Any] = {"url": f"http://127.0.0.1:{self.nodes[peer].port}", "public_key": self.public[peer],
                               "units": LAYOUT[peer][1], "timeout": 30, "link": link}
        if link == "ferry":
            for direction in ("out", "in"):  # the device's folders exist before either node uses them
                self.ferry_dir(node_id, peer, direction).mkdir(parents=True, exist_ok=True)
            cfg.update(ferry_out=str(self.ferry_dir(node_id, peer, "out")),
                       ferry_in=str(self.ferry_dir(node_id, peer, "in")))
        return {**cfg, **self.peer_settings.get((node_id, peer), {})}

    def ferry_dir(self, node_id: str, peer: str, direction: str) -> Path:
        """On a ferry link, the folder where node ``node_id`` writes its files for ``peer``
        (``"out"``) or takes the files from ``peer`` (``"in"``). The isolation device is
        whoever copies one node's out folder to the other's in folder (a test, the demo)."""
        if direction not in ("out", "in"):
            raise ValueError(f"direction {direction!r}; expected out or in")
        return self.root / node_id / "ferry" / (f"to-{peer}" if direction == "out" else f"from-{peer}")

    def start(self, timeout: float = 90.0) -> Cluster:
        from concurrent.futures import ThreadPoolExecutor

        if not self.nodes:
            self.plan()

        def prepare(node: NodeProc) -> None:
            node.soap.start()
            node.config_path.write_text(to_toml(self.config_for(node)), encoding="utf-8")
            node.cli("db", "upgrade")
            node.api_key = node.cli("keys", "create", "--name", f"{node.id} 测试系统", "--scope", "*",
                                    "--clearance", "绝密").stdout.strip()

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(prepare, self.nodes.values()))
        for node in self.nodes.values():
            self.start_node(node.id, wait=False)
        for node in self.nodes.values():
            self.wait_ready(node.id, timeout)
        return self

    def start_node(self, node_id: str, *, wait: bool = True) -> None:
        node = self.nodes[node_id]
        log = open(node.root / "node.log", "ab")  # noqa: SIM115 - the child process owns it
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-c", str(node.config_path), "serve",
             "--bind", f"127.0.0.1:{node.port}", "--threads", "8"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_CONFIG": ""})
        log.close()
        if wait:
            self.wait_ready(node_id)

    def wait_ready(self, node_id: str, timeout: float = 90.0) -> None:
        node = self.nodes[node_id]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"node {node_id} exited with {node.proc.returncode}; see {node.root / 'node.log'}")
            try:
                if requests.get(f"{node.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"node {node_id} did not come up in {timeout:.0f} s; see {node.root / 'node.log'}")

    def stop_node(self, node_id: str, sig: int = signal.SIGTERM) -> None:
        node = self.nodes[node_id]
        if node.proc is None:
            return
        stop_process_group(node.proc, 30, sig)
        node.proc = None

    def close(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
                list(pool.map(self.stop_node, list(self.nodes)))
        except RuntimeError:  # at interpreter exit no new threads start: one by one
            for node_id in list(self.nodes):
                self.stop_node(node_id)
        for node in self.nodes.values():
            node.soap.stop()
            node.soap.state.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
