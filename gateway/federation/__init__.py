"""Federation: nodes exchanging messages, receipts and status node to node
(operators' guide: docs/federation.md).

* :mod:`.keys`, :mod:`.sm2` – this node's key pair (Ed25519, or SM2) and the peers' pinned keys;
* :mod:`.signing` – HTTP Message Signatures (RFC 9421) on every ``/federation/v1`` request;
* :mod:`.client` – signed requests to a peer; :mod:`.state` – per-process federation state;
* :mod:`.transfer` – what travels (a forward, a status report, a recall) and what each side does;
* :mod:`.api` – the receiving side (``/federation/v1/...``);
* :mod:`.directory` – the signed directory the prefecture publishes and counties route by;
* :mod:`.batch` – batches for links up only part of the time (``push``/``pull`` jobs);
* :mod:`.ferry` – batches as signed files across an isolation device (``ferry-out``/``ferry-in``);
* :mod:`.reconcile` – compare forwarded copies with each peer and repair gaps;
* :mod:`.jobs` – registers the federation's scheduled jobs.
"""


class NoPeers(RuntimeError):
    """A federation job run on a node with none of the peers it works for: a schedule or a
    ``gateway sync`` that can never do anything is a configuration mistake, not a success."""


def require_peers(found: list[str], what: str) -> list[str]:
    """``found``, or NoPeers saying which peers the job needs."""
    if not found:
        raise NoPeers(f"this node has no {what}; configure one under [peers.ID], or remove the job's schedule")
    return found
