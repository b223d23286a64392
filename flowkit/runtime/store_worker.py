"""Stored objects on workers: ``dep.put(key, obj)`` holds them as dask data; lookups read them.

A worker reads an object from its own dask memory when it is there (a local lookup), else fetches
it from the worker that holds it (a remote lookup); one request reads each key once, however many
rows use it.

Where objects live is remembered for ``HOLDERS_TTL_S``, so a holder may have died since it was
named. dask's own fetch would dial it with the 30 s connect timeout, and dask's ``connect``
retries a refused connection until that timeout passes: a lookup of an object lost with its
worker stalled 30 s. So a remembered answer naming a worker that has since left the cluster
(the scheduler tells every worker) is asked again, and a holder is dialled with
``CONNECT_TIMEOUT_S``: one that cannot be reached (dead, and not yet known to be) sends the
lookup back to the scheduler, which soon names no holder: "lost with the worker that held it".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

from .compat import fetch_data, on_worker_removed, run_on_worker_loop, scheduler_who_has, stored_data
from .stats import StageStats

__all__ = ["WorkerStore", "RequestStore", "holder_of_most", "store_key", "removed_workers"]

FETCH_TIMEOUT_S = 60.0
HOLDERS_TTL_S = 1.0
CONNECT_TIMEOUT_S = 2.0   # dialling a holder (with dask's default, 30 s, a dead one stalled lookups)


def store_key(deployment: str, key: Any) -> str:
    """The dask key under which ``dep.put(key, obj)`` holds ``obj``."""
    return f"flowkit-store/{deployment}/{key!r}"


def holder_of_most(holders: Iterable[list[str]], me: str) -> str | None:
    """The worker holding the most of a stage's stored objects (``holders``: each object's
    holders), or None when that is ``me`` (as much as any other) or nobody holds them.

    >>> holder_of_most([["a"], ["b"], ["b"]], "a")
    'b'
    >>> holder_of_most([["a", "b"], ["a"], ["b"]], "a") is None   # as many here as there: run here
    True
    >>> holder_of_most([[], []], "a") is None   # nobody holds them (lost): run here, the lookup says so
    True
    """
    counts: dict[str, int] = {}
    for held_by in holders:
        for w in held_by:
            counts[w] = counts.get(w, 0) + 1
    if not counts or counts.get(me, 0) == max(counts.values()):
        return None
    return max(counts, key=counts.get)


def removed_workers(worker) -> dict[str, float]:
    """When (``time.monotonic()``) each worker left the cluster, as far as ``worker`` has been
    told: dask's scheduler sends every worker a "remove-worker" message, noted here from the first
    call on (one record per worker process, shared by its deployments)."""
    removed = getattr(worker, "flowkit_removed_workers", None)
    if removed is None:
        removed = worker.flowkit_removed_workers = {}
        on_worker_removed(worker, lambda address: removed.__setitem__(address, time.monotonic()))
    return removed


class WorkerStore:
    """Objects put with ``dep.put``: read from this worker's dask memory when they are here,
    otherwise fetched from the worker that holds them. ``stats`` counts local and remote reads."""

    def __init__(self, deployment: str, worker):
        self.deployment = deployment
        self.worker = worker
        self.stats = StageStats()
        self._holders: dict[str, tuple[float, list]] = {}   # dask key -> (when asked, holders)
        self.copies: dict[str, Any] = {}   # dask key -> this worker's copy of an object put with broadcast
        self._put_versions: dict[str, int] = {}   # dask key -> the latest put heard of (a later one wins)
        self._removed = removed_workers(worker)

    async def holders(self, dkeys: list[str], fresh: bool = False) -> dict[str, list]:
        """The workers holding each stored object, asked of the scheduler at most once per
        ``HOLDERS_TTL_S`` (so lookups do not load the scheduler), or now when ``fresh`` or when
        a worker named in the last answer has left the cluster since."""
        now = time.monotonic()
        missing = [k for k in dkeys if fresh or self._outdated(k, now)]
        if missing:
            self.stats.count("holders asked of the scheduler")
            who = await scheduler_who_has(self.worker, missing)
            for k in missing:
                self._holders[k] = (now, list(who.get(k, [])))
        return {k: self._holders[k][1] for k in dkeys}

    def held_here(self, dkeys: list[str]) -> bool:
        """Whether this worker holds every one of ``dkeys`` (then no other holds more: nothing to
        ask; so for objects put with ``broadcast``, once copied here)."""
        data = stored_data(self.worker)
        return all(k in self.copies or k in data for k in dkeys)

    def keep(self, key: Any, version: int, obj: Any) -> None:
        """Hold this worker's own copy of ``obj``, put under ``key`` with ``broadcast`` (the
        deployment's ``version``-th put: a copy of an earlier put that arrives late is ignored)."""
        dkey = store_key(self.deployment, key)
        if version >= self._put_versions.get(dkey, 0):
            self._put_versions[dkey] = version
            self.copies[dkey] = obj

    def _outdated(self, dkey: str, now: float) -> bool:
        asked, holders = self._holders.get(dkey, (None, ()))
        return asked is None or now - asked > HOLDERS_TTL_S or \
            any(self._removed.get(w, -1.0) >= asked for w in holders)

    def forget(self, key: Any, version: int) -> None:
        """``key`` was stored again (its ``version``-th put; 0: the same object, stored again after
        its worker died): where it lived is no longer known, and a copy of an earlier put is
        outdated."""
        dkey = store_key(self.deployment, key)
        self._holders.pop(dkey, None)
        if version > self._put_versions.get(dkey, 0):
            self._put_versions[dkey] = version
            self.copies.pop(dkey, None)

    def lookup(self, key: Any) -> Any:
        dkey = store_key(self.deployment, key)
        data = self.copies if dkey in self.copies else stored_data(self.worker)
        if dkey in data:
            self.stats.count("local lookups")
            return data[dkey]
        value = self._fetch(dkey, key)
        self.stats.count("remote lookups")
        return value

    def _fetch(self, dkey: str, key: Any) -> Any:
        """Read ``dkey`` from a worker that holds it (remembered holders first, then asking the
        scheduler again). A holder that answers "busy" (dask limits concurrent transfers) or
        cannot be reached (it died, and the scheduler may not know yet) is asked again after a
        pause, while the scheduler still names it; nothing waits longer than ``FETCH_TIMEOUT_S``.
        Runs in one of the deployment's threads, never on the event loop."""
        async def fetch():
            for attempt in range(50):
                fresh = attempt > 0
                retry = False
                for holder in (await self.holders([dkey], fresh))[dkey]:
                    if holder == self.worker.address:
                        continue
                    try:
                        resp = await fetch_data(self.worker, holder, [dkey], CONNECT_TIMEOUT_S)
                    except OSError:   # dead, or not reachable now: ask the scheduler again
                        retry = True
                        continue
                    if resp.get("status") == "OK" and dkey in resp["data"]:
                        return True, resp["data"][dkey]
                    retry = retry or resp.get("status") == "busy"
                if retry:
                    await asyncio.sleep(min(0.005 * 2 ** attempt, 0.5))
                elif fresh:
                    return False, None
            return False, None

        try:
            found, value = run_on_worker_loop(self.worker, fetch, FETCH_TIMEOUT_S)
        except TimeoutError as e:
            raise TimeoutError(f"reading stored object {key!r} from another worker took over "
                               f"{FETCH_TIMEOUT_S:g} s") from e
        if not found:
            raise KeyError(f"no stored object under key {key!r} (never stored, or lost with the worker that "
                           "held it, until the deployment stores it again)")
        return value


class RequestStore:
    """One request's view of the store: each key is read once per request, however many rows use it."""

    __slots__ = ("store", "memo")

    def __init__(self, store: WorkerStore):
        self.store = store
        self.memo: dict = {}

    def lookup(self, key: Any) -> Any:
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = self.store.lookup(key)
            return value
        except TypeError:
            return self.store.lookup(key)
