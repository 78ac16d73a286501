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
