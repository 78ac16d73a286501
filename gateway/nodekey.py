"""The node's own key pair: it signs webhooks and federation requests.

Ed25519 by default, kept at ``<data_dir>/node-ed25519.pem``; a node with ``[federation]
algorithm = "sm2"`` (国密) signs federation requests with an SM2 key kept at
``<data_dir>/node-sm2.pem`` instead. Both are PKCS#8 PEM, mode 0600, created on first use;
a key another process created meanwhile is never overwritten. Callers verify a webhook with
the public key from ``GET /api/v1/webhooks/public-key`` (webhooks are signed with Ed25519).
"""
from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.durable import fsync_dir

if TYPE_CHECKING:
    from gateway.federation.sm2 import SM2PrivateKey

ED25519_FILE = "node-ed25519.pem"
SM2_FILE = "node-sm2.pem"

K = TypeVar("K")


def _load_or_create(path: Path, load: Callable[[bytes], K], generate: Callable[[], tuple[K, bytes]],
                    on_create: Callable[[K], None] | None = None) -> K:
    """The key in ``path``, or a new one written there (mode 0600). The new key is written
    to a temporary file of this call's own and linked into place, so two processes starting
    at once never overwrite each other's key: the loser of the race loads the winner's.
    ``on_create(key)`` is called by the process that made the key, once it is in place."""
    while True:
        if path.exists():
            return load(path.read_bytes())
        key, pem = generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if the key exists: never overwrite a key
            fsync_dir(path.parent)  # peers pin this key: a crash must not lose its name
            if on_create is not None:
                on_create(key)
            return key
        except FileExistsError:
            continue  # another process created it meanwhile: use that one
        finally:
            os.unlink(tmp)


def load_or_create(data_dir: Path, on_create: Callable[[Ed25519PrivateKey], None] | None = None) -> Ed25519PrivateKey:
    """The node's Ed25519 key (``<data_dir>/node-ed25519.pem``); ``on_create`` as for
    :func:`_load_or_create` (gateway.federation.keys.own_key audits a new key)."""
    path = data_dir / ED25519_FILE

    def load(pem: bytes) -> Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:  # not PEM, encrypted, damaged
            raise ValueError(f"{path} is not an Ed25519 private key in PEM: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key (it holds a {type(key).__name__})")
        return key

    def generate() -> tuple[Ed25519PrivateKey, bytes]:
        key = Ed25519PrivateKey.generate()
        return key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    return _load_or_create(path, load, generate, on_create)


def load_or_create_sm2(data_dir: Path, on_create: Callable[[SM2PrivateKey], None] | None = None) -> SM2PrivateKey:
    """The node's SM2 key (``<data_dir>/node-sm2.pem``), for ``[federation] algorithm = "sm2"``."""
    from gateway.federation.sm2 import SM2PrivateKey

    path = data_dir / SM2_FILE

    def load(pem: bytes) -> SM2PrivateKey:
        try:
            return SM2PrivateKey.from_pem(pem)
        except ValueError as exc:
            raise ValueError(f"{path} is not an SM2 private key: {exc}") from None

    def generate() -> tuple[SM2PrivateKey, bytes]:
        key = SM2PrivateKey.generate()
        return key, key.private_pem()

    return _load_or_create(path, load, generate, on_create)


def public_pem(key: Ed25519PrivateKey | SM2PrivateKey) -> str:
    if not isinstance(key, Ed25519PrivateKey):  # SM2
        return key.public_key().pem()
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def algorithm(key: Ed25519PrivateKey | SM2PrivateKey) -> str:
    """The name webhook receivers see: ed25519, or sm2-sm3 (SM2 with SM3, default ID)."""
    return "ed25519" if isinstance(key, Ed25519PrivateKey) else "sm2-sm3"


def sign(key: Ed25519PrivateKey | SM2PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


def verify(public: Ed25519PublicKey, data: bytes, signature_b64: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(base64.b64decode(signature_b64), data)
        return True
    except (InvalidSignature, ValueError):
        return False
