"""Competitive execution: run each high-variance operator (or its stage) as k racing replicas.

In the plan the race is visible: ``k`` replica stages (``name~1`` .. ``name~k``) feed an
``anyof`` that keeps the original name, so consumers are unchanged. The first replica to finish
wins; the runtime cancels the others.

>>> import flowkit as fk
>>> f = fk.Flow("f", {"x": int})
>>> _ = f.map(abs, names=["y"], high_variance=True)
>>> [(op.name, op.kind, op.inputs) for op in race(f.plan, 3).stages()]
[('abs~1', 'stage', ('input',)), ('abs~2', 'stage', ('input',)), ('abs~3', 'stage', ('input',)), ('abs', 'anyof', ('abs~1', 'abs~2', 'abs~3'))]
>>> race(race(f.plan, 3), 3).stages() == race(f.plan, 3).stages()
True
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import AnyOf, Map, Plan, Rewrite, Stage, stage_of

__all__ = ["race", "race_nodes", "high_variance"]


def high_variance(op) -> bool:
    """A high-variance operator or stage that is not already a replica (racing is idempotent:
    optimizing an optimized flow again adds no replicas)."""
    return (isinstance(op, Map) and op.high_variance) or \
        (isinstance(op, Stage) and op.high_variance and op.replica_of is None)


def race(plan: Plan, k: int) -> Plan:
    """Replace every high-variance operator by ``k`` replicas joined by an ``anyof``."""
    if k < 2:
        return plan
    nodes, rewrites = [], []
    for op in plan.nodes:
        if not high_variance(op):
            nodes.append(op)
            continue
        raced = race_nodes(op, k)
        nodes += raced
        replicas = ", ".join(r.name for r in raced[:-1])
        rewrites.append(Rewrite("compete", f"{op.name!r} is high-variance: {k} replicas race ({replicas}); the "
                                           f"first result wins and the others are cancelled", (op.name,),
                                tuple(r.name for r in raced)))
    return plan.with_nodes(nodes, rewrites=rewrites)


def race_nodes(op, k: int) -> list:
    """What replaces ``op`` in a race of ``k``: its replica stages, then the ``anyof`` joining them."""
    stage = op if isinstance(op, Stage) else stage_of((op,))
    replicas = [replace(stage, name=f"{op.name}~{i}", replica_of=op.name, replica=i) for i in range(1, k + 1)]
    return replicas + [AnyOf(name=op.name, inputs=tuple(r.name for r in replicas), schema=op.schema, race=op.name)]
