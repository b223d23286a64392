"""The space-time scheduler: many tenants' small inference requests multiplexed on one device.

Each tenant is a model with a latency SLO; its requests queue with deadlines. A dispatcher thread
repeatedly asks ``policy.plan_launch`` (a pure function of the queues) what to run next and runs
it on the backend:

- ``time``: one request at a time, earliest deadline first (exclusive access, no batching);
- ``batch``: the tenant with the earliest deadline, its queued requests merged (same-model batching);
- ``space``: every waiting tenant's batch at once, each on its own stream (concurrent launches);
- ``spacetime``: the paper's dynamic scheduler. Tenants of the same architecture are stacked into
  one batched program — a super-kernel over their weights — choosing the group with the earliest
  deadline first. Programs are cached (``program``): each holds its own stacked copy of some of
  the group's weights, built once, and serves any subset of its tenants at most twice its size
  (tenants with nothing queued get zero rows; no weights are gathered per launch); a program
  that a newer one covers is evicted, and a group's programs hold at most two copies of each
  tenant's weights. Rows are padded to the backend's bucket (powers of two on CUDA, as are new
  programs' widths, so captured graphs recur). A tenant whose backlog would
  make the whole group wait (a straggler: far more queued rows than its peers, or rows that would
  stretch the stack, by its measured latency, past a peer's deadline) is evicted from the stack
  and runs beside it on its own stream, as do waiting tenants with no waiting peer (other
  architecture groups with two or more waiting tenants get their own super-kernel in turn).

Batches wait at most ``max_wait_ms`` to fill, less when a deadline is near. A request that fails
(bad input, a model error) fails alone, with the tenant named; the dispatcher serves on. A group
whose stacked launch fails while each of its requests runs alone is not stacked again if ``vmap``
cannot batch its model, else not for ``restack_after_s`` (doubling while it keeps failing).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future

from ..errors import FlowError
from ..runtime.stats import percentile
from .backends import Backend, SimBackend, Stacked, power_of_two, tensors_map
from .policy import POLICIES, Launch, Request, Tenant, architecture, plan_launch, vmap_failure

__all__ = ["SpaceTimeScheduler", "current", "install"]

logger = logging.getLogger("flowkit.gpu")


class SpaceTimeScheduler:
    """Multiplexes tenants' inference requests on one backend under one policy."""

    def __init__(self, backend: Backend, policy: str = "spacetime", max_batch: int = 32, max_wait_ms: float = 2.0,
                 cache_size: int = 16, restack_after_s: float = 1.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.backend = backend
        self.policy = policy
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.tenants: dict[str, Tenant] = {}
        self.cache: OrderedDict = OrderedDict()   # (arch, member tenants) -> Stacked, least recently used first
        self.cache_size = cache_size
        self.restack_after = restack_after_s
        self.unstackable: dict = {}              # arch -> monotonic time until which it is not stacked (inf: never)
        self.stack_failures: dict = {}           # arch -> stacked launches failed in a row (not vmap's doing)
        self.counts = {"launches": 0, "stacked": 0, "cache hits": 0, "cache misses": 0, "straggler evictions": 0,
                       "failed requests": 0, "unstackable groups": 0, "stacking paused": 0, "cancelled requests": 0,
                       "evicted programs": 0, "dispatcher errors": 0}
        self.latency: dict = {}                  # (arch, row bucket) -> measured stacked-launch seconds (EWMA)
        self.order: deque = deque(maxlen=4096)   # (tenant, deadline) in the order requests were served
        self.cond = threading.Condition()
        self.closed = False
        # Samples are on the device's clock (``backend.now()``): on a simulated GPU its own, which
        # advances by each launch's modeled device time and idles only while there is no work.
        self.started, busy, sm = backend.reading()
        self._last_sample = (self.started, busy, sm, {})
        self.thread = threading.Thread(target=self._loop, daemon=True, name="flowkit-gpu-scheduler")
        self.thread.start()

    # -- tenants and requests -------------------------------------------------------------------
    def add_tenant(self, name: str, module, slo_ms: float = 100.0) -> None:
        with self.cond:
            if name in self.tenants:
                return
            module = self.backend.place(module)
            self.tenants[name] = Tenant(name, module, architecture(module), slo_ms / 1000)

    def submit(self, tenant: str, x) -> Future:
        """Queue ``x`` ([rows, ...]) for ``tenant``; a Future of its output rows. Cancelling the
        Future before its launch takes it withdraws the request (``stats()["cancelled requests"]``)."""
        t = self.tenants.get(tenant)
        if t is None:
            raise KeyError(f"unknown tenant {tenant!r}; add it with add_tenant first")
        shape = tuple(getattr(x, "shape", ()))
        if not shape or shape[0] < 1:
            raise ValueError(f"tenant {tenant!r}: a request is a tensor of rows [rows, ...] with at least one "
                             f"row; got {type(x).__name__} of shape {shape}")
        now = time.monotonic()
        req = Request(tenant, x, int(shape[0]), now, now + t.slo, shape=shape[1:])
        with self.cond:
            if self.closed:
                raise FlowError(f"tenant {tenant!r}: the GPU scheduler is closed")
            t.queue.append(req)
            if self.policy == "time" or self.max_wait <= 0:
                self.backend.working()   # no batch to wait for: the device has work from now
            self.cond.notify()
        return req.future

    def close(self) -> None:
        """Stop the dispatcher; requests still queued fail (none is left waiting)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(5)
        with self.cond:
            for t in self.tenants.values():
                while t.queue:
                    fut = t.queue.popleft().future
                    if fut.set_running_or_notify_cancel():
                        fut.set_exception(FlowError(f"tenant {t.name!r}: the GPU scheduler closed before this "
                                                    "request ran"))

    # -- dispatch -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not any(t.queue for t in self.tenants.values()):
                    self.backend.waiting()
                    self.cond.wait()
                if self.closed:
                    return
                self._wait_for_batch()
                self._drop_cancelled()
                now = time.monotonic()
                paused = {arch for arch, until in self.unstackable.items() if until > now}
                launch = plan_launch(self.policy, self.tenants, self.max_batch, now, self.launch_seconds, paused)
                if launch is None:
                    continue
                self.backend.working()
                for name, reqs in launch.stacked + launch.separate:
                    q = self.tenants[name].queue
                    for r in reqs:
                        q.popleft()
                        r.future.set_running_or_notify_cancel()   # from here on it cannot be cancelled
            try:
                self._run(launch)
            except BaseException as e:   # the dispatcher must outlive any launch: fail its requests, serve on
                logger.exception("flowkit.gpu: a launch failed outside its requests")
                with self.cond:
                    self.counts["dispatcher errors"] += 1
                for _, reqs in launch.stacked + launch.separate:
                    for r in reqs:
                        if not r.future.done():
                            r.future.set_exception(e if isinstance(e, Exception) else FlowError(repr(e)))

    def _drop_cancelled(self) -> None:
        """Requests whose futures were cancelled while queued are not run; lock held."""
        for t in self.tenants.values():
            if any(r.future.cancelled() for r in t.queue):
                kept = deque(r for r in t.queue if not r.future.cancelled())
                self.counts["cancelled requests"] += len(t.queue) - len(kept)
                t.queue = kept

    def _wait_for_batch(self) -> None:
        """Let a batch fill for up to ``max_wait`` (less when a deadline is near); lock held."""
        if self.policy == "time" or self.max_wait <= 0:
            return
        while not self.closed:
            queued = [r for t in self.tenants.values() for r in t.queue]
            now = time.monotonic()
            oldest = min(r.arrival for r in queued)
            slack = min(r.deadline for r in queued) - now
            rows = sum(r.rows for r in queued)
            wait = min(oldest + self.max_wait - now, slack / 4)
            if wait <= 0 or rows >= self.max_batch * max(1, len(self.tenants)):
                return
            self.backend.waiting()   # the device waits for the batch to fill
            self.cond.wait(wait)

    def _run(self, launch: Launch) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self._launch(launch)
        except Exception as e:   # one bad request must not fail its batch or stack: run each alone
            outputs = self._one_by_one(launch, e)
        except BaseException as e:
            outputs = {r: e for _, reqs in launch.stacked + launch.separate for r in reqs}
        wall = time.perf_counter() - t0
        failed = any(isinstance(out, BaseException) for out in outputs.values())
        device, sms = self._device_seconds(launch, wall, outputs)
        self.backend.account(device, sms)   # on a simulated GPU this also advances its clock
        done = time.monotonic()
        with self.cond:
            if launch.stacked and not failed:
                arch = self.tenants[launch.stacked[0][0]].arch
                self.stack_failures.pop(arch, None)
                rows = max(sum(r.rows for r in reqs) for _, reqs in launch.stacked)
                key, last = _latency_key(arch, rows), self.launch_seconds(arch, rows)
                self.latency[key] = wall if last is None else 0.7 * last + 0.3 * wall
            self.counts["launches"] += 1
            self.counts["stacked"] += bool(launch.stacked)
            self.counts["straggler evictions"] += len(launch.stragglers)
            for name, reqs in launch.stacked + launch.separate:
                t = self.tenants[name]
                for r in reqs:
                    out = outputs[r]
                    if r.future.done():   # cancelled just before it was taken
                        continue
                    if isinstance(out, BaseException):
                        self.counts["failed requests"] += 1
                        r.future.set_exception(out)
                        continue
                    t.requests += 1
                    t.served_rows += r.rows
                    t.latencies.append(done - r.arrival)
                    t.attained += done <= r.deadline
                    self.order.append((name, r.deadline))
                    r.future.set_result(out)

    def _launch(self, launch: Launch) -> dict:
        """Run a launch; each request's output rows."""
        results = {}
        if launch.separate:   # first, so that on a GPU they run on their streams beside the stack
            pairs = [(self.tenants[n].module, self._batch(reqs)) for n, reqs in launch.separate]
            if len(pairs) == 1 and not launch.stacked:
                outs = [self.backend.forward(*pairs[0])]
            else:
                outs = self.backend.forward_concurrent(pairs)
            results.update({n: out for (n, _), out in zip(launch.separate, outs)})
        if launch.stacked:
            results.update(self._run_stacked(launch.stacked))
        self.backend.synchronize()   # every stream's outputs are ready
        outputs = {}
        for name, reqs in launch.stacked + launch.separate:
            start = 0
            for r in reqs:   # its rows of every output tensor (a tuple output: of each of its tensors)
                outputs[r] = tensors_map(lambda t, a=start, b=start + r.rows: t[a:b], results[name])
                start += r.rows
        return outputs

    def _one_by_one(self, launch: Launch, error: Exception) -> dict:
        """After a launch failed: each request on its own, so only those that fail alone fail (their
        error names the tenant). If every request runs alone, it was the stacking that failed: a
        model ``vmap`` cannot batch is not stacked again; any other failure (a transient error, a
        device hiccup) pauses that group's stacking for ``restack_after_s``, doubled each time
        it fails again in a row."""
        items = [(name, r) for name, reqs in launch.stacked + launch.separate for r in reqs]
        outputs = {}
        for name, r in items:
            try:
                if len(items) == 1:
                    raise error
                outputs[r] = self.backend.forward(self.tenants[name].module, self._batch((r,)))
                self.backend.synchronize()
            except Exception as e:
                e.add_note(f"flowkit.gpu: tenant {name!r}, a request of {r.rows} row(s) of shape {r.shape}")
                outputs[r] = e
        if launch.stacked and not any(isinstance(o, Exception) for o in outputs.values()):
            arch = self.tenants[launch.stacked[0][0]].arch
            with self.cond:
                if vmap_failure(error):
                    logger.warning("stacking %s failed (%r); its tenants run unstacked from now on", arch[0], error)
                    self.counts["unstackable groups"] += 1
                    self.unstackable[arch] = math.inf
                else:
                    n = self.stack_failures[arch] = self.stack_failures.get(arch, 0) + 1
                    pause = min(60.0, self.restack_after * 2 ** (n - 1))
                    logger.warning("stacking %s failed (%r); its tenants run unstacked for %.1f s", arch[0], error,
                                   pause)
                    self.counts["stacking paused"] += 1
                    self.unstackable[arch] = time.monotonic() + pause
        return outputs

    def launch_seconds(self, arch: tuple, rows: int) -> float | None:
        """The measured latency of this group's stacked launches at ``rows`` rows per tenant."""
        return self.latency.get(_latency_key(arch, rows))

    def _batch(self, reqs):
        torch = self.backend.torch
        xs = [self.backend.input(r.x) for r in reqs]
        return xs[0] if len(xs) == 1 else torch.cat(xs)

    def program(self, arch: tuple, names: tuple) -> Stacked:
        """The cached super-kernel program to run tenants ``names`` (of group ``arch``) with.

        A hit: the narrowest cached program of the group holding all of them, at most twice their
        number wide (the backend's bucket, if larger). A miss builds one over them, widened to the
        bucket with the group's other tenants (so the next subsets hit it); it evicts the
        group's programs it covers at most twice their width (a group that grew one tenant at a
        time keeps one program, not one per size), then the group's least recently used while
        they hold more than two copies of each tenant's weights, then the least recently used of
        all beyond ``cache_size``."""
        want = set(names)
        limit = max(2 * len(names), self.backend.bucket(len(names)))
        found = [(p.width, key) for key, p in self.cache.items()
                 if key[0] == arch and want <= set(p.tenants) and p.width <= limit]
        if found:
            key = min(found)[1]
            self.counts["cache hits"] += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        self.counts["cache misses"] += 1
        with self.cond:
            group = [n for n, t in self.tenants.items() if t.arch == arch]
        fill = [n for n in group if n not in want][:max(0, self.backend.bucket(len(names)) - len(names))]
        members = tuple(n for n in group if n in want or n in fill)
        stacked = self.backend.stack(members, [self.tenants[n].module for n in members])
        covered = [key for key, p in self.cache.items()
                   if key[0] == arch and set(p.tenants) <= set(members) and len(members) <= 2 * p.width]
        self._evict(covered)
        self.cache[(arch, members)] = stacked
        mine = [key for key in self.cache if key[0] == arch]
        while sum(self.cache[k].width for k in mine) > 2 * len(group) and len(mine) > 1:
            self._evict([mine.pop(0)])
        while len(self.cache) > self.cache_size:
            self._evict([next(iter(self.cache))])
        return stacked

    def _evict(self, keys) -> None:
        for key in keys:
            del self.cache[key]
            self.counts["evicted programs"] += 1

    def _run_stacked(self, items) -> dict:
        """One super-kernel launch for ``items``' tenants on a cached program (``program``):
        each tenant's rows in its slot, padded to the backend's row bucket; slots of the
        program's other tenants get zero rows."""
        torch = self.backend.torch
        names = tuple(n for n, _ in items)
        stacked = self.program(self.tenants[names[0]].arch, names)
        batches = dict(zip(names, (self._batch(reqs) for _, reqs in items)))
        rows = self.backend.bucket(max(b.shape[0] for b in batches.values()))
        first = next(iter(batches.values()))
        zeros = first.new_zeros((rows,) + tuple(first.shape[1:]))
        xs = torch.stack([zeros if n not in batches else batches[n] if batches[n].shape[0] == rows else
                          torch.cat([batches[n], zeros[:rows - batches[n].shape[0]]]) for n in stacked.tenants])
        out = self.backend.forward_stacked(stacked, xs)
        slot = {n: i for i, n in enumerate(stacked.tenants)}
        return {n: tensors_map(lambda t, i=slot[n], k=b.shape[0]: t[i, :k], out) for n, b in batches.items()}

    def _device_seconds(self, launch: Launch, wall: float, outputs: dict) -> tuple[float, float | None]:
        """Device-busy seconds of a launch and its SM-seconds: modeled on a simulated GPU (for the
        requests that ran: a failed one, a bad input, is not modeled), else the wall time (SM
        figures then come from the device's own counters, if any)."""
        if not isinstance(self.backend, SimBackend):
            return wall, None

        def ran(items):
            items = [(n, tuple(r for r in reqs if not isinstance(outputs.get(r), BaseException))) for n, reqs in items]
            return [(n, reqs) for n, reqs in items if reqs]

        secs = sms = 0.0
        kind = {"solo": "time", "batch": "time", "concurrent": "space"}.get(launch.kind, "space")
        stacked = ran(launch.stacked)
        work = [("spacetime", n, reqs, len(stacked)) for n, reqs in stacked[:1]]
        work += [(kind, n, reqs, 1) for n, reqs in ran(launch.separate)]
        for policy, name, reqs, tenants in work:
            try:
                d, s = self.backend.modeled(policy, self.tenants[name].module, self._batch(reqs), tenants=tenants)
            except Exception as e:   # a model the cost model cannot trace: no modeled time, never a dead dispatcher
                logger.debug("flowkit.gpu: no modeled device time for tenant %r: %r", name, e)
                continue
            secs, sms = secs + d, sms + s
        return secs, sms

    # -- observability ---------------------------------------------------------------------------
    def clock(self) -> float:
        """Seconds for the monitor: real time, except on a simulated GPU, whose own clock counts
        each launch for its modeled device time (not the time the CPU took to compute its numbers)
        and runs on real time only while the device has nothing to do (``DeviceClock``)."""
        return self.backend.now()

    def stats(self) -> dict:
        with self.cond:
            tenants = {n: {"requests": t.requests, "rows": t.served_rows, "queued": len(t.queue),
                           "slo_ms": t.slo * 1000, "attainment": t.attained / t.requests if t.requests else None,
                           "p50_ms": _pct(t.latencies, 50), "p99_ms": _pct(t.latencies, 99)}
                       for n, t in self.tenants.items()}
            measured = {f"{arch[0]} x{rows}": seconds * 1000 for (arch, rows), seconds in sorted(self.latency.items())}
            return {"policy": self.policy, "backend": self.backend.name, **self.counts, "tenants": tenants,
                    "stacked launch ms": measured}

    def sample(self) -> dict:
        """One monitor sample: utilization (time a kernel ran; SMs busy where known), memory,
        per-tenant throughput, queue depth; rates and ``time`` are on ``clock()``."""
        from .monitor import device_sample

        now, busy, sm = self.backend.reading()
        last_t, last_busy, last_sm, last_rows = self._last_sample
        with self.cond:
            rows = {n: t.served_rows for n, t in self.tenants.items()}
            queue = sum(len(t.queue) for t in self.tenants.values())
        span = max(now - last_t, 1e-6)
        self._last_sample = (now, busy, sm, rows)
        utilization = min(100.0, 100.0 * (busy - last_busy) / span)
        sample = {"time": now - self.started, "policy": self.policy, "backend": self.backend.name,
                  "utilization": utilization, "queue": queue,
                  "throughput": {n: (r - last_rows.get(n, 0)) / span for n, r in rows.items()}}
        if sm is not None:   # the share of SMs busy while a kernel ran, times the share of time one ran
            worked = busy - last_busy
            sample["sm_utilization"] = utilization * (sm - (last_sm or 0.0)) / worked if worked > 0 else 0.0
        used, total = self.backend.memory()
        sample.update({"memory_used": used, "memory_total": total})
        sample.update(device_sample(self.backend) or {})
        return sample


def _latency_key(arch: tuple, rows: int) -> tuple:
    """Stacked-launch latencies are kept per architecture and power-of-two bucket of rows."""
    return arch, power_of_two(rows)


def _pct(values, q):
    """The q-th percentile of latencies in seconds, in milliseconds (None when there are none)."""
    return percentile(values, q) * 1000 if values else None


# -- the scheduler of this process (set by the dask plugin) -----------------------------------------
_current: SpaceTimeScheduler | None = None


def install(scheduler: SpaceTimeScheduler | None) -> None:
    global _current
    _current = scheduler


def current() -> SpaceTimeScheduler | None:
    return _current
