"""The embedded default's legacy systems: a simulated SOAP document exchange service, an
SFTP drop (in-process paramiko server) with its legacy clerk, and an exchange box — each on
a free loopback port — plus the adapters and routes that point the node at them.

Loaded only by ``gateway serve`` without configuration and by ``gateway demo``.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from adapters.simulators.exchange_box import ExchangeBox, ExchangeBoxServer
from adapters.simulators.sftp_server import LegacySftpClerk, SftpDropServer, public_line
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from gateway import config as config_mod
from gateway.config import Config

log = logging.getLogger("adapters.simulators")

PREFECTURE = "11522300GDR9YB9550"
EMERGENCY = "11522300QNNHM83X1E"
COUNTY_A = "1152230107CTPD8U2P"
CITY_B = "11522302GRALUMYP76"
COUNTY_C = "11522323C4H14TRW96"

UNITS = {
    PREFECTURE: "州人民政府办公室",
    EMERGENCY: "州应急管理局",
    COUNTY_A: "甲县人民政府办公室",
    CITY_B: "乙市人民政府办公室",
    COUNTY_C: "丙县人民政府办公室",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(path: Path) -> paramiko.Ed25519Key:
    """Load the ed25519 key at ``path``, creating it (OpenSSH format, mode 0600) if absent;
    paramiko cannot write ed25519 keys, so cryptography does."""
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@dataclass
class Simulators:
    """Ports and keys are chosen by :func:`plan`; the servers and their threads are created
    in :meth:`start`, in the process that serves (``gateway serve`` forks a gunicorn worker,
    and threads do not survive a fork)."""

    config: Config
    sim_dir: Path
    ports: dict[str, int]
    api_port: int
    sign_delay: float
    soap: SoapServiceServer | None = None
    sftp: SftpDropServer | None = None
    clerk: LegacySftpClerk | None = None
    box: ExchangeBoxServer | None = None

    def start(self) -> Simulators:
        host_key = _key(self.sim_dir / "sftp_host_ed25519")
        client_key = _key(self.sim_dir / "gateway_sftp_ed25519")
        self.soap = SoapServiceServer(DocExchangeState(auto_sign=True, auto_sign_delay=self.sign_delay),
                                      port=self.ports["soap"]).start()
        root = self.sim_dir / "sftp-drop"
        self.sftp = SftpDropServer(root, host_key, [client_key], port=self.ports["sftp"]).start()
        self.clerk = LegacySftpClerk(root, units=[CITY_B], auto_sign=self.sign_delay).start(interval=0.5)
        callback = f"http://127.0.0.1:{self.api_port}/api/v1/callbacks/exchangebox"
        self.box = ExchangeBoxServer(ExchangeBox(callback_url=callback, auto_sign=True,
                                                 auto_sign_delay=self.sign_delay), port=self.ports["box"]).start()
        return self

    def stop(self) -> None:
        stops = []
        if self.box:
            stops.append(self.box.stop)
        if self.clerk:
            stops.append(self.clerk.stop)
        if self.sftp:
            stops.append(self.sftp.stop)
        if self.soap:
            stops += [self.soap.stop, self.soap.state.close]
        for stop in stops:
            try:
                stop()
            except Exception:  # stop everything we can, and say what would not stop
                log.warning("stopping a simulator failed", exc_info=True)
        self.soap = self.sftp = self.clerk = self.box = None


def plan(cfg: Config, *, api_port: int = 8080, sign_delay: float = 2.0) -> Simulators:
    """Choose ports, prepare keys and folders, and return the node configuration pointing at
    the simulators (they are started by :meth:`Simulators.start`)."""
    sim_dir = cfg.data_dir.resolve() / "simulators"
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # as gateway.node makes it: private
    sim_dir.mkdir(exist_ok=True)
    host_key = _key(sim_dir / "sftp_host_ed25519")
    _key(sim_dir / "gateway_sftp_ed25519")
    ports = {"soap": free_port(), "sftp": free_port(), "box": free_port()}
    raw: dict[str, Any] = {
        "node": {"id": "prefecture", "name": UNITS[PREFECTURE], "units": [PREFECTURE, EMERGENCY],
                 "data_dir": str(cfg.data_dir.resolve())},
        "database": {"url": cfg.database.url},
        "worker": {"poll_interval": 1.0, "idle_sleep": 0.1},
        "adapters": {
            "docexchange": {"type": "soap", "wsdl": "schemas/legacy/docexchange.wsdl",
                            "address": f"http://127.0.0.1:{ports['soap']}/docexchange"},
            "countydrop": {"type": "sftp", "host": "127.0.0.1", "port": ports["sftp"], "username": "gateway",
                           "private_key_file": str(sim_dir / "gateway_sftp_ed25519"),
                           "host_key": public_line(host_key), "units": [CITY_B]},
            "exchangebox": {"type": "xml-exchange", "mode": "http", "address": f"http://127.0.0.1:{ports['box']}",
                            "sender_appid": "ZZF-OA"},
        },
        "routes": [
            {"units": [COUNTY_A], "adapter": "docexchange"},
            {"units": [CITY_B], "adapter": "countydrop"},
            {"units": [EMERGENCY, PREFECTURE], "adapter": "exchangebox"},
        ],
    }
    node_cfg = config_mod.from_mapping(raw, source="<embedded default>", base_dir=str(Path(config_mod.__file__).resolve().parent.parent))
    node_cfg.simulators = True
    return Simulators(node_cfg, sim_dir, ports, api_port, sign_delay)


def bootstrap_key(cfg: Config) -> str | None:
    """On first start, an administrator key with every scope, kept in
    ``<data_dir>/bootstrap-api-key`` (mode 0600) so the operator can begin."""
    from sqlalchemy import func, select

    from gateway.api.auth import create_key
    from gateway.db import Database
    from gateway.models import ApiKey

    path = cfg.data_dir / "bootstrap-api-key"
    db = Database(cfg.database_url())
    try:
        with db.sessions() as s:
            if s.scalar(select(func.count()).select_from(ApiKey)):
                return None
        key = create_key(db, name="embedded-default administrator", scopes=["*"], clearance="绝密",
                         actor="gateway serve (bootstrap)")
    finally:
        db.dispose()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
