"""Faults of the object store: what ``dep.put`` cannot send, and lookups of objects lost with
their worker (on a real LocalCluster with worker processes)."""

from __future__ import annotations

import logging
import os
import signal
import threading

import numpy as np
import pytest

import flowkit as fk
from flowkit.runtime.store_worker import store_key

from .waiting import wait_until

SHORT_CONNECT_S = 5.0   # dask's default connect timeout is 30 s: the stall this file guards against


def _lookup_flow(name: str):
    flow = fk.Flow(name, {"key": str})
    lookup = flow.lookup("key", dynamic=True)
    return flow, lookup


# -- dep.put of what cannot be sent ----------------------------------------------------------

class _HoldsALock:
    def __init__(self):
        self.lock = threading.Lock()


class _HoldsALambda:
    def __init__(self):
        self.fn = lambda x: x + 1


def _stored_tasks(client, dep) -> list:
    prefix = f"flowkit-store/{dep.id}/"
    return [k for k in client.who_has() if str(k).startswith(prefix)]


@pytest.mark.parametrize("obj, type_name", [(threading.Lock(), "lock"), (_HoldsALock(), "_HoldsALock")])
def test_putting_an_unpicklable_object_raises_a_flow_error_naming_it_and_logs_nothing(client, obj, type_name,
                                                                                      caplog, capfd):
    flow, _ = _lookup_flow("unpicklable")
    with fk.deploy(flow, cluster=client) as dep:
        dep.put("kept", 1)
        capfd.readouterr()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="distributed"):
            with pytest.raises(fk.FlowError) as info:
                dep.put("the-key", obj)
        message = str(info.value)
        assert "'the-key'" in message and type_name in message and "pickle" in message
        assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
        assert capfd.readouterr().err == ""
        # nothing was sent: the cluster holds only the object put before
        assert _stored_tasks(client, dep) == [store_key(dep.id, "kept")]
        assert len(dep._stored) == 1

        # the failed put leaves an object already stored under that key in place
        dep.put("the-key", 2)
        with pytest.raises(fk.FlowError):
            dep.put("the-key", obj)
        assert dep.run({"key": ["the-key"]}, timeout=30).column("key_value") == [2]


def test_an_object_holding_a_lambda_is_stored_as_dask_sends_it_with_cloudpickle(client):
    flow, _ = _lookup_flow("lambda")
    with fk.deploy(flow, cluster=client) as dep:
        dep.put("f", _HoldsALambda())
        assert dep.run({"key": ["f"]}, timeout=30).column("key_value")[0].fn(1) == 2


# -- lookups of objects lost with their worker -----------------------------------------------

def _watch_the_worker():
    """In a worker process: record every connection it opens to another dask server (its own
    connection pools', and its deployments' sessions to peers), with the connect timeout asked
    for (None: dask's default, 30 s); and remember where stored objects live for an hour, as if
    the scheduler were slow to notice a worker die."""
    import distributed.core as core

    import flowkit.runtime.dial as dial
    import flowkit.runtime.store_worker as store

    store.HOLDERS_TTL_S = 3600.0
    if not hasattr(core, "flowkit_dials"):
        dials = core.flowkit_dials = []
        for module in (core, dial):
            def recording(connect):
                async def recording_connect(addr, timeout=None, **kwargs):
                    dials.append((addr, timeout))
                    return await connect(addr, timeout=timeout, **kwargs)
                return recording_connect
            module.connect = recording(module.connect)


def _dials():
    import distributed.core as core

    return list(getattr(core, "flowkit_dials", []))


def _told_of_removal(address, dask_worker):
    from flowkit.runtime.store_worker import removed_workers

    return address in removed_workers(dask_worker)


def _spread_objects(client, dep) -> tuple[str, str, list]:
    """Put six objects (restore=False) on the deployment's two workers: the worker holding
    ``k0`` (to be killed), the other one, and two keys held by the other one."""
    wait_until(lambda: len(dep.workers) == 2, "the deployment to reach both workers")
    client.run(_watch_the_worker)
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        dep.put(key, np.full(10, 1.0), restore=False)
    holder = {k: ws[0] for k, ws in client.who_has().items() if ws}
    victim = holder[store_key(dep.id, "k0")]
    elsewhere = [k for k in keys if holder[store_key(dep.id, k)] != victim]
    assert len(elsewhere) >= 2, holder
    return victim, holder[store_key(dep.id, elsewhere[0])], elsewhere[:2]


def _assert_lost_with_its_worker(error: fk.OperatorError, lookup) -> None:
    assert error.operator == lookup.name
    assert isinstance(error.original, KeyError) and "lost with the worker" in str(error.original)


@pytest.mark.parametrize("repeat", range(2))
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "never-connected"])
@pytest.mark.parametrize("noticed", [False, True], ids=["at-once", "once-the-scheduler-knows"])
def test_a_lookup_of_an_object_lost_with_its_worker_fails_at_once_without_dialling_it_for_long(make_cluster, noticed,
                                                                                              connected, repeat):
    """SIGKILL the worker holding an object (put with restore=False, so it stays lost): a lookup
    on a worker that still names the dead one as its holder fails with the "lost with its
    worker" error, and never waits on dask's 30 s connect timeout to find out (3 in 12 lookups
    did). ``connected``: the survivor has read from the dead worker before (a connection to it
    is pooled) or has only learned where the object lived (it must dial). ``noticed``: the
    lookup comes once the scheduler has removed the dead worker (its process is surely gone, so
    dialling it is refused: dask retries that for 30 s), or at once, racing its death."""
    client = make_cluster()   # its own: a worker restarted after SIGKILL may never come back on a loaded machine
    flow, lookup = _lookup_flow("lost")
    with fk.deploy(flow, cluster=client) as dep:
        victim, _, elsewhere = _spread_objects(client, dep)
        # Two of the request's three objects live on the survivor: it runs the lookup there,
        # remembering the victim as k0's holder, and reading k0 from it when ``connected``
        # (otherwise the request's first row, a key never put, ends it before k0 is read).
        request = {"key": ["k0", *elsewhere]}
        if connected:
            assert len(dep.run(request, timeout=60).column("key_value")) == 3
        else:
            with pytest.raises(fk.OperatorError):
                dep.run({"key": ["never-put", *request["key"]]}, timeout=60)

        os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
        if noticed:
            wait_until(lambda: victim not in client.scheduler_info()["workers"], "the scheduler to remove the victim")
        with pytest.raises(fk.OperatorError) as info:
            dep.run(request, timeout=120)
        _assert_lost_with_its_worker(info.value, lookup)

        for worker, dials in client.run(_dials).items():
            slow = [(addr, timeout) for addr, timeout in dials if addr == victim
                    and (timeout is None or timeout > SHORT_CONNECT_S)]
            assert slow == [], f"{worker} dialled the dead worker with a long connect timeout"


def _errors_on_worker(deployment: str, dask_worker) -> int:
    """How many stage runs of ``deployment`` failed on this worker."""
    snap = dask_worker._flowkit[deployment].snapshot()
    return sum(s["errors"] for stage, s in snap["stages"].items() if stage != "__store__")


@pytest.mark.parametrize("repeat", range(2))
def test_a_lookup_is_not_sent_to_a_worker_known_to_have_left(make_cluster, repeat):
    """A dynamic lookup runs on the worker holding its object. Once a worker has been told that
    the holder left the cluster, it does not send the lookup there (a session to a dead peer
    waited 3 x 10 s), nor dial it for the object: the lookup fails at once, "lost with its
    worker"."""
    client = make_cluster()
    flow, lookup = _lookup_flow("left")
    with fk.deploy(flow, cluster=client) as dep:
        victim, survivor, elsewhere = _spread_objects(client, dep)
        dep.run({"key": ["k0", *elsewhere]}, timeout=60)   # the survivor learns where k0 lives

        def errors_on_survivor() -> int:
            return client.run(_errors_on_worker, dep.id, workers=[survivor])[survivor]

        dialled, failed = len(client.run(_dials, workers=[survivor])[survivor]), errors_on_survivor()
        os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
        wait_until(lambda: client.run(_told_of_removal, victim, workers=[survivor])[survivor],
                   "the survivor to be told that the victim left")

        def a_lookup_of_k0_failed_on_the_survivor() -> bool:
            # k0's worker is gone: the request goes to the survivor or to the victim's replacement
            with pytest.raises(fk.OperatorError) as info:
                dep.run({"key": ["k0"]}, timeout=120)
            _assert_lost_with_its_worker(info.value, lookup)
            return errors_on_survivor() > failed

        wait_until(a_lookup_of_k0_failed_on_the_survivor, "a lookup of k0 to run on the survivor")
        after = client.run(_dials, workers=[survivor])[survivor][dialled:]
        assert [addr for addr, _ in after if addr == victim] == []
