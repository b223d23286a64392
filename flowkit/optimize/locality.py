"""Locality: split the plan before each dynamic lookup.

The key of a dynamic lookup is only known mid-request, so the part of a stage from the lookup
on becomes its own stage, marked ``lookup_split``: the runtime sends it to the worker that
already holds the looked-up object instead of moving the object to the work.

>>> import flowkit as fk
>>> from flowkit.optimize.fusion import fuse
>>> f = fk.Flow("f", {"k": str})
>>> _ = f.map(str.upper, col="k").lookup("k", dynamic=True).map(len, names=["n"], col="k_value")
>>> p = split_lookups(fuse(f.plan))
>>> [(op.name, op.kind) for op in p.stages()], p["lookup_k+len"].lookup_split
([('upper', 'map'), ('lookup_k+len', 'stage')], True)
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import Lookup, Plan, Rewrite, Stage, stage_of
from .fusion import repoint

__all__ = ["split_lookups"]


def _dynamic(op) -> bool:
    return isinstance(op, Lookup) and op.dynamic


def split_lookups(plan: Plan) -> Plan:
    nodes, rewrites, renamed = [], [], {}
    for op in plan.nodes:
        if _dynamic(op):
            nodes.append(stage_of((op,), lookup_split=True))
            rewrites.append(Rewrite("locality", f"dynamic lookup {op.name!r} runs as its own stage, placed where "
                                                f"the object for each key already lives", (op.name,), (op.name,)))
        elif isinstance(op, Stage) and any(_dynamic(m) for m in op.members):
            parts, notes = _split(op)
            nodes += parts
            rewrites += notes
            if parts[-1].name != op.name:
                renamed[op.name] = parts[-1].name
        else:
            nodes.append(op)
    nodes = [repoint(op, renamed) for op in nodes]
    return plan.with_nodes(nodes, output=renamed.get(plan.output, plan.output), rewrites=rewrites)


def _split(stage: Stage) -> tuple[list, list[Rewrite]]:
    """Cut ``stage`` before each dynamic lookup where the rest reads only one earlier member."""
    parts, notes, rest = [], [], stage
    while True:
        members = rest.members
        cut = next((i for i, m in enumerate(members) if i > 0 and _dynamic(m)), None)
        if cut is None:
            break
        head, tail = members[:cut], members[cut:]
        reads = sorted({i for m in tail for i in m.inputs} & {m.name for m in head})
        if len(reads) != 1:
            notes.append(Rewrite("locality", f"left {rest.name!r} whole: the operators after lookup "
                                             f"{members[cut].name!r} read {len(reads)} earlier results, so no "
                                             f"single cut exists", (members[cut].name,), ()))
            break
        first = _substage(head, reads[0])
        renamed = {reads[0]: first.name}
        rest = _substage(tuple(repoint(m, renamed) for m in tail), rest.output, batching=rest.batching)
        parts.append(first)
        notes.append(Rewrite("locality", f"split {stage.name!r} before dynamic lookup {members[cut].name!r}: "
                                         f"{rest.name!r} runs where the object for each key already lives",
                             (stage.name,), (first.name, rest.name)))
    if _dynamic(rest.members[0]) and not rest.lookup_split:
        rest = replace(rest, lookup_split=True)
        notes.append(Rewrite("locality", f"{rest.name!r} starts at dynamic lookup {rest.members[0].name!r}: it runs "
                                         f"where the object for each key already lives", (rest.name,), (rest.name,)))
    return parts + [rest], notes


def _substage(members: tuple, output: str, **fields):
    """A stage of ``members`` (or the bare operator when it is one that needs no stage)."""
    if len(members) == 1 and not _dynamic(members[0]) and not fields.get("batching"):
        return members[0]
    fields.setdefault("lookup_split", _dynamic(members[0]))
    return stage_of(members, output, **fields)
