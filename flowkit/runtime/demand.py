"""Demand-driven evaluation: the one evaluator the reference executor and the worker share.

A plan's operators are computed on demand: each once, when first needed, its result shared by
every operator that needs it (also while it is still being computed). An ``anyof`` computes its
inputs concurrently and takes the first to finish; when every input fails it raises the first
failure. How one operator is computed is the caller's ``compute(op, inputs)``: the reference
executor runs it in a thread of its own under the evaluation's cancellation token
(``run_in_thread``, ``run_to_end``); a worker places it (its threads, a
batch queue, another worker, a GPU) and races replicas of a high-variance stage (``anyof`` with
``race``, see ``executor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Awaitable, Callable, Mapping

from ..plan import AnyOf, Op
from ..table import Table
from .cancel import Token, running_under

__all__ = ["Demand", "retrieved", "run_in_thread", "run_to_end"]


class Demand:
    """One request's evaluation: ``await Demand(ops, env, compute).value(output)``."""

    def __init__(self, ops: Mapping[str, Op], env: Mapping[str, Any],
                 compute: Callable[[Op, list], Awaitable[Any]]):
        self.ops = ops
        self.env = dict(env)   # the values known before evaluation (the request's table)
        self.compute = compute
        self.memo: dict[str, asyncio.Future] = {}

    async def value(self, name: str) -> Any:
        """The value of operator ``name``, computed once, when first asked for."""
        if name in self.env:
            return self.env[name]
        fut = self.memo.get(name)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self.memo[name] = asyncio.get_running_loop().create_future()
        try:
            op = self.ops[name]
            if isinstance(op, AnyOf):
                result = await self.anyof(op)
            else:
                result = await self.compute(op, [await self.value(i) for i in op.inputs])
            fut.set_result(result)
        except BaseException as e:   # delivered to every other operator waiting for it
            if not fut.done():
                fut.set_exception(e)
                fut.exception()      # (raised to this caller: mark it retrieved)
            raise
        return result

    async def anyof(self, op: AnyOf) -> Table:
        """``op``'s value: the first of its inputs to finish (a worker also races replicas here)."""
        return (await self.first(op))[1]

    async def first(self, op: AnyOf) -> tuple[str, Table]:
        """The name and result of the first of ``op``'s inputs to finish, as ``op``'s table.
        The others run on (another operator may need them); their outcomes are not reported.
        Cancelling this (an abandoned request) cancels them all."""
        branches = {asyncio.ensure_future(self.value(i)): i for i in op.inputs}
        pending, errors = set(branches), []
        for b in branches:
            b.add_done_callback(retrieved)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for d in sorted(done, key=lambda d: op.inputs.index(branches[d])):   # ties: the first listed
                    error = asyncio.CancelledError() if d.cancelled() else d.exception()
                    if error is None:
                        t = d.result()
                        return branches[d], Table._make(op.schema, t.rows, t.qids)
                    errors.append(error)
        except asyncio.CancelledError:
            for b in branches:
                b.cancel()
            raise
        raise errors[0]


async def run_in_thread(fn: Callable, *args, token: Token | None = None) -> Any:
    """``fn(*args)`` in a new daemon thread, under ``token`` (``fk.cancelled()`` there says
    whether it is set), awaited here. A thread still running when its evaluation ended (a losing
    ``anyof`` branch) is told through ``token`` and finishes unobserved: Python cannot stop a
    thread."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run() -> None:
        try:
            with running_under(token):
                outcome = (True, fn(*args))
        except BaseException as e:   # delivered to the awaiting evaluation
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(_settle, fut, *outcome)
        except RuntimeError:   # the evaluation is over and its loop closed
            pass

    threading.Thread(target=run, daemon=True, name=f"flowkit-{getattr(args[0], 'name', 'op')}").start()
    return await fut


def run_to_end(coro, token: Token | None = None) -> Any:
    """Run ``coro`` to its end on an event loop of its own in a helper thread, and return its
    result (or raise its exception) here. A thread of its own, because the caller may already
    run an event loop (a notebook's kernel does). When it ends — or the caller is interrupted
    (Ctrl-C) — ``token`` is set, so operators still running stop at their next check, and what
    ``coro`` left running is cancelled."""
    loop = asyncio.new_event_loop()
    outcome: list = []

    def cancel_all() -> None:
        for task in asyncio.all_tasks(loop):
            task.cancel()

    def main() -> None:
        try:
            outcome.append((True, loop.run_until_complete(coro)))
        except BaseException as e:
            outcome.append((False, e))
        finally:
            if token is not None:
                token.cancel("the evaluation ended")
            rest = asyncio.all_tasks(loop)
            cancel_all()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.close()

    helper = threading.Thread(target=main, daemon=True, name="flowkit-evaluate")
    helper.start()
    try:
        helper.join()
    except BaseException:   # interrupted: stop the evaluation, do not wait for it
        if token is not None:
            token.cancel("interrupted")
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cancel_all)
        raise
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def retrieved(task: asyncio.Future) -> None:
    """Mark a finished task's outcome as seen (asyncio logs exceptions nobody retrieved)."""
    if not task.cancelled():
        task.exception()
