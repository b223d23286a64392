"""Operator fusion: maximal single-input, single-output chains become one ``Stage``.

A chain grows while the next operator has exactly one input, its predecessor has exactly one
consumer, and both need the same resource class (a ``gpu=True`` map does not absorb CPU work).
Fan-in operators (join, union, anyof) stay on their own; a fan-out operator ends its chain.
``whole=True`` fuses every operator into one stage. Fused members run in one task, in order,
passing tables by reference: no serialization between them.

>>> import flowkit as fk
>>> f = fk.Flow("f", {"x": int})
>>> _ = f.map(abs, names=["a"]).map(abs, col="a").filter(bool)
>>> p = fuse(f.plan)
>>> [op.name for op in p.nodes], p.output
(['input', 'abs+abs#2+bool'], 'abs+abs#2+bool')
>>> find_chains(f.plan)
[('abs', 'abs#2', 'bool')]
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import AnyOf, Join, Op, Plan, Rewrite, Source, Stage, Union, stage_of

__all__ = ["fuse", "find_chains", "fuse_whole"]

_FAN_IN = (Join, Union, AnyOf)


def _chainable(op: Op) -> bool:
    """A single-input operator that is not already a stage: a stage is the unit an earlier pass
    made (a fused chain, a locality split, a replica), so optimizing an optimized plan again
    neither nests stages nor undoes a split."""
    return not isinstance(op, (Source, Stage, *_FAN_IN)) and len(op.inputs) == 1


def find_chains(plan: Plan) -> list[tuple[str, ...]]:
    """The maximal fusable chains (two or more operators), in topological order (the planner)."""
    chains, taken = [], set()
    for op in plan.nodes:
        if op.name in taken or not _chainable(op):
            continue
        chain, cur = [op.name], op
        while True:
            consumers = plan.consumers(cur.name)
            if len(consumers) != 1:
                break  # the output, or a fan-out: the chain ends here (including cur)
            nxt = plan[consumers[0]]
            if not _chainable(nxt) or nxt.is_gpu != cur.is_gpu:
                break
            chain.append(nxt.name)
            cur = nxt
        taken.update(chain)
        if len(chain) > 1:
            chains.append(tuple(chain))
    return chains


def replace_nodes(plan: Plan, groups: list[Stage], rewrites: list[Rewrite]) -> Plan:
    """Put each stage in place of its members, re-pointing consumers and the output (the applier)."""
    renamed = {s.output: s.name for s in groups if s.output != s.name}
    members = {m.name for s in groups for m in s.members}
    nodes = [repoint(op, renamed) for op in plan.nodes if op.name not in members]
    nodes += [repoint(s, renamed) for s in groups]
    return plan.with_nodes(nodes, output=renamed.get(plan.output, plan.output), rewrites=rewrites)


def repoint(op: Op, renamed: dict[str, str]) -> Op:
    """``op`` reading ``renamed[name]`` wherever it read ``name`` (a stage's members too)."""
    if not any(i in renamed for i in op.inputs):
        return op
    changes = {"inputs": tuple(renamed.get(i, i) for i in op.inputs)}
    if isinstance(op, Stage):
        changes["members"] = tuple(repoint(m, renamed) for m in op.members)
    return replace(op, **changes)


def fuse(plan: Plan) -> Plan:
    """Fuse every maximal chain of ``plan`` into a stage (see the module docstring)."""
    chains = find_chains(plan)
    stages = [stage_of(tuple(plan[n] for n in c)) for c in chains]
    rewrites = [Rewrite("fusion", f"fused {' → '.join(c)} into stage {s.name!r}: one task, no serialization "
                                  f"between its {len(c)} operators", c, (s.name,)) for c, s in zip(chains, stages)]
    rewrites += _resource_breaks(plan)
    return replace_nodes(plan, stages, rewrites)


def _resource_breaks(plan: Plan) -> list[Rewrite]:
    notes = []
    for op in plan.nodes:
        for c in plan.consumers(op.name):
            nxt = plan[c]
            if _chainable(op) and _chainable(nxt) and len(plan.consumers(op.name)) == 1 and nxt.is_gpu != op.is_gpu:
                gpu, cpu = (nxt, op) if nxt.is_gpu else (op, nxt)
                notes.append(Rewrite("fusion", f"kept {op.name!r} and {nxt.name!r} apart: {gpu.name!r} runs on a "
                                               f"GPU and {cpu.name!r} does not (whole=True fuses them anyway)",
                                     (op.name, nxt.name), ()))
    return notes


def fuse_whole(plan: Plan) -> Plan:
    """Fuse every operator except the source into one stage (``whole=True``); a plan that already
    has stages (an optimized one) is left as it is, like ``fuse`` leaves stages alone."""
    names = tuple(op.name for op in plan.nodes if not isinstance(op, Source))
    if len(names) < 2 or any(isinstance(op, Stage) for op in plan.nodes):
        return plan
    stage = stage_of(tuple(plan[n] for n in names), name=f"{plan.name}[whole]")
    note = Rewrite("fusion", f"fused the whole flow ({len(names)} operators) into stage {stage.name!r}", names,
                   (stage.name,))
    return plan.with_nodes([plan.source, stage], output=stage.name, rewrites=[note])
