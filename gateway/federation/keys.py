"""Node keys: this node's own signing key and the pinned public keys of its peers.

Ed25519 is the default. A peer's key is pinned in configuration as PEM text, or as
``ed25519:<base64 of the 32 raw bytes>`` (the form ``gateway federation key`` prints).
"""
from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway import nodekey
from gateway.config import Config, ConfigError, PeerConfig


def own_key(config: Config) -> Ed25519PrivateKey:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return nodekey.load_or_create(config.data_dir)


def public_text(key: Ed25519PrivateKey) -> str:
    """The short form of a node's public key, for a peer's ``public_key = "…"``."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def parse_public(text: str, where: str) -> Ed25519PublicKey:
    text = text.strip()
    try:
        if text.startswith("ed25519:"):
            raw = base64.b64decode(text.removeprefix("ed25519:"), validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if isinstance(key, Ed25519PublicKey):
                return key
            raise ConfigError(f"{where}: expected an Ed25519 public key, got {type(key).__name__}")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not a valid public key ({exc})") from None
    raise ConfigError(f"{where}: expected PEM text or ed25519:<base64 of 32 bytes>")


def peer_key(config: Config, peer_id: str, peer: PeerConfig) -> Ed25519PublicKey:
    where = f"{config.source}: peers.{peer_id}.public_key"
    text = peer.public_key
    if peer.public_key_file:
        p = Path(peer.public_key_file)
        p = p if p.is_absolute() else Path(config.base_dir) / p
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{config.source}: peers.{peer_id}.public_key_file: cannot read {p}: "
                              f"{exc.strerror}") from None
        where = f"{p} (peers.{peer_id}.public_key_file)"
    return parse_public(text, where)
