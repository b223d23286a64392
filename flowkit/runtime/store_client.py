"""The client side of ``dep.put``: objects stored on workers as dask data.

Each object lives in one worker's memory (scattered, so dask cannot recompute it); one put with
``broadcast`` is also copied into every worker's own memory (``WorkerStore.keep``: not dask data,
whose active memory manager drops extra replicas within seconds), and a worker that joins gets
its copies when it does. The client keeps what it needs to look after them:

- a reference to each object (unless put with ``restore=False``), to store it again when its
  worker dies — noticed from its future, which turns "cancelled" at once;
- where each one lives, for a flow whose dynamic-lookup key is a column of the request itself
  (``routing_column``): the client then sends each request straight to the worker holding its
  keys, so the lookup stage runs where the request lands (one hop instead of two).

Both are looked after by one background thread per deployment (started with the first object,
ended at close): every quarter second it looks for lost objects (no scheduler call: a future
says so itself), and every 2 s, while requests are being routed, it asks where objects live.
Requests never start threads: a thread started on the request loop blocked every request
behind it until the new thread got the GIL (HTTP p99 60-90 ms instead of 7-10 at 200 req/s).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

from ..errors import FlowError
from .compat import PICKLE_LOGGER, check_serializable, task_known
from .store_worker import store_key
from .wire import dumps

__all__ = ["StoredObjects", "routing_column"]

logger = logging.getLogger("flowkit.deploy")

CHECK_EVERY_S = 0.25   # how often lost objects are looked for (no scheduler call: a future says so)
BROADCAST_TIMEOUT_S = 60.0   # for every worker to take its copy of an object put with broadcast
WHERE_EVERY_S = 2.0    # how often, while requests are routed, the scheduler is asked where objects live


def routing_column(plan) -> str | None:
    """The input column a request can be routed by: the key column of a dynamic lookup whose
    stage (split off by the locality pass) reads the flow's input directly.

    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"user": str})
    >>> _ = f.lookup("user", dynamic=True)
    >>> routing_column(fk.optimize(f).plan), routing_column(fk.optimize(f, locality=False).plan)
    ('user', None)
    """
    from ..plan import Stage

    for op in plan.stages():
        if isinstance(op, Stage) and op.lookup_split and op.inputs == (plan.source.name,):
            return op.members[0].key
    return None


class _NotFromThisThread(logging.Filter):
    """Drops the records logged by the thread that made it (other threads log as usual)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


class StoredObjects:
    """One deployment's stored objects, seen from the client (``dep.put``, ``dep.close``)."""

    def __init__(self, deployment: str, client, router, route_by: str | None):
        self.deployment = deployment
        self.client = client
        self.router = router          # to tell workers to forget where a re-stored key lived
        self.route_by = route_by      # the input column requests are routed by, if any
        self.futures: dict[Any, Any] = {}   # key -> the dask future holding it
        self.kept: dict[Any, Any] = {}      # key -> the object, to store again if its worker dies
        self.everywhere: dict[Any, bytes] = {}   # key -> (key, put number, object) pickled, of a put with broadcast
        self._version = 0                   # puts so far
        self.where: dict[Any, str] = {}     # key -> a worker holding it (for routing)
        self._where_at = 0.0
        self._routed = False                # whether requests were routed since the last ask
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self.futures)

    def put(self, key: Any, obj: Any, restore: bool = True, broadcast: bool = False) -> None:
        self._check_sendable(key, obj)
        dkey = store_key(self.deployment, key)
        version = self._version = self._version + 1   # (a late copy of an older put is then ignored)
        old = self.futures.pop(key, None)
        if old is not None:
            # The new object takes the same dask key once the scheduler has forgotten the old one
            # (not merely lost its data: a release still on its way would drop the new object).
            old.release()
            deadline = time.monotonic() + 10
            while task_known(self.client, dkey) and time.monotonic() < deadline:
                time.sleep(0.01)
            self._tell_all("forget", dumps((key, version)))
        self.futures[key] = self.client.scatter({dkey: obj}, hash=False)[dkey]
        self.kept[key] = obj if restore or broadcast else None
        if broadcast:   # a copy in every worker's own memory too (see WorkerStore.keep)
            self.everywhere[key] = dumps((key, version, obj))   # (pickled once, for every worker)
            self._tell_all("keep", self.everywhere[key])
        else:
            self.everywhere.pop(key, None)   # (its copies went with the "forget" above)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"flowkit-stored-{self.deployment}")
            self._watcher.start()
        if self.route_by is not None and not broadcast:   # (one put with broadcast is everywhere)
            holders = self.client.who_has([self.futures[key]]).get(dkey) or ()
            if holders:
                self.where[key] = holders[0]

    def _check_sendable(self, key: Any, obj: Any) -> None:
        """Raise ``FlowError`` unless ``key`` is hashable and dask can serialize ``obj`` (its own
        serializers, then pickle and cloudpickle, as ``scatter`` would). Checked here, before
        anything is sent or an older object under ``key`` is released: a scatter that fails deep
        in dask's comm layer raises a bare ``TypeError`` after logging a traceback per serializer
        tried. (The object is serialized twice; arrays, in dask's serializers or pickle's
        out-of-band buffers, are not copied.)"""
        try:
            hash(key)
        except TypeError:
            raise FlowError(f"dep.put: a key must be hashable (a str, a number, a tuple ...), not "
                            f"{type(key).__name__}") from None
        quiet = _NotFromThisThread()
        dask_pickle = logging.getLogger(PICKLE_LOGGER)   # logs every failed attempt
        dask_pickle.addFilter(quiet)
        try:
            check_serializable(self.client, obj)
        except Exception as e:
            cause = e
            while cause.__cause__ is not None:   # dask wraps the pickling error in its own TypeError
                cause = cause.__cause__
            kind = type(obj)
            raise FlowError(f"dep.put({key!r}, ...): a {kind.__module__}.{kind.__qualname__} cannot be sent to "
                            f"the workers, it cannot be pickled (even with cloudpickle): "
                            f"{type(cause).__name__}: {cause}") from None
        finally:
            dask_pickle.removeFilter(quiet)

    def holder_of(self, keys: Iterable) -> str | None:
        """The worker holding the objects of most of ``keys``, if known."""
        self._routed = True
        counts: dict[str, int] = {}
        for key in keys:
            try:
                worker = self.where.get(key)
            except TypeError:   # an unhashable value is no stored key
                continue
            if worker is not None:
                counts[worker] = counts.get(worker, 0) + 1
        return max(counts, key=counts.get) if counts else None

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            self._check()

    def _check(self) -> None:
        """Store again what was lost with a dead worker; every ``WHERE_EVERY_S`` while requests
        are routed, ask where the rest lives now (objects move when workers leave)."""
        try:
            futures = dict(self.futures)
            lost = [k for k, fut in futures.items() if fut.status != "finished"]
            if self.route_by is not None and self._routed and time.monotonic() - self._where_at > WHERE_EVERY_S:
                self._routed = False
                alive = {k: f for k, f in futures.items() if k not in lost and k not in self.everywhere}
                who = self.client.who_has(list(alive.values())) if alive else {}
                by_dkey = {fut.key: key for key, fut in alive.items()}
                self.where = {by_dkey[k]: holders[0] for k, holders in who.items() if holders and k in by_dkey}
                self._where_at = time.monotonic()
            for key in lost:
                if self.kept.get(key) is not None and not self.closed:
                    logger.warning("deployment %s: the object stored under %r was lost with its worker; storing "
                                   "it again", self.deployment, key)
                    self._restore(key)
        except Exception as e:   # closing, or the scheduler is busy: route as before, look again later
            logger.debug("checking stored objects: %s", e)

    def _restore(self, key: Any) -> None:
        """Store a lost object again under its dask key. The lost future is released only after
        the new one exists, so the client never tells the scheduler it no longer wants the key (a
        release racing the new data to the scheduler would drop it)."""
        dkey = store_key(self.deployment, key)
        new = self.client.scatter({dkey: self.kept[key]}, hash=False)[dkey]
        lost, self.futures[key] = self.futures[key], new
        lost.release()
        self.router.broadcast("forget", dumps((key, 0)))   # (where it lived: its copies stay)

    def joined(self, address: str) -> None:
        """A worker that took the deployment: it gets a copy of every object put with
        ``broadcast`` (until it has, its lookups of them read the dask copy, as any lookup)."""
        for payload in list(self.everywhere.values()):
            self.router.submit("keep", payload, worker=address)

    def _tell_all(self, kind: str, payload: bytes) -> None:
        """Send ``kind`` to every worker of the deployment, waiting for the connected ones' answers;
        a worker still connecting gets it after what ``joined`` sent it (a later put wins: each
        carries its number, see ``WorkerStore.keep``)."""
        try:
            connecting = set(self.router.connecting) - set(self.router.sessions)
        except RuntimeError:   # (the router's loop changed the dict while this read it: once more)
            connecting = set(self.router.connecting) - set(self.router.sessions)
        for address in connecting:
            self.router.submit(kind, payload, worker=address)
        self.router.broadcast(kind, payload, timeout=BROADCAST_TIMEOUT_S)

    def release(self) -> None:
        """Let dask drop every stored object (the deployment is closing)."""
        self.closed = True
        self._stop.set()
        for fut in self.futures.values():
            try:
                fut.release()
            except Exception:
                pass
        self.futures.clear()
        self.kept.clear()
        self.everywhere.clear()
