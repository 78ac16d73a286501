"""Federation: nodes exchanging messages, receipts and status node to node.

* :mod:`.keys` – this node's key pair and its peers' pinned public keys;
* :mod:`.signing` – HTTP Message Signatures (RFC 9421) on every ``/federation/v1`` request;
* :mod:`.client` – signed requests to a peer;
* :mod:`.transfer` – what travels: a message for some units of the next node, status back;
* :mod:`.api` – the receiving side (``/federation/v1/...``).
"""
