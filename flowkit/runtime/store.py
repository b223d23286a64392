"""Stored objects on workers: ``dep.put(key, obj)`` holds them as dask data; lookups read them.

A worker reads an object from its own dask memory when it is there (a local lookup), else fetches
it from the worker that holds it (a remote lookup); one request reads each key once, however many
rows use it.
"""

from __future__ import annotations

import time
from typing import Any

from .stats import StageStats

__all__ = ["WorkerStore", "RequestStore", "store_key"]

FETCH_TIMEOUT_S = 60.0
HOLDERS_TTL_S = 1.0


def store_key(deployment: str, key: Any) -> str:
    """The dask key under which ``dep.put(key, obj)`` holds ``obj``."""
    return f"flowkit-store/{deployment}/{key!r}"


class WorkerStore:
    """Objects put with ``dep.put``: read from this worker's dask memory when they are here,
    otherwise fetched from the worker that holds them. ``stats`` counts local and remote reads."""

    def __init__(self, deployment: str, worker):
        self.deployment = deployment
        self.worker = worker
        self.stats = StageStats()
        self._holders: dict[str, tuple[float, list]] = {}   # dask key -> (when asked, holders)

    async def holders(self, dkeys: list[str], fresh: bool = False) -> dict[str, list]:
        """The workers holding each stored object, asked of the scheduler at most once per
        ``HOLDERS_TTL_S`` (so lookups do not load the scheduler), or now when ``fresh``."""
        now = time.monotonic()
        missing = [k for k in dkeys if fresh or now - self._holders.get(k, (-1e9,))[0] > HOLDERS_TTL_S]
        if missing:
            who = await self.worker.scheduler.who_has(keys=missing)
            for k in missing:
                self._holders[k] = (now, list(who.get(k, [])))
        return {k: self._holders[k][1] for k in dkeys}

    def forget(self, key: Any) -> None:
        """``key`` was stored again: where it lived is no longer known."""
        self._holders.pop(store_key(self.deployment, key), None)

    def lookup(self, key: Any) -> Any:
        dkey = store_key(self.deployment, key)
        data = self.worker.data
        if dkey in data:
            self.stats.count("local lookups")
            return data[dkey]
        value = self._fetch(dkey, key)
        self.stats.count("remote lookups")
        return value

    def _fetch(self, dkey: str, key: Any) -> Any:
        """Read ``dkey`` from a worker that holds it (remembered holders first, then asking the
        scheduler again). A holder that answers "busy" (dask limits concurrent transfers) is
        asked again after a pause; nothing waits longer than ``FETCH_TIMEOUT_S``. Runs in one of
        the deployment's threads, never on the event loop."""
        import asyncio

        from distributed.utils import sync
        from distributed.worker import get_data_from_worker

        async def fetch():
            for attempt in range(50):
                fresh = attempt > 0
                busy = False
                for holder in (await self.holders([dkey], fresh))[dkey]:
                    if holder == self.worker.address:
                        continue
                    resp = await get_data_from_worker(self.worker.rpc, [dkey], holder, who=self.worker.address)
                    if resp.get("status") == "OK" and dkey in resp["data"]:
                        return True, resp["data"][dkey]
                    busy = busy or resp.get("status") == "busy"
                if busy:
                    await asyncio.sleep(min(0.005 * 2 ** attempt, 0.5))
                elif fresh:
                    return False, None
            return False, None

        try:
            found, value = sync(self.worker.loop, fetch, callback_timeout=FETCH_TIMEOUT_S)
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
