"""HTTP Message Signatures (RFC 9421) on node-to-node requests.

Every request under ``/federation/v1`` carries ``Signature-Input`` and ``Signature`` over
the method, the path and query, and (when there is a body) the ``Content-Digest`` of the
body, with the parameters ``created``, ``keyid`` (the sending node's id), ``nonce`` and
``tag="egov-federation"``. The receiver

1. knows the key id: it names a configured peer, whose public key is pinned;
2. accepts the created time only within ``[federation] max_skew`` of its own clock;
3. checks the signature and that the body matches the signed digest;
4. refuses a nonce it has seen (replay), remembering nonces for twice the skew.

The algorithm follows the key: Ed25519 (``alg="ed25519"``), or SM2 with SM3 (国密) for a
node with ``[federation] algorithm = "sm2"``, ``alg="sm2-sm3"`` -- RFC 9421 registers no SM2
algorithm, so the identifier is this federation's own (the signature is ``r || s``, 64 bytes,
like RFC 9421's ECDSA; see :mod:`gateway.federation.sm2`). The receiver verifies with the
algorithm of the key it pinned for the sending node and refuses an ``alg`` that names another.

The signature itself is made and checked by the ``http-message-signatures`` library;
the policy (which key, which algorithm, how old, replay) is this module's.
"""
from __future__ import annotations

import base64
import datetime as dt
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import http_sf
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.algorithms import HTTPSignatureAlgorithm
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from gateway.federation.keys import NodeKey, PeerKey, algorithm_of
from gateway.federation.sm2 import SM2PrivateKey, SM2PublicKey

TAG = "egov-federation"
LABEL = "fed"
#: the node a request is for (signed; see Signer.sign)
TO_HEADER = "Gateway-To"
_WITH_BODY = ("@method", "@path", "@query", "content-digest")
_NO_BODY = ("@method", "@path", "@query")
#: the longest nonce a receiver remembers (this node's own are 24 characters)
MAX_NONCE = 64


class SignatureRejected(Exception):
    """Why a signed request was refused. ``kind`` becomes the problem type."""

    def __init__(self, kind: str, detail: str, key_id: str | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.key_id = kind, detail, key_id


class SM2_SM3(HTTPSignatureAlgorithm):
    """SM2 with SM3 (GB/T 32918.2, Z over the default ID ``1234567812345678``); the signature
    is ``r || s`` (64 bytes). ``sm2-sm3`` is not an RFC 9421 registered identifier."""

    algorithm_id = "sm2-sm3"

    def __init__(self, public_key: Any = None, private_key: Any = None) -> None:
        if public_key is not None and not isinstance(public_key, SM2PublicKey):
            raise HTTPMessageSignaturesException("Unexpected public key type")
        if private_key is not None and not isinstance(private_key, SM2PrivateKey):
            raise HTTPMessageSignaturesException("Unexpected private key type")
        self.public_key, self.private_key = public_key, private_key

    def sign(self, message: bytes) -> bytes:
        assert self.private_key is not None
        return self.private_key.sign(message)

    def verify(self, signature: bytes, message: bytes) -> None:
        assert self.public_key is not None
        self.public_key.verify(signature, message)


#: [federation] algorithm -> the RFC 9421 algorithm
ALGORITHMS: dict[str, type[HTTPSignatureAlgorithm]] = {"ed25519": algorithms.ED25519, "sm2": SM2_SM3}


def algorithm_for(key: NodeKey | PeerKey) -> type[HTTPSignatureAlgorithm]:
    return ALGORITHMS[algorithm_of(key)]


class _OneKey(HTTPSignatureKeyResolver):
    def __init__(self, key_id: str, private: NodeKey | None = None, public: PeerKey | None = None) -> None:
        self.key_id, self.private, self.public = key_id, private, public

    def resolve_private_key(self, key_id: str) -> NodeKey:
        assert key_id == self.key_id and self.private is not None
        return self.private

    def resolve_public_key(self, key_id: str) -> PeerKey | None:
        return self.public if key_id == self.key_id else None


@dataclass
class _Message:
    """The view of a request the library reads: method, full URL, headers."""

    method: str
    url: str
    headers: Any


class Signer:
    """Signs this node's requests with its key: Ed25519, or SM2 (``alg="sm2-sm3"``)."""

    def __init__(self, key_id: str, key: NodeKey) -> None:
        self.key_id = key_id
        self.algorithm = algorithm_for(key)
        self._signer = HTTPMessageSigner(signature_algorithm=self.algorithm,
                                         key_resolver=_OneKey(key_id, private=key))

    def sign(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
             created: dt.datetime | None = None, to: str | None = None) -> dict[str, str]:
        """Add the digest and signature headers to ``headers`` (and return it). ``to``: the
        node the request is for, sent as ``Gateway-To`` and signed, so that the request
        cannot be replayed to another node that pins the same key."""
        covered: tuple[str, ...] = _NO_BODY
        if to is not None:
            headers[TO_HEADER] = to
            covered = (*_NO_BODY, TO_HEADER.lower())
        msg = _Message(method.upper(), url, headers)
        # with a body the library adds Content-Digest and covers it
        self._signer.sign(msg, key_id=self.key_id, covered_component_ids=covered, body=body or None,
                          created=created or dt.datetime.now(dt.UTC), nonce=secrets.token_urlsafe(18),
                          label=LABEL, tag=TAG, include_alg=True)
        return headers


#: a node's answer to a signed request: its signature over the request's nonce, ".", and the
#: answer's body, so that nobody between the nodes can change an answer or give an old one
ANSWER_HEADER = "Gateway-Answer-Signature"


def answer_signature(key: NodeKey, nonce: str, body: bytes) -> str:
    return base64.b64encode(key.sign(nonce.encode() + b"." + body)).decode("ascii")


def answer_verifies(public: PeerKey, nonce: str, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    try:
        public.verify(base64.b64decode(header, validate=True), nonce.encode() + b"." + body)
        return True
    except Exception:  # noqa: BLE001 - InvalidSignature, bad base64, a wrong length: all "no"
        return False


def nonce_of(headers: Mapping[str, str]) -> str:
    """The nonce of a request this node signed (see :meth:`Signer.sign`)."""
    parsed = http_sf.parse(headers["Signature-Input"].encode(), tltype="dictionary")
    return str(dict(parsed[LABEL][1])["nonce"])  # type: ignore[index, call-overload, arg-type]


@dataclass
class Verified:
    key_id: str
    nonce: str
    created: dt.datetime


def verify(method: str, url: str, headers: Mapping[str, str] | Any, body: bytes, *,
           keys: Callable[[str], PeerKey | None], max_skew: float,
           now: dt.datetime | None = None, node_id: str | None = None,
           require_to: bool = False) -> Verified:
    """Check a request's signature against the pinned key of the peer it names; with
    ``node_id``, that it was signed for this node (``require_to``: that it names one at all). Raises
    :class:`SignatureRejected` (kinds: bad-signature, unknown-key, stale-request). Replay
    (the nonce) is checked by the caller, which owns the nonce store."""
    now = now or dt.datetime.now(dt.UTC)
    raw = headers.get("Signature-Input")
    if not raw or not headers.get("Signature"):
        raise SignatureRejected("bad-signature", "the request is not signed: Signature-Input and Signature "
                                "headers (RFC 9421) are required on /federation/v1")
    try:
        parsed = http_sf.parse(raw.encode(), tltype="dictionary")
        signatures = http_sf.parse(str(headers.get("Signature")).encode(), tltype="dictionary")
        assert isinstance(parsed, dict) and isinstance(signatures, dict)
        entry = parsed[LABEL]
        params: dict[str, Any] = dict(entry[1])  # type: ignore[index, arg-type]
    except Exception:  # noqa: BLE001 - any parse failure is the same answer
        raise SignatureRejected("bad-signature", f"Signature-Input is malformed or has no {LABEL!r} "
                                "signature") from None
    # Exactly one signature, ours: with a second label, the parameters read here (a fresh
    # nonce) could belong to one signature while another (a captured one) is what verifies.
    if set(parsed) != {LABEL} or set(signatures) != {LABEL}:
        raise SignatureRejected("bad-signature", f"expected exactly one signature, labelled {LABEL!r}; got "
                                f"{', '.join(sorted(map(str, set(parsed) | set(signatures))))}")
    key_id, created, nonce = params.get("keyid"), params.get("created"), params.get("nonce")
    if not isinstance(key_id, str) or not isinstance(created, int) or not isinstance(nonce, str) or not nonce:
        raise SignatureRejected("bad-signature", "the signature must carry keyid, created and nonce parameters")
    public = keys(key_id)
    if public is None:
        raise SignatureRejected("unknown-key", f"key id {key_id!r} is not a peer of this node; its public key "
                                "must be pinned in [peers] first", key_id)
    if len(nonce) > MAX_NONCE:  # the replay store keeps no longer one (FederationNonce.nonce)
        raise SignatureRejected("bad-signature", f"the signature's nonce is {len(nonce)} characters long; at most "
                                f"{MAX_NONCE} are accepted", key_id)
    algorithm = algorithm_for(public)
    alg = params.get("alg")
    if alg is not None and alg != algorithm.algorithm_id:
        raise SignatureRejected("bad-signature", f"the signature of node {key_id!r} names alg={alg!r}, but the "
                                f"public key pinned for it is {algorithm_of(public)} ({algorithm.algorithm_id!r}); "
                                f"its [federation] algorithm and the key pinned for it in [peers] must agree",
                                key_id)
    skew = created - now.timestamp()
    if abs(skew) > max_skew:
        raise SignatureRejected("stale-request", f"the request was signed at {_iso(created)}, "
                                f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} this node's clock "
                                f"({now.isoformat(timespec='seconds')}); at most {max_skew:.0f} s is accepted. "
                                "Check the clocks (NTP) of both nodes", key_id)
    verifier = HTTPMessageVerifier(signature_algorithm=algorithm,
                                   key_resolver=_OneKey(key_id, public=public))
    verifier.max_clock_skew = dt.timedelta(seconds=max_skew)
    try:
        results = verifier.verify(_Message(method.upper(), url, dict(headers)), max_age=dt.timedelta(seconds=max_skew),
                                  expect_tag=TAG, expect_label=LABEL,
                                  require_components=_WITH_BODY if body else _NO_BODY, body=body)
    except (InvalidSignature, HTTPMessageSignaturesException) as exc:
        why = str(exc) or ("the signature does not match the request (its method, path, query or body "
                           "changed on the way, or another key made it: if that node made a new node key, "
                           f"pin it here as [peers.{key_id}] public_key, the output of 'gateway federation "
                           "key' there)")
        raise SignatureRejected("bad-signature", f"the signature of node {key_id!r} does not verify: {why}",
                                key_id) from None
    got = [dict(r.parameters) for r in results]
    if len(got) != 1 or (got[0].get("keyid"), got[0].get("created"), got[0].get("nonce")) != (key_id, created, nonce):
        raise SignatureRejected("bad-signature", "the verified signature is not the one whose parameters were "
                                "read", key_id)
    # A request signed for a node says so (Gateway-To, covered): it is refused by any other
    # node that pins the same key. (Older senders sign no target; a captured request that has
    # one cannot lose it without breaking its signature.)
    to = headers.get(TO_HEADER)
    if to is None and node_id is not None and require_to:
        raise SignatureRejected("bad-signature", f"the request names no target node ({TO_HEADER}, signed); "
                                f"a sender from before 2026-11 must be upgraded, or this node set "
                                f"[federation] accept_untargeted = true meanwhile", key_id)
    if to is not None and node_id is not None:
        signed_to = results[0].covered_components.get(f'"{TO_HEADER.lower()}"')
        if signed_to is None:
            raise SignatureRejected("bad-signature", f"{TO_HEADER} is not covered by the signature", key_id)
        if signed_to != node_id:
            raise SignatureRejected("bad-signature", f"the request was signed for node {signed_to!r}, not this "
                                    f"node ({node_id!r})", key_id)
    return Verified(key_id, nonce, dt.datetime.fromtimestamp(created, dt.UTC))


def _iso(ts: int) -> str:
    """A signature's ``created`` as a time, or as the number it is when no calendar has it
    (year 10000 and later, before year 1: a peer's bug, refused as stale, never a 500)."""
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts} (seconds since 1970, beyond any calendar date)"
