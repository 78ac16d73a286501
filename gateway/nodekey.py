"""The node's own Ed25519 key pair: it signs webhooks now and federation requests later.

Kept at ``<data_dir>/node-ed25519.pem`` (mode 0600), created on first use. Callers verify a
webhook with the public key from ``GET /api/v1/webhooks/public-key``.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def load_or_create(data_dir: Path) -> Ed25519PrivateKey:
    path = data_dir / "node-ed25519.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey), f"{path} is not an Ed25519 private key"
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    try:
        os.link(tmp, path)  # never overwrite a key another process created meanwhile
    except FileExistsError:
        os.unlink(tmp)
        return load_or_create(data_dir)
    os.unlink(tmp)
    return key


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data)).decode()


def verify(public: Ed25519PublicKey, data: bytes, signature_b64: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(base64.b64decode(signature_b64), data)
        return True
    except (InvalidSignature, ValueError):
        return False
