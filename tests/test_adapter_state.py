"""Adapters' durable state (gateway.node.DbStateStore): poll cursors and high-water marks
that several instances of a node share through one database."""
from __future__ import annotations

import threading

from gateway.node import DbStateStore, Node


def test_a_high_water_mark_never_moves_back_and_set_still_overwrites(gw_node):  # type: ignore[no-untyped-def]
    state = DbStateStore(gw_node.db, "docexchange")
    assert state.get("receipts.cursor") is None
    state.advance("receipts.cursor", 7)
    state.advance("receipts.cursor", 5)  # an instance that read an older cursor acks late
    assert state.get("receipts.cursor") == "7"
    state.advance("receipts.cursor", 12)
    assert state.get("receipts.cursor") == "12"
    state.set("receipts.cursor", "3")  # set is a plain write
    assert state.get("receipts.cursor") == "3"
    assert DbStateStore(gw_node.db, "other").get("receipts.cursor") is None  # per adapter


def test_two_instances_writing_a_keys_first_value_at_once_both_succeed(gw_node):  # type: ignore[no-untyped-def]
    """Two nodes (two engines, as two processes have) advance fresh keys at the same instant:
    on PostgreSQL both INSERT the first row, and the loser used to fail its poll round with a
    unique violation. Now it finds the winner's row and keeps the higher value."""
    other = Node(gw_node.config)
    try:
        stores = (DbStateStore(gw_node.db, "box"), DbStateStore(other.db, "box"))
        errors: list[BaseException] = []
        for round_ in range(12):
            key = f"mark.{round_}"
            gate = threading.Barrier(2)

            def run(store: DbStateStore, value: int, key: str = key, gate: threading.Barrier = gate) -> None:
                gate.wait()
                try:
                    store.advance(key, value)
                except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(s, v)) for s, v in zip(stores, (100 + round_, 200 + round_))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert stores[0].get(key) == str(200 + round_)
        assert errors == []
    finally:
        other.close()
