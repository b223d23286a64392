"""Each use flowkit makes of dask internals (``flowkit/runtime/compat.py``), checked against
the installed ``distributed``: when an upgrade breaks one, it fails here by name."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flowkit.runtime import compat

from .waiting import wait_until


def test_address_host():
    assert compat.address_host("tcp://10.0.0.5:4000") == "10.0.0.5"


def _worker_facts(dask_worker):
    return compat.worker_threads(dask_worker), compat.worker_resources(dask_worker)


def test_worker_threads_and_resources_and_setting_them(client):
    facts = client.run(_worker_facts)
    assert all(threads == 1 for threads, _ in facts.values())
    address = sorted(facts)[0]

    async def declare(dask_worker):
        await compat.set_worker_resources(dask_worker, GPU=1)

    client.run(declare, workers=[address])
    try:
        assert client.run(_worker_facts, workers=[address])[address][1].get("GPU") == 1
        wait_until(lambda: client.scheduler_info()["workers"][address]["resources"].get("GPU") == 1,
                   "the scheduler to see the declared resource")
    finally:
        async def undeclare(dask_worker):
            await compat.set_worker_resources(dask_worker, GPU=0)

        client.run(undeclare, workers=[address])


def _serve_echo(dask_worker):
    async def echo(comm, text=None):
        await comm.write({"echo": text})
        return compat.DONT_REPLY

    compat.add_handler(dask_worker, "flowkit_test_echo", echo)


def test_a_handler_added_to_the_workers_server_answers_on_its_own(client):
    import asyncio

    from distributed.comm import connect

    client.run(_serve_echo)
    address = sorted(client.scheduler_info()["workers"])[0]

    async def call():
        comm = await connect(address)
        try:
            await comm.write({"op": "flowkit_test_echo", "text": "hi", "reply": False})
            return await comm.read()
        finally:
            await comm.close()

    assert asyncio.run(call()) == {"echo": "hi"}


def _data_and_loop(key):
    """In a task (a thread of the worker, off its event loop): is ``key`` here, and who has it
    (asked of the scheduler on the worker's loop)."""
    from distributed import get_worker

    worker = get_worker()

    async def where():
        return await compat.scheduler_who_has(worker, [key])

    return key in compat.stored_data(worker), compat.run_on_worker_loop(worker, where, 30)


def test_stored_data_who_has_and_running_on_the_workers_loop(client):
    future = client.scatter({"flowkit-test-key": np.arange(3)}, hash=False)["flowkit-test-key"]
    holder = client.who_has([future])["flowkit-test-key"][0]
    workers = sorted(client.scheduler_info()["workers"])
    answers = {a: client.submit(_data_and_loop, "flowkit-test-key", workers=[a], pure=False).result(60)
               for a in workers}
    assert {a: here for a, (here, _) in answers.items()} == {a: a == holder for a in workers}
    assert all(list(who["flowkit-test-key"]) == [holder] for _, who in answers.values())
    assert compat.task_known(client, "flowkit-test-key")
    del future
    wait_until(lambda: not compat.task_known(client, "flowkit-test-key"), "the scheduler to forget the key")


def test_fetching_data_from_another_worker_and_from_a_dead_address(client):
    future = client.scatter({"flowkit-test-fetch": np.arange(4)}, hash=False)["flowkit-test-fetch"]
    holder = client.who_has([future])["flowkit-test-fetch"][0]
    other = next(a for a in client.scheduler_info()["workers"] if a != holder)

    async def fetch(dask_worker, address):
        try:
            resp = await compat.fetch_data(dask_worker, address, ["flowkit-test-fetch"], 2.0)
            return resp["status"], list(resp["data"]["flowkit-test-fetch"])
        except OSError as e:
            return "unreachable", type(e).__name__

    assert client.run(fetch, address=holder, workers=[other])[other] == ("OK", [0, 1, 2, 3])
    status, _ = client.run(fetch, address="tcp://127.0.0.1:9", workers=[other])[other]
    assert status == "unreachable"


def test_the_schedulers_workers_seen_from_a_worker(client):
    async def workers(dask_worker):
        return sorted(await compat.scheduler_workers(dask_worker))

    seen = client.run(workers)
    assert all(v == sorted(client.scheduler_info()["workers"]) for v in seen.values())


def test_noting_a_removed_worker(make_cluster):
    from distributed import Client

    cluster = make_cluster(n_workers=2, client=False)
    with Client(cluster) as c:
        def note(dask_worker):
            dask_worker.flowkit_test_removed = []
            compat.on_worker_removed(dask_worker, dask_worker.flowkit_test_removed.append)

        c.run(note)
        keep, leave = sorted(c.scheduler_info()["workers"])
        c.retire_workers([leave])
        wait_until(lambda: leave in c.run(lambda dask_worker: list(dask_worker.flowkit_test_removed),
                                          workers=[keep])[keep], "the other worker to be told of the removal")


def test_a_workers_heartbeat_kept_at_least_so_long_and_given_back_to_the_scheduler(make_cluster):
    client = make_cluster(n_workers=1)

    async def beat(dask_worker, seconds):   # set the floor, then one heartbeat (the scheduler answers it)
        if seconds != "keep":
            compat.heartbeat_at_least(dask_worker, seconds)
        await dask_worker.periodic_callbacks["heartbeat"].callback()
        return compat.heartbeat_ms(dask_worker)

    (dasks,) = client.run(beat, seconds="keep").values()
    assert dasks < 3000   # the scheduler's interval (dask: 500 ms for one worker)
    assert list(client.run(beat, seconds=3.0).values()) == [3000]   # kept, whatever the scheduler answered
    assert list(client.run(beat, seconds="keep").values()) == [3000]
    assert list(client.run(beat, seconds=None).values()) == [dasks]   # the scheduler's again


def test_checking_that_an_object_can_be_sent(client):
    compat.check_serializable(client, {"a": np.arange(3)})
    with pytest.raises(Exception):
        compat.check_serializable(client, threading.Lock())
