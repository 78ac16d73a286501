"""The sync jobs of a batch link (``gateway sync push`` / ``pull``, separate processes on
loopback, as in tests/test_federation_sync.py) killed with SIGKILL (tests/crashpoint.py)
between taking a batch and handing it over: the next run carries that batch first, so the
documents of a conversation (初报, 续报 …) still arrive once each and in order, without
waiting for the killed run's lease to run out. The ferry jobs (as in tests/test_ferry.py)
killed between writing or applying a file and recording it: nothing lost, nothing twice."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from adapters.simulators.cluster import CITY_B, PREFECTURE, REPO, Cluster, NodeProc
from gateway.models import Message
from tests.test_federation import rows, send, statuses
from tests.test_federation_sync import sync
from tests.test_ferry import carry


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("crash-sync"), links={("prefecture", "county-b"): "batch"})
    try:
        c.start()
        yield c
    finally:
        c.close()


def killed(node: NodeProc, job: str, crash: str) -> None:
    """``gateway sync JOB`` on ``node``, killed at the crash point ``crash``."""
    r = subprocess.run([sys.executable, "-m", "tests.crashpoint", "-c", str(node.config_path), "sync", job],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_TEST_CRASH": crash})
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]


def arrived(node: NodeProc, mids: list[str]) -> list[str]:
    return [m for (m,) in rows(node, select(Message.id).where(Message.id.in_(mids)).order_by(Message.accepted_at))]


def test_a_push_killed_after_taking_its_batch_is_carried_first_by_the_next_push(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    conv = f"conv-push-{time.time_ns()}"
    first = send(pref, PREFECTURE, (CITY_B,), title="推送中断初报", conversation_id=conv)
    killed(pref, "push", "push-claimed:1")
    assert arrived(b, [first]) == []
    second = send(pref, PREFECTURE, (CITY_B,), title="推送中断续报一", conversation_id=conv)
    assert sync(pref, "push")["outcome"] == "ok"
    assert arrived(b, [first, second]) == [first, second]  # once each, in order


def test_a_pull_killed_after_fetching_its_batch_gets_that_batch_first_on_the_next_pull(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    conv = f"conv-pull-{time.time_ns()}"
    first = send(b, CITY_B, (PREFECTURE,), title="拉取中断初报", conversation_id=conv)
    killed(pref, "pull", "pull-fetched:1")
    assert arrived(pref, [first]) == []
    second = send(b, CITY_B, (PREFECTURE,), title="拉取中断续报一", conversation_id=conv)
    assert sync(pref, "pull")["outcome"] == "ok"
    assert arrived(pref, [first, second]) == [first, second]  # once each, in order


@pytest.fixture(scope="module")
def ferry_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    side = {"url": "", "ferry_settle": 0}
    c = Cluster(tmp_path_factory.mktemp("crash-ferry"), links={("prefecture", "county-b"): "ferry"},
                peer_settings={("county-b", "prefecture"): side, ("prefecture", "county-b"): side})
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_ferry_jobs_killed_before_recording_a_file_lose_nothing_and_apply_nothing_twice(ferry_cluster: Cluster) -> None:
    """``ferry-out`` killed once its file is written (the device carries it all the same) and
    before it recorded the file's number, which the next file then takes again;
    ``ferry-in`` killed after applying a file and before recording it as imported. Both
    documents of the conversation arrive once, in order, are delivered once at county B's
    legacy system, and their statuses come back on the return ferry."""
    c = ferry_cluster
    pref, b = c.nodes["prefecture"], c.nodes["county-b"]
    conv = f"conv-ferry-{time.time_ns()}"
    first = send(pref, PREFECTURE, (CITY_B,), title="摆渡中断初报", conversation_id=conv)
    killed(pref, "ferry-out", "ferry-written:1")
    assert carry(c, "prefecture", "county-b")
    killed(b, "ferry-in", "batch-applied:1")
    second = send(pref, PREFECTURE, (CITY_B,), title="摆渡中断续报一", conversation_id=conv)
    assert sync(pref, "ferry-out")["outcome"] == "ok"
    assert carry(c, "prefecture", "county-b")
    assert sync(b, "ferry-in")["outcome"] == "ok"
    assert arrived(b, [first, second]) == [first, second]
    deadline = time.monotonic() + 60
    while {statuses(pref, m)[CITY_B]["status"] for m in (first, second)} != {"signed"}:
        assert time.monotonic() < deadline, [statuses(pref, m)[CITY_B] for m in (first, second)]
        time.sleep(0.3)
        sync(b, "ferry-out")
        carry(c, "county-b", "prefecture")
        sync(pref, "ferry-in")
    docs = [d for d in b.soap.state.all_documents() if d.title.startswith("摆渡中断")]
    assert sorted(d.title for d in docs) == ["摆渡中断初报", "摆渡中断续报一"]
