"""The reference executor: runs a plan in this process, exactly, for every operator.

Operators run in topological order over whole tables. A plan without ``anyof`` runs as a plain
loop (the fast path for one-row requests). With ``anyof``, the plan is evaluated on demand by
the evaluator a worker uses too (``demand``), each operator in a thread of its own: the inputs
of an ``anyof`` race and the first to finish wins, as in a deployment. Other executors must return what this one returns.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..plan import AnyOf, Op, Plan
from ..table import Table, as_table
from .cancel import Token, checkpoint
from .demand import Demand, run_in_thread, run_to_end
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
    token = Token()   # set when the evaluation ends: losing branches stop at their next check
    demand = Demand({op.name: op for op in nodes}, env,
                    lambda op, inputs: run_in_thread(apply, op, inputs, ctx, token=token))
    return run_to_end(demand.value(output), token)
