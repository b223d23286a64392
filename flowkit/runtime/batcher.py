"""Dynamic batching of one stage on one worker."""

from __future__ import annotations

import asyncio
import contextvars
import time

from ..plan import Stage
from ..table import Table

__all__ = ["Batcher"]


class Batcher:
    """Dynamic batching for one stage on one worker.

    Requests queue; a batch closes when it holds ``max_batch`` rows or its oldest request has
    waited ``max_wait_ms``, whichever comes first. The stage's batching maps run once over the
    batch's rows (``run_batched``; every row keeps its own qid) and each request gets its own
    rows back. A request larger than ``max_batch`` is cut into batches of its own.
    """

    def __init__(self, dep, stage: Stage):  # dep: the WorkerDeployment that owns this stage
        self.dep = dep
        self.stage = stage
        self.max_batch = stage.batching.max_batch
        self.max_wait = stage.batching.max_wait_ms / 1000
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
            while sum(len(t) for t, _, _ in self.queue) < self.max_batch:
                remaining = self.queue[0][2] + self.max_wait - time.perf_counter()
                if remaining <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
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
            asyncio.ensure_future(self._run(batch, rows))

    async def _run(self, batch: list, rows: int) -> None:
        stats = self.dep.stats[self.stage.name]
        with stats.lock:
            stats.batch_sizes[rows] += 1
        try:
            outs = await self.dep.local(self.stage, [t for t, _, _ in batch], batched=True)
        except BaseException as e:
            outs = [e] * len(batch)
        for out, (_, fut, _) in zip(outs, batch):
            if fut.done():
                continue
            if isinstance(out, BaseException):
                fut.set_exception(out)
            else:
                fut.set_result(out)
