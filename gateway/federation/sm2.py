"""SM2 (国密, GB/T 32918) node keys and signatures, through ``tongsuopy`` (Tongsuo).

Signatures are SM2 with SM3 as GB/T 32918.2 and GM/T 0009 define them: the signed value is
``e = SM3(Z || M)`` with ``Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)`` and the
default distinguishing ID ``1234567812345678``. Tongsuo computes Z itself when an SM2 key signs
with SM3 (``EVP_DigestSign``); the tests check this against the known-answer example of
GB/T 32918.5-2017 and against an independent implementation (``gmssl``).

Encodings:

* a signature is ``r || s``, each 32 bytes big-endian (64 bytes), the way RFC 9421 encodes
  ECDSA signatures; not DER;
* a private key is PKCS#8 PEM (``id-ecPublicKey`` with the SM2 curve, OID 1.2.156.10197.1.301,
  as Tongsuo and OpenSSL write it);
* a public key is the 65-byte uncompressed point ``04 || x || y`` (``sm2:<base64>`` in a
  configuration) or SubjectPublicKeyInfo PEM.

The classes give tongsuopy's keys the interface of ``cryptography``'s Ed25519 keys
(``sign(data) -> bytes``; ``verify(signature, data)`` raising
:class:`cryptography.exceptions.InvalidSignature`; ``public_key()``), so code written for a
node key works with either kind.
"""
from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tongsuopy.crypto import hashes, serialization
from tongsuopy.crypto.asymciphers import ec
from tongsuopy.crypto.asymciphers.utils import encode_dss_signature
from tongsuopy.crypto.exceptions import InvalidSignature as _TongsuoInvalidSignature
from tongsuopy.crypto.exceptions import UnsupportedAlgorithm as _TongsuoUnsupported

#: the order of the SM2 curve's base point
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
#: GB/T 32918.2 / GM/T 0009 default user ID, used in Z
DEFAULT_ID = b"1234567812345678"
POINT_SIZE = 65
SIGNATURE_SIZE = 64


def _algorithm() -> Any:
    return ec.ECDSA(hashes.SM3())  # with an SM2 key: SM2 with SM3, Z over the default ID


class SM2PublicKey:
    """An SM2 public key; ``verify`` checks a 64-byte ``r || s`` signature."""

    __slots__ = ("_key",)

    def __init__(self, key: Any) -> None:
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SM2):
            raise ValueError(f"not an SM2 public key ({type(key).__name__})")
        self._key = key

    @classmethod
    def from_point(cls, data: bytes) -> SM2PublicKey:
        if len(data) != POINT_SIZE or data[0] != 4:
            raise ValueError(f"expected the {POINT_SIZE}-byte uncompressed point 04||x||y, got {len(data)} bytes")
        return cls(ec.EllipticCurvePublicKey.from_encoded_point(ec.SM2(), data))

    @classmethod
    def from_pem(cls, pem: bytes) -> SM2PublicKey:
        try:
            key = serialization.load_pem_public_key(pem)
        except _TongsuoUnsupported as exc:
            raise ValueError(f"not an SM2 public key ({exc})") from None
        return cls(key)

    def point(self) -> bytes:
        """The 65-byte uncompressed point ``04 || x || y``."""
        return bytes(self._key.public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint))

    def pem(self) -> str:
        return bytes(self._key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)).decode()

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` (``r || s``) is this key's SM2-with-SM3 signature of
        ``data``; raise :class:`cryptography.exceptions.InvalidSignature` otherwise."""
        if len(signature) != SIGNATURE_SIZE:
            raise InvalidSignature(f"an SM2 signature is {SIGNATURE_SIZE} bytes (r||s), not {len(signature)}")
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        if not (0 < r < N and 0 < s < N):
            raise InvalidSignature("r or s is out of range")
        try:
            self._key.verify(encode_dss_signature(r, s), data, _algorithm())
        except _TongsuoInvalidSignature:
            raise InvalidSignature() from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SM2PublicKey) and other.point() == self.point()

    def __hash__(self) -> int:
        return hash(self.point())

    def __repr__(self) -> str:
        return f"<SM2PublicKey {self.point()[1:9].hex()}…>"


class SM2PrivateKey:
    """An SM2 private key; ``sign`` gives a 64-byte ``r || s`` signature."""

    __slots__ = ("_key",)

    def __init__(self, key: Any) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SM2):
            raise ValueError(f"not an SM2 private key ({type(key).__name__})")
        self._key = key

    @classmethod
    def generate(cls) -> SM2PrivateKey:
        return cls(ec.generate_private_key(ec.SM2()))

    @classmethod
    def from_pem(cls, pem: bytes) -> SM2PrivateKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except _TongsuoUnsupported as exc:
            raise ValueError(f"not an SM2 private key ({exc})") from None
        return cls(key)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the file's mode protects it, as for the Ed25519 key)."""
        return bytes(self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))

    def public_key(self) -> SM2PublicKey:
        return SM2PublicKey(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(bytes(self._key.sign(data, _algorithm())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"<SM2PrivateKey of {self.public_key()!r}>"
