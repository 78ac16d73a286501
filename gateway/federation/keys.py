"""Node keys: this node's own signing key and the pinned public keys of its peers.

Ed25519 is the default; ``[federation] algorithm = "sm2"`` gives the node an SM2 key (国密,
:mod:`gateway.federation.sm2`). A peer's key is pinned in configuration, whatever its kind
(a node with an Ed25519 key may have SM2 peers and the other way round), as

* ``ed25519:<base64 of the 32 raw bytes>``,
* ``sm2:<base64 of the 65-byte uncompressed point 04||x||y>``, or
* PEM text (SubjectPublicKeyInfo) of an Ed25519 or SM2 public key.

:func:`public_text` prints the short form for either kind.
"""
from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway import nodekey
from gateway.config import Config, ConfigError, PeerConfig
from gateway.federation.sm2 import SM2PrivateKey, SM2PublicKey

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from gateway.db import Database

log = logging.getLogger("gateway.federation.keys")

#: this node's own key
NodeKey = Ed25519PrivateKey | SM2PrivateKey
#: a peer's pinned public key
PeerKey = Ed25519PublicKey | SM2PublicKey

_FORMS = ("PEM text, ed25519:<base64 of the 32 raw bytes> or "
          "sm2:<base64 of the 65-byte uncompressed point 04||x||y>")


def own_key(config: Config, actor: str | None = None) -> NodeKey:
    """This node's key, made on first use. A key file that cannot be read as one is a
    ConfigError: making a new key in its place would break every peer that pinned it.

    A key made here is audited (``admin.node_key.create``, by ``actor``: peers pin it, and a
    new one cuts them off until they pin it too). Should the database not take the entry
    (not reachable, not migrated yet), the log says so and the next start of a process
    records the key it finds (:func:`record_own_key`)."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    made: list[NodeKey] = []
    try:
        if config.federation.algorithm == "sm2":
            key: NodeKey = nodekey.load_or_create_sm2(config.data_dir, on_create=made.append)
        else:
            key = nodekey.load_or_create(config.data_dir, on_create=made.append)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{config.source}: the node key: {exc}; restore the file from a backup (peers pinned "
                          f"its public key), or move it away to make a new key, which every peer must then "
                          f"pin") from None
    if made:
        _audit_created(config, key, actor)
    return key


def key_file(config: Config) -> Path:
    """Where the node key of ``[federation] algorithm`` is kept."""
    return config.data_dir / (nodekey.SM2_FILE if config.federation.algorithm == "sm2" else nodekey.ED25519_FILE)


def check_own_key(config: Config) -> None:
    """At start: the node key, if it has been made, can be read (ConfigError otherwise)."""
    path = key_file(config)
    if path.exists() or path.is_symlink():
        own_key(config)


#: where the public key the audit log last recorded is kept (adapter_state; see gateway.node)
_RECORD = "node:"


def _audit_created(config: Config, key: NodeKey, actor: str | None) -> None:
    from gateway import audit
    from gateway.db import Database
    from gateway.node import os_user

    public = public_text(key)
    try:
        db = Database(config.database_url(), 1)
        try:
            with db.begin() as s:
                audit.append(s, actor=actor or f"process:{os_user()}", action="admin.node_key.create",
                             obj=f"node:{config.node.id}", detail={"algorithm": algorithm_of(key),
                                                                   "public_key": public, "file": str(key_file(config))})
                _remember(s, key, public)
        finally:
            db.dispose()
    except Exception as exc:  # noqa: BLE001 - the key is made; the entry follows at the next start
        orig = getattr(exc, "orig", None) or exc
        log.error("a new node key (%s) was made in %s, and its creation could not be written to the audit log "
                  "(admin.node_key.create): %s: %s; it is recorded when a process of the node next starts with "
                  "the database reachable and migrated", public, key_file(config), type(orig).__name__,
                  " ".join(str(orig).split())[:300])


def _remember(s: Session, key: NodeKey, public: str) -> str | None:
    """Record ``public`` as the node key of its algorithm; the one recorded before, if any."""
    from gateway.models import AdapterState

    row = s.get(AdapterState, (_RECORD, f"key:{algorithm_of(key)}"), with_for_update=True)
    before = row.value if row else None
    if row is None:
        s.add(AdapterState(adapter=_RECORD, key=f"key:{algorithm_of(key)}", value=public))
    else:
        row.value = public
    return before


def record_own_key(db: Database, config: Config, actor: str) -> None:
    """At a process's start: audit the node key in place (``node.key``) unless the audit log
    recorded it last: ``first`` (no key recorded: made by an older version, or its
    ``admin.node_key.create`` entry lost), ``changed`` (the file holds another key than the
    one recorded: replaced, or restored from another node). No key yet: nothing."""
    from gateway import audit

    path = key_file(config)
    if not path.exists():
        return
    key = own_key(config, actor)
    public = public_text(key)
    for last in (False, True):
        try:
            with db.begin() as s:
                before = _remember(s, key, public)
                if before == public:
                    return
                detail = {"algorithm": algorithm_of(key), "public_key": public, "file": str(path)}
                if before is not None:
                    detail["previous_public_key"] = before
                audit.append(s, actor=actor, action="node.key", obj=f"node:{config.node.id}",
                             outcome="first" if before is None else "changed", detail=detail)
            return
        except db.integrity_errors:  # another process recorded it first: compare again
            if last:
                raise


def public_of(key: NodeKey | PeerKey) -> PeerKey:
    return key.public_key() if isinstance(key, (Ed25519PrivateKey, SM2PrivateKey)) else key


def algorithm_of(key: NodeKey | PeerKey) -> str:
    """``ed25519`` or ``sm2``, as ``[federation] algorithm`` names them."""
    return "sm2" if isinstance(key, (SM2PrivateKey, SM2PublicKey)) else "ed25519"


def public_text(key: NodeKey | PeerKey) -> str:
    """The short form of a node's public key (from its private or public key), for a peer's
    ``public_key = "…"``: ``ed25519:…`` or ``sm2:…``."""
    public = public_of(key)
    if isinstance(public, SM2PublicKey):
        return "sm2:" + base64.b64encode(public.point()).decode()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def parse_public(text: str, where: str) -> PeerKey:
    text = text.strip()
    if text.startswith("ed25519:"):
        try:
            raw = base64.b64decode(text.removeprefix("ed25519:"), validate=True)
        except ValueError:
            raise ConfigError(f"{where}: not a valid Ed25519 public key (expected the base64 of 32 bytes "
                              f"after ed25519:)") from None
        if len(raw) != 32:
            raise ConfigError(f"{where}: not a valid Ed25519 public key (32 bytes expected, got {len(raw)})")
        return Ed25519PublicKey.from_public_bytes(raw)
    try:
        if text.startswith("sm2:"):
            raw = base64.b64decode(text.removeprefix("sm2:"), validate=True)
            return SM2PublicKey.from_point(raw)
        if text.startswith("-----BEGIN"):
            return _parse_pem(text, where)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not a valid public key ({exc})") from None
    raise ConfigError(f"{where}: expected {_FORMS}")


def _parse_pem(text: str, where: str) -> PeerKey:
    if "PRIVATE KEY-----" in text.split("\n", 1)[0]:
        raise ConfigError(f"{where}: this is a private key; pin the peer's public key (and keep the "
                          f"private key on the peer only)")
    try:
        key = serialization.load_pem_public_key(text.encode())
    except UnsupportedAlgorithm:  # cryptography knows no SM2 curve: Tongsuo reads it
        return SM2PublicKey.from_pem(text.encode())
    if isinstance(key, Ed25519PublicKey):
        return key
    raise ConfigError(f"{where}: expected an Ed25519 or SM2 public key, got {type(key).__name__}")


def peer_key(config: Config, peer_id: str, peer: PeerConfig) -> PeerKey:
    where = f"{config.source}: peers.{peer_id}.public_key"
    text = peer.public_key
    if peer.public_key_file:
        p = Path(peer.public_key_file)
        p = p if p.is_absolute() else Path(config.base_dir) / p
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{config.source}: peers.{peer_id}.public_key_file: cannot read {p}: "
                              f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{config.source}: peers.{peer_id}.public_key_file: {p} is not text; expected "
                              f"{_FORMS}") from None
        where = f"{p} (peers.{peer_id}.public_key_file)"
    return parse_public(text, where)
