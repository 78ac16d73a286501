"""A node's answers to signed requests are signed too, over the request's nonce and the body:
an answer changed or made up between the nodes (http:// links, a proxy) is refused."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from adapters.base import RetryableError
from gateway import config as config_mod
from gateway import nodekey
from gateway.federation.client import PeerClient
from gateway.federation.keys import peer_key, public_text
from gateway.federation.signing import ANSWER_HEADER, answer_signature, nonce_of

Answer = Callable[[Request, bytes], tuple[bytes, dict[str, str]]]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[Path, list[Answer], str]]:
    """A stand-in peer: answers each request with what the first function in ``how`` says."""
    how: list[Answer] = []

    @Request.application
    def app(request: Request) -> Response:
        body, headers = how[0](request, b'{"node": "county-a", "ok": true}')
        return Response(body, mimetype="application/json", headers=headers)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "peer").mkdir()
    key_dir = tmp_path / "peer"
    try:
        yield key_dir, how, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _client(tmp_path: Path, key_dir: Path, url: str) -> PeerClient:
    pub = public_text(nodekey.load_or_create(key_dir))
    cfg = config_mod.from_mapping({"node": {"id": "prefecture", "data_dir": str(tmp_path / "var")},
                                   "peers": {"county-a": {"url": url, "public_key": pub}}})
    return PeerClient(cfg, lambda peer: peer_key(cfg, peer, cfg.peers[peer]))


def test_only_an_answer_signed_by_the_peer_over_this_requests_nonce_is_taken(tmp_path, peer) -> None:
    key_dir, how, url = peer
    client = _client(tmp_path, key_dir, url)
    key = nodekey.load_or_create(key_dir)

    def signed(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        return body, {ANSWER_HEADER: answer_signature(key, nonce_of(request.headers), body)}

    how[:] = [signed]
    assert client.post("county-a", "/ping", {}) == {"node": "county-a", "ok": True}
    assert client.get_json("county-a", "/ping")["ok"] is True

    def unsigned(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        return body, {}

    def changed(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        good = signed(request, body)[1]
        return body.replace(b"true", b"false"), good

    def replayed(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:  # signed for another request
        return body, {ANSWER_HEADER: answer_signature(key, "some-other-nonce", body)}

    def other_key(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return body, {ANSWER_HEADER: answer_signature(Ed25519PrivateKey.generate(), nonce_of(request.headers), body)}

    for bad in (unsigned, changed, replayed, other_key):
        how[:] = [bad]
        with pytest.raises(RetryableError, match="not signed with the key pinned"):
            client.post("county-a", "/ping", {})
        with pytest.raises(RetryableError, match="not signed with the key pinned"):
            client.get_json("county-a", "/ping")
    client.close()


def test_a_peer_with_a_new_node_key_is_named_as_a_cause_on_both_sides(tmp_path, peer) -> None:
    """Key rotation (docs/federation.md): a node that made a new key is refused by the peers
    that pinned the old one, and the messages on both sides say what to compare and re-pin,
    not only that something between the nodes may be changing traffic."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.federation.signing import SignatureRejected, Signer, verify

    key_dir, how, url = peer
    client = _client(tmp_path, key_dir, url)
    new_key = Ed25519PrivateKey.generate()  # county-a moved its key away and made a new one
    how[:] = [lambda request, body: (body, {ANSWER_HEADER: answer_signature(new_key, nonce_of(request.headers),
                                                                            body)})]
    with pytest.raises(RetryableError) as answer:
        client.post("county-a", "/ping", {})
    client.close()
    assert "new node key" in str(answer.value) and "gateway federation key" in str(answer.value)
    assert "[peers.county-a] public_key" in str(answer.value)

    old = nodekey.load_or_create(key_dir)
    target = "http://127.0.0.1:8440/federation/v1/ping"
    headers = Signer("county-a", new_key).sign("GET", target, {}, None, to="prefecture")
    with pytest.raises(SignatureRejected) as request:
        verify("GET", target, headers, b"", keys=lambda k: old.public_key() if k == "county-a" else None,
               max_skew=300, node_id="prefecture")
    assert request.value.kind == "bad-signature"
    assert "[peers.county-a] public_key" in request.value.detail and "gateway federation key" in request.value.detail
