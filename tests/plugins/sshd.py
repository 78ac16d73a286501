"""SFTP servers for the tests: a private, real OpenSSH ``sshd`` and the in-process simulator.

``openssh_server`` (session scope) starts ``/usr/sbin/sshd -D -e -f <own config>`` on
127.0.0.1 with its own generated ed25519 host key and one authorized client key, key auth
only, ``internal-sftp`` rooted at a temp data folder. It is never mocked and never skipped:
without sshd the tests FAIL and say how to get it (``tests/run`` installs openssh-server).

``sftp_drop_server`` (function scope) is the in-process paramiko server of
:mod:`adapters.simulators.sftp_server`, for proving the simulator keeps the same contract.

Both yield an :class:`SftpEndpoint`; ``endpoint.adapter_config(root)`` is a ready
``[adapters.NAME]`` mapping for :class:`adapters.sftp.SftpAdapter`.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


@dataclass
class SftpEndpoint:
    """Where and how to reach a test SFTP server."""

    host: str
    port: int
    username: str
    client_key_path: Path  # OpenSSH-format private key, no passphrase
    host_key_line: str  # "ssh-ed25519 AAAA..." (known_hosts style without host name)
    data_root: Path  # local folder the server's SFTP root maps to
    remote_root: (
        str  # the same folder as the server names it (OpenSSH: absolute path; simulator: "/")
    )
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def adapter_config(self, sub: str = "", **overrides: Any) -> dict[str, Any]:
        """An ``sftp`` adapter config for this server whose ``root`` is the folder ``sub``
        under the data root (locally: ``data_root / sub``)."""
        cfg: dict[str, Any] = {
            "type": "sftp",
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "private_key_file": str(self.client_key_path),
            "host_key": self.host_key_line,
            "root": posixpath.join(self.remote_root, sub) if sub else self.remote_root,
            "connect_timeout": 5,
        }
        cfg.update(overrides)
        return cfg

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return ""


def generate_ed25519(path: Path) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 0600) to ``path``; return its
    public line. Uses ``cryptography`` so no ssh-keygen call is needed (and paramiko cannot
    generate ed25519 keys itself)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = pub.decode("ascii")
    Path(f"{path}.pub").write_text(line + "\n")
    return line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_sshd() -> str | None:
    for cand in SSHD_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("sshd")


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """True once sshd accepts on ``port`` and sends its SSH banner; False if it died."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class PrivateSshd:
    """One sshd process with everything in its own temp dir; nothing system-wide is touched
    except ``/run/sshd`` (sshd's privilege-separation directory, created if missing)."""

    def __init__(self, sshd: str, user: str | None = None, sftp_options: str = "") -> None:
        self.sshd = sshd
        self.sftp_options = sftp_options
        self.tmp = Path(tempfile.mkdtemp(prefix="gwtest-sshd."))
        self.data = self.tmp / "data"
        self.data.mkdir()
        self.log = self.tmp / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.username = user or pwd.getpwuid(os.geteuid()).pw_name
        self.shared = user is not None
        if self.shared:  # sshd reads the keys as the user, who must reach the data root
            os.chmod(self.tmp, 0o755)
            os.chmod(self.data, 0o777)

    def start(self) -> SftpEndpoint:
        host_line = generate_ed25519(self.tmp / "ssh_host_ed25519_key")
        client_line = generate_ed25519(self.tmp / "client_ed25519")
        (self.tmp / "authorized_keys").write_text(client_line + "\n")
        os.chmod(self.tmp / "authorized_keys", 0o644 if self.shared else 0o600)
        if os.geteuid() == 0:
            # sshd refuses to start as root without its privilege-separation directory.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last_log = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port()
            conf = self.tmp / "sshd_config"
            conf.write_text(
                f"ListenAddress 127.0.0.1:{port}\n"
                f"HostKey {self.tmp / 'ssh_host_ed25519_key'}\n"
                f"PidFile {self.tmp / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.tmp / 'authorized_keys'}\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "PubkeyAuthentication yes\n"
                "AuthenticationMethods publickey\n"
                "PermitRootLogin prohibit-password\n"  # CI runs the tests as root
                "StrictModes no\n"  # the temp dir's modes are not sshd's business here
                "UsePAM no\n"
                "X11Forwarding no\n"
                "AllowTcpForwarding no\n"
                "PermitTTY no\n"
                "MaxSessions 32\n"
                "MaxStartups 64\n"
                "LogLevel VERBOSE\n"
                # internal-sftp needs no helper binary; -d puts a session's "." at the data root
                f"Subsystem sftp internal-sftp -d {self.data} {self.sftp_options}\n"
            )
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.sshd, "-D", "-e", "-f", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if _wait_for_banner(port, self.proc, time.monotonic() + 15):
                return SftpEndpoint(
                    host="127.0.0.1",
                    port=port,
                    username=self.username,
                    client_key_path=self.tmp / "client_ed25519",
                    host_key_line=host_line,
                    data_root=self.data,
                    remote_root=str(self.data),
                    log_path=self.log,
                )
            last_log = self.log.read_text(errors="replace")[-3000:]
            self._kill()
        pytest.fail(f"private sshd did not start; its log:\n{last_log}", pytrace=False)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _serve(user: str | None = None, sftp_options: str = "") -> Iterator[SftpEndpoint]:
    sshd = _find_sshd()
    if sshd is None:
        pytest.fail(
            "OpenSSH server (/usr/sbin/sshd) is not installed: run tests/run, which installs "
            "openssh-server (or apt-get install openssh-server)",
            pytrace=False,
        )
    server = PrivateSshd(sshd, user=user, sftp_options=sftp_options)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def openssh_server() -> Iterator[SftpEndpoint]:
    """A private, real OpenSSH server for the session (see the module docstring)."""
    yield from _serve()


@pytest.fixture(scope="session")
def unprivileged_openssh_server() -> Iterator[SftpEndpoint]:
    """Like ``openssh_server``, but its SFTP sessions run as a user file permissions apply to
    (``nobody`` when the tests run as root): a server that refuses a write or a listing.
    Folders the tests make there must be handed to it (:func:`give_to`)."""
    yield from _serve(user="nobody" if os.geteuid() == 0 else None)


@pytest.fixture(scope="session")
def openssh_server_refusing_deletes() -> Iterator[SftpEndpoint]:
    """Like ``openssh_server``, with ``internal-sftp -P remove``: a drop whose users may write
    and rename but never delete (OpenSSH's own way to set up an upload-only account)."""
    yield from _serve(sftp_options="-P remove")


def give_to(endpoint: SftpEndpoint, folder: Path) -> None:
    """Make ``folder`` and everything below it the SFTP user's, as its own files would be."""
    pw = pwd.getpwnam(endpoint.username)
    if os.geteuid() == 0:
        for p in [folder, *folder.rglob("*")]:
            os.lchown(p, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def sftp_drop_server(tmp_path: Path) -> Iterator[SftpEndpoint]:
    """The in-process simulator (``SftpDropServer``) over a fresh temp folder."""
    import paramiko

    from adapters.simulators.sftp_server import SftpDropServer

    keys = tmp_path / "keys"
    keys.mkdir()
    data = tmp_path / "drop"
    data.mkdir()
    host_line = generate_ed25519(keys / "host_ed25519")
    generate_ed25519(keys / "client_ed25519")
    host_key = paramiko.Ed25519Key(filename=str(keys / "host_ed25519"))
    client_key = paramiko.Ed25519Key(filename=str(keys / "client_ed25519"))
    server = SftpDropServer(data, host_key=host_key, authorized_keys=[client_key])
    server.start()
    try:
        yield SftpEndpoint(
            host="127.0.0.1",
            port=server.port,
            username="gateway",
            client_key_path=keys / "client_ed25519",
            host_key_line=host_line,
            data_root=data,
            remote_root="/",
            extra={"server": server},
        )
    finally:
        server.stop()
