"""Signed requests from this node to its peers (``/federation/v1/...``)."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import requests

from adapters.base import PermanentError, RetryableError
from gateway.config import Config
from gateway.federation import keys
from gateway.federation.signing import ANSWER_HEADER, Signer, answer_verifies, nonce_of

PREFIX = "/federation/v1"
#: the code of a RetryableError that says the peer gave no answer at all (no connection, a
#: timeout): the link or the node is down
UNREACHABLE = "unreachable"
#: codes of errors that say the peer cannot be reached now: no answer, or a 502/503/504 (a
#: proxy before it, or the node itself while its database is away)
UNREACHABLE_CODES = frozenset({UNREACHABLE, "502", "503", "504"})


class PeerClient:
    """One per process; thread-safe (a requests session per thread)."""

    def __init__(self, config: Config, pinned: Callable[[str], keys.PeerKey | None]) -> None:
        """``pinned``: the public key pinned for a peer (``Federation.peer_key``), which its
        answers must be signed with."""
        self.config = config
        self.node_id = config.node.id
        self._signer = Signer(self.node_id, keys.own_key(config))
        self._local = threading.local()
        self._pinned = pinned

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False  # a proxy from the environment must not sit between nodes
        return s

    def url(self, peer: str, path: str) -> str:
        p = self.config.peers.get(peer)
        if p is None:
            raise PermanentError(f"node {peer!r} is not a peer of this node")
        if not p.url:
            raise PermanentError(f"peer {peer!r} has no URL (its link is {p.link})")
        return p.url.rstrip("/") + PREFIX + path

    def post(self, peer: str, path: str, payload: Any) -> dict:
        url = self.url(peer, path)
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = self._signer.sign("POST", url, {"Content-Type": "application/json"}, body, to=peer)
        try:
            r = self._session().post(url, data=body, headers=headers, timeout=self.config.peers[peer].timeout)
        except requests.RequestException as exc:
            raise RetryableError(f"node {peer}: {type(exc).__name__}: {exc}", code=UNREACHABLE) from None
        return _answer(peer, r, partial(self._verify_answer, peer, nonce_of(headers)))

    def _verify_answer(self, peer: str, nonce: str, r: requests.Response) -> None:
        """An answer of ``peer`` to the request with ``nonce`` must be signed with the key
        pinned for the peer (an answer changed or made up on the way is refused, and retried:
        the link, not the peer, is at fault)."""
        public = self._pinned(peer)
        if public is None or not answer_verifies(public, nonce, r.content, r.headers.get(ANSWER_HEADER)):
            raise RetryableError(f"node {peer}: its answer is not signed with the key pinned for it "
                                 f"({ANSWER_HEADER}): either node {peer} has a new node key (compare 'gateway "
                                 f"federation key' there with [peers.{peer}] public_key here, and pin the new "
                                 f"one), or something between the nodes is changing answers")

    @contextmanager
    def _get(self, peer: str, path: str) -> Iterator[tuple[requests.Response, str]]:
        """A signed GET, streamed; yields the answer and the request's nonce."""
        url = self.url(peer, path)
        headers = self._signer.sign("GET", url, {}, None, to=peer)
        try:
            r = self._session().get(url, headers=headers, stream=True, timeout=self.config.peers[peer].timeout)
        except requests.RequestException as exc:
            raise RetryableError(f"node {peer}: {type(exc).__name__}: {exc}", code=UNREACHABLE) from None
        try:
            if r.status_code != 200:
                _answer(peer, r)
            yield r, nonce_of(headers)
        finally:
            r.close()

    @contextmanager
    def get_stream(self, peer: str, path: str) -> Iterator[requests.Response]:
        with self._get(peer, path) as (r, _):
            yield r

    def get_json(self, peer: str, path: str) -> dict:
        with self._get(peer, path) as (r, nonce):
            return _answer(peer, r, partial(self._verify_answer, peer, nonce))

    def close(self) -> None:
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()


def _answer(peer: str, r: requests.Response, check: Callable[[requests.Response], None] | None = None) -> dict:
    if r.status_code < 300:
        if check is not None:
            check(r)
        try:
            body = r.json()
        except ValueError:
            raise RetryableError(f"node {peer}: answered HTTP {r.status_code} without JSON") from None
        return body if isinstance(body, dict) else {"items": body}
    try:
        problem = r.json()
        detail = f"{problem.get('type', '')}: {problem.get('detail', '')}"
    except ValueError:
        detail = r.text[:300]
    msg = f"node {peer} answered HTTP {r.status_code}: {detail}"
    # 4xx (apart from timeouts, rate limits and clock trouble) will not pass by retrying
    if 400 <= r.status_code < 500 and r.status_code not in (408, 425, 429) and "stale-request" not in detail:
        raise PermanentError(msg, code=str(r.status_code))
    raise RetryableError(msg, code=str(r.status_code))
