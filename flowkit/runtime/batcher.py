"""Dynamic batching of one stage on one worker."""

from __future__ import annotations

import asyncio
import time

from ..plan import Stage
from ..table import Table

__all__ = ["Batcher"]


class Batcher:
    """Dynamic batching for one stage on one worker.

    Requests queue; a batch closes when it holds ``max_batch`` rows or its oldest request has
    waited ``max_wait_ms``, whichever comes first. The stage runs once over the merged table
    (qids become ``(request, qid)`` pairs) and each request gets its own rows back. A request
    larger than ``max_batch`` is cut into batches of its own.
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
            self.task = asyncio.ensure_future(self._loop())
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
            deadline = self.queue[0][2] + self.max_wait
            while sum(len(t) for t, _, _ in self.queue) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch, rows = [], 0
            while self.queue and rows + len(self.queue[0][0]) <= self.max_batch:
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
        merged = Table._make(batch[0][0].schema, [r for t, _, _ in batch for r in t.rows],
                             [(i, q) for i, (t, _, _) in enumerate(batch) for q in t.qids])
        try:
            out = await self.dep.local(self.stage, [merged])
        except BaseException as e:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        parts: list[tuple[list, list]] = [([], []) for _ in batch]
        for r, (i, q) in zip(out.rows, out.qids):
            parts[i][0].append(r)
            parts[i][1].append(q)
        for (rws, qids), (_, fut, _) in zip(parts, batch):
            if not fut.done():
                fut.set_result(Table._make(out.schema, rws, qids))
