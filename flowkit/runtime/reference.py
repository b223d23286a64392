"""The reference executor: runs a plan in this process, exactly, for every operator.

Operators run in topological order over whole tables. A plan without ``anyof`` runs as a plain
loop (the fast path for one-row requests). With ``anyof``, each operator's result is computed
once on demand and every input of an ``anyof`` is computed in its own thread: the first to
finish wins, as in a deployment. Other executors must return what this one returns.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Mapping

from ..plan import AnyOf, Op, Plan
from ..table import Table, as_table
from .cancel import checkpoint
from .semantics import DictStore, apply

__all__ = ["run_plan", "evaluate"]


def run_plan(plan: Plan, data: Any, store: Mapping[str, Any] | None = None) -> Table:
    """Check ``data`` against the plan's input schema, then evaluate the plan (``flow.run``)."""
    source = plan.source
    table = as_table(data, source.schema)
    return evaluate(plan.nodes[1:], {source.name: table}, plan.output, DictStore(store))


def evaluate(nodes: tuple[Op, ...], env: dict[str, Any], output: str, ctx, apply=apply) -> Any:
    """Evaluate ``nodes`` (topologically ordered) given the tables already in ``env``;
    ``apply(op, inputs, ctx)`` computes one operator (``semantics.apply``; a worker passes its
    own, which also times each stage and honours its request's cancellation)."""
    if not any(isinstance(op, AnyOf) for op in nodes):
        for op in nodes:
            checkpoint()
            env[op.name] = apply(op, [env[i] for i in op.inputs], ctx)
        return env[output]
    return _Racing(nodes, env, ctx, apply).value(output)


class _Racing:
    """Demand-driven evaluation where the inputs of each ``anyof`` race in threads."""

    def __init__(self, nodes, env: dict[str, Any], ctx, apply=apply):
        self.ops = {op.name: op for op in nodes}
        self.ctx = ctx
        self.apply = apply
        self.lock = threading.Lock()
        self.futures: dict[str, Future] = {}
        for name, value in env.items():
            f: Future = Future()
            f.set_result(value)
            self.futures[name] = f

    def value(self, name: str) -> Any:
        with self.lock:
            fut = self.futures.get(name)
            mine = fut is None
            if mine:
                fut = self.futures[name] = Future()
        if mine:
            try:
                op = self.ops[name]
                if isinstance(op, AnyOf):
                    fut.set_result(self._race(op))
                else:
                    fut.set_result(self.apply(op, [self.value(i) for i in op.inputs], self.ctx))
            except BaseException as e:  # delivered to every waiter through the future
                fut.set_exception(e)
        return fut.result()

    def _race(self, op: AnyOf) -> Table:
        results: queue.Queue = queue.Queue()

        def attempt(name: str) -> None:
            try:
                results.put((True, self.value(name)))
            except BaseException as e:
                results.put((False, e))

        for name in op.inputs:
            threading.Thread(target=attempt, args=(name,), daemon=True, name=f"flowkit-race-{name}").start()
        errors = []
        for _ in op.inputs:
            ok, v = results.get()
            if ok:
                return Table._make(op.schema, v.rows, v.qids)
            errors.append(v)
        raise errors[0]
