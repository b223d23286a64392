"""Dynamic batching of one stage on one worker."""

from __future__ import annotations

import asyncio
import contextvars
import math
import time

from ..plan import Stage
from ..table import Table

__all__ = ["Batcher", "batch_wait"]


def batch_wait(eager: bool, free: bool, rows: int, max_batch: int, waited: float, max_wait: float,
               until_stuck: float) -> float:
    """Seconds the batch forming now still waits before it goes (0 or less: it goes now; inf:
    until something changes), holding ``rows`` rows whose oldest has ``waited`` seconds.

    Eager: it goes as soon as one of the worker's threads is ``free``; while they are busy its
    rows wait for one, whatever their number (a CPU-bound batch sent to a thread of its own
    would only share the cores with the one running: the batches would come out smaller and
    each slower, as Triton's dynamic batcher waits for a free model instance) — unless the work
    holding the threads is stuck (``executor.until_stuck``: a slow or abandoned request's), when
    the batch goes on a thread of its own once its oldest row has waited ``max_wait``. Not eager
    (``until_stuck`` unused): it goes when it holds ``max_batch`` rows or its oldest row has
    waited ``max_wait``.

    >>> batch_wait(True, True, 1, 8, 0.0, 0.005, 1.0)          # a free thread: at once
    0.0
    >>> batch_wait(True, False, 9, 8, 0.010, 0.005, 1.0)       # busy, not stuck: for the thread
    1.0
    >>> batch_wait(True, False, 2, 8, 0.001, 0.005, -0.5)      # busy and stuck: max_wait
    0.004
    >>> batch_wait(False, True, 2, 8, 0.001, 0.005, 0.0), batch_wait(False, False, 8, 8, 0.0, 0.005, 0.0)
    (0.004, 0.0)
    """
    if eager:
        return 0.0 if free else max(max_wait - waited, until_stuck)
    return 0.0 if rows >= max_batch else max_wait - waited


class Batcher:
    """Dynamic batching for one stage on one worker.

    Requests queue and a batch closes by ``batch_wait``: when the stage batches ``eager``-ly
    (``Batching.eager``, not on a GPU stage), as soon as one of the deployment's threads on this
    worker is free — a lone request on an idle worker goes at once, and rows accumulate only while
    the threads are busy (with this stage's batches or any other stage); otherwise when it holds
    ``max_batch`` rows or its oldest request has waited ``max_wait_ms``, whichever comes first.
    The stage's batching maps run once over the batch's rows (``run_batched``; every row keeps
    its own qid) and each request gets its own rows back. A batch takes at most ``max_batch``
    rows; a request larger than that is cut into batches of its own.
    """

    def __init__(self, dep, stage: Stage):  # dep: the WorkerDeployment that owns this stage
        self.dep = dep
        self.stage = stage
        self.max_batch = stage.batching.max_batch
        self.max_wait = stage.batching.max_wait_ms / 1000
        self.eager = stage.batching.eager and not stage.is_gpu
        self.running = 0   # batches of this stage dispatched and not finished
        self.entered = 0   # ... of which the deployment counts as busy (see _free)
        self.queue: list = []
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.waits: list[float] = []  # how long each request waited for its batch to close (recent)

    def resize(self, max_batch: int, max_wait_ms: float) -> None:
        """A new window from now on (a live re-plan: ``windows``); the batch forming now closes
        by the new rule. Requests queued before a shrink keep their size (one larger than the
        new ``max_batch`` forms a batch of its own)."""
        self.max_batch, self.max_wait = max(1, int(max_batch)), max(0.0, max_wait_ms) / 1000
        if self.wakeup is not None:
            self.wakeup.set()

    def close(self) -> None:
        """Stop batching; requests still queued are cancelled (their worker answers "leaving")."""
        if self.task is not None:
            self.task.cancel()
        for _, fut, _ in self.queue:
            fut.cancel()
        self.queue.clear()

    async def submit(self, table):
        if len(table) > self.max_batch:
            parts = [Table._make(table.schema, table.rows[i:i + self.max_batch], table.qids[i:i + self.max_batch])
                     for i in range(0, len(table), self.max_batch)]
            outs = await asyncio.gather(*(self.submit(p) for p in parts))
            return Table._make(outs[0].schema, [r for o in outs for r in o.rows], [q for o in outs for q in o.qids])
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.wakeup = asyncio.Event()
            # in a context of its own: batches belong to no one request (see worker._request_threads)
            self.task = loop.create_task(self._loop(), context=contextvars.Context())
        fut = loop.create_future()
        self.queue.append((table, fut, time.perf_counter()))
        self.wakeup.set()
        return await fut

    async def _loop(self) -> None:
        while True:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            while self.queue and (remaining := self._wait()) > 0:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), None if math.isinf(remaining) else remaining)
                except asyncio.TimeoutError:
                    pass
            batch, rows = [], 0
            # (the first request always goes: one queued before the window shrank may be larger)
            while self.queue and (not batch or rows + len(self.queue[0][0]) <= self.max_batch):
                item = self.queue.pop(0)
                if item[1].cancelled():   # its request was abandoned while it waited
                    continue
                batch.append(item)
                rows += len(item[0])
            if not batch:
                continue
            now = time.perf_counter()
            self.waits = (self.waits + [now - at for _, _, at in batch])[-4096:]
            self.running += 1
            asyncio.ensure_future(self._run(batch, rows))

    def _wait(self) -> float:
        """Seconds the batch forming now still waits (``batch_wait``)."""
        rows = sum(len(t) for t, _, _ in self.queue)
        return batch_wait(self.eager, self._free(), rows, self.max_batch, time.perf_counter() - self.queue[0][2],
                          self.max_wait, self.dep.until_stuck(time.monotonic()) if self.eager else 0.0)

    def _free(self) -> bool:
        """Whether a thread is free: fewer stage executions run or wait for the deployment's
        threads (its ``busy``, and this stage's batches dispatched but not yet counted there)
        than the worker has threads."""
        return self.dep.busy + self.running - self.entered < self.dep.threads

    def thread_freed(self) -> None:
        """A stage execution of the deployment ended (``WorkerDeployment.local``): rows waiting
        for a free thread may go."""
        if self.queue and self.eager:
            self.wakeup.set()

    async def _run(self, batch: list, rows: int) -> None:
        stats = self.dep.stats[self.stage.name]
        with stats.lock:
            stats.batch_sizes[rows] += 1
        self.entered += 1   # (dep.local counts it busy in this same step)
        try:
            outs = await self.dep.local(self.stage, [t for t, _, _ in batch], batched=True)
        except BaseException as e:
            outs = [e] * len(batch)
        finally:
            self.running -= 1
            self.entered -= 1
        for out, (_, fut, _) in zip(outs, batch):
            if fut.done():
                continue
            if isinstance(out, BaseException):
                fut.set_exception(out)
            else:
                fut.set_result(out)
