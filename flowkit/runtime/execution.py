"""One request on the worker coordinating it, when its stages are placed one by one: the shared
evaluator (``demand``) with each stage placed by ``WorkerDeployment.execute`` (``executor``), and
the replicas of a high-variance stage raced or hedged (``_race``, deciding with ``racing``).
"""

from __future__ import annotations

import asyncio
import random
import time

from ..plan import AnyOf
from ..table import Table
from . import racing
from .cancel import Token
from .demand import Demand, retrieved
from .router import WorkerGone

__all__ = ["Execution"]


class Execution(Demand):
    """One request on the coordinating worker (``dep``, its ``WorkerDeployment``)."""

    def __init__(self, dep, table, token: Token | None = None):
        # token: the request's, set when its client abandons it
        super().__init__(dep.by_name, {dep.source: table}, lambda op, inputs: dep.execute(op, inputs, token))
        self.dep = dep

    async def anyof(self, op: AnyOf):
        """Replicas race (``_race``); a user's anyof takes whichever input finishes first (its
        stage statistics count the wait for it and, as ``wins <branch>``, which branch it was)."""
        if op.race:
            return await self._race(op)
        t0, stats = time.perf_counter(), self.dep.stats[op.name]
        try:
            branch, table = await self.first(op)
        except asyncio.CancelledError:   # the request was abandoned: not a failure of the stage
            raise
        except BaseException:
            stats.record(time.perf_counter() - t0, ok=False)
            raise
        stats.count(f"wins {branch}")
        stats.record(time.perf_counter() - t0)
        return table

    async def _race(self, op: AnyOf):
        """Competitive replicas: on distinct workers where possible; the first result wins.

        Replicas only use capacity that would otherwise idle. When this worker's threads are
        busy, the first replica runs alone (measured: a compute-bound race on 2 cores lost three
        quarters of the translation pipeline's capacity). A stage measured to be CPU-bound is
        *hedged* instead of raced from the start: the other replicas start only if the first has
        not finished by the race's recent p95 ("The Tail at Scale"), because racing a computation
        from the start doubles its demand for cores and cannot shorten variance that comes from
        the input itself (``racing.hedge_after``). Stages that mostly wait (sleep, I/O, a device, a remote call) race at once.
        Hedges that keep losing (a slow input is slow on every replica) stop: see ``_hedge_futile``.
        """
        replicas = [self.dep.by_name[r] for r in op.inputs][:self.dep.race_widths.get(op.name)]   # (None: all)
        inputs = [await self.value(i) for i in replicas[0].inputs]
        t0 = time.perf_counter()
        stats = self.dep.stats[op.name]
        if len(replicas) > 1 and self.dep.busy + self.dep.racing >= self.dep.threads:
            stats.count("races skipped (busy)")
            replicas = replicas[:1]
        hedge_after = racing.hedge_after(self.dep.stats[replicas[0].name].cpu_share(), stats.latencies)
        if len(replicas) > 1 and hedge_after is not None and self._hedge_futile(op.name):
            stats.count("hedges held (they lost)")
            replicas = replicas[:1]
        # The race takes a thread from now (before any await: a burst of requests sees it) until
        # its first replica starts and busy counts it instead (_run_race's ``first``).
        self.dep.racing += 1
        claim = [True]   # (until released)
        tasks: dict = {}   # each replica's task -> (replica, where, token)
        try:
            return await self._run_race(op, replicas, inputs, stats, t0, hedge_after, tasks, claim)
        except asyncio.CancelledError:   # the request was abandoned: so are its replicas
            for task, (_, _, token) in tasks.items():
                token.cancel("the request was cancelled")
                task.cancel()
                task.add_done_callback(retrieved)
            raise
        finally:
            self._release(claim)

    def _hedge_futile(self, name: str) -> bool:
        """Whether this race should not hedge: its stage's hedges keep losing (``hedges_losing``);
        one race in ``HEDGE_PROBE`` hedges anyway, to notice when they would win again."""
        if not racing.hedges_losing(self.dep.hedge_wins[name]):
            return False
        self.dep.hedges_held[name] += 1
        return self.dep.hedges_held[name] % racing.HEDGE_PROBE != 0

    def _release(self, claim: list) -> None:
        if claim[0]:
            claim[0] = False
            self.dep.racing -= 1

    async def _run_race(self, op, replicas, inputs, stats, t0, hedge_after, tasks: dict, claim: list):
        async def first(rep, token):   # the race's thread, from here on counted in busy
            self._release(claim)
            return await self.dep.local(rep, inputs, token)

        def start(rep, where, token, coro=None):
            if coro is None:
                coro = self.dep.local(rep, inputs, token) if where is None else self.dep.remote(where, rep, inputs)
            tasks[asyncio.ensure_future(coro)] = (rep, where, token)

        token = Token()
        start(replicas[0], None, token, first(replicas[0], token))
        pending = set(tasks)
        hedged = False
        if len(replicas) > 1 and hedge_after is not None:
            done, pending = await asyncio.wait(pending, timeout=hedge_after)
            if done:
                stats.count("hedges not needed")
                replicas = replicas[:1]
                pending = done   # handled below, like any finished replica
            else:
                stats.count("hedged")
                hedged = True
        if len(replicas) > 1:
            others = await self.dep.peers.others()
            places = random.sample(others, min(len(others), len(replicas) - 1))   # spread over the other workers
            if op.name in self.dep.race_widths:   # a width set by a plan races on as many workers, as its model
                replicas = replicas[:1 + len(places)]   # has it (one still arriving races nothing here)
            places += [None] * (len(replicas) - 1 - len(places))
            for rep, where in zip(replicas[1:], places):
                start(rep, where, Token())
            pending = set(tasks)
        errors = []
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                if d.exception() is None:
                    rep = tasks[d][0]
                    for p in pending:
                        tasks[p][2].cancel("a competing replica won")
                        p.cancel()
                        p.add_done_callback(retrieved)   # (a loser that raised Cancelled: not news)
                    stats.count(f"wins {rep.name}")
                    if hedged:
                        self.dep.hedge_wins[op.name].append(rep is not replicas[0])
                    stats.count("cancelled losers", len(pending))
                    stats.record(time.perf_counter() - t0)
                    t = d.result()
                    return Table._make(op.schema, t.rows, t.qids)
                if isinstance(d.exception(), WorkerGone):  # its worker left: run that replica here
                    rep, _, token = tasks.pop(d)
                    retry = asyncio.ensure_future(self.dep.local(rep, inputs, token))
                    tasks[retry] = (rep, None, token)
                    pending.add(retry)
                    continue
                errors.append(d.exception())
        stats.record(time.perf_counter() - t0, ok=False)
        raise errors[0]
