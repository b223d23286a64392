"""Batching: mark every stage that holds a ``batching=True`` map for dynamic batching.

The mark (``Stage.batching``) carries ``max_batch`` and ``max_wait_ms``: the operator's own
values where it set them, else the rule's defaults; and whether batches go ``eager``-ly (see
``Batching``). A lone batching map becomes a one-member stage of the same name so that the mark
has somewhere to live. Row-wise members of a fused batching stage run over the merged batch
table too.

>>> import flowkit as fk
>>> f = fk.Flow("f", {"x": int})
>>> _ = f.map(lambda t: [r["x"] for r in t], names=["y"], batching=True, max_batch=8)
>>> [(op.name, op.batching) for op in mark_batching(f.plan).stages()]
[('lambda#1', Batching(max_batch=8, max_wait_ms=5.0, eager=True))]
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import QID, Agg, Batching, Combine, Filter, GroupBy, Join, Map, Plan, Rewrite, Stage, stage_of

__all__ = ["mark_batching"]


def _batchers(op) -> list[Map]:
    return [m for m in op.operators if isinstance(m, Map) and m.batching]


def _mixes_requests(op) -> str | None:
    """The member that combines rows (so it would mix requests merged into one batch), if any."""
    for m in op.operators:
        if isinstance(m, (GroupBy, Agg, Combine)) or (isinstance(m, Filter) and m.group) or \
                (isinstance(m, Join) and m.on is not QID):
            return m.name
    return None


def mark_batching(plan: Plan, max_batch: int = 32, max_wait_ms: float = 5.0, eager: bool = True) -> Plan:
    nodes, rewrites = [], []
    for op in plan.nodes:
        maps = _batchers(op)
        if not maps or getattr(op, "replica_of", None):   # a replica was settled before it was copied
            nodes.append(op)
            continue
        mixer = _mixes_requests(op)
        if mixer is not None:
            nodes.append(op)
            rewrites.append(Rewrite("batching", f"{op.name!r} is not batched across requests: its member {mixer!r} "
                                                f"combines rows, which would mix requests", (op.name,), ()))
            continue
        spec = Batching(max_batch=min(m.max_batch or max_batch for m in maps),
                        max_wait_ms=min(m.max_wait_ms if m.max_wait_ms is not None else max_wait_ms for m in maps),
                        eager=eager)
        if isinstance(op, Stage) and op.batching == spec:   # marked by an earlier run of this pass
            nodes.append(op)
            continue
        if isinstance(op, Stage):
            op = replace(op, batching=spec)
        else:
            op = stage_of((op,), batching=spec)
        nodes.append(op)
        rewrites.append(Rewrite("batching", f"{op.name!r} merges concurrent requests into {spec.describe()} "
                                            f"(batching map{'s' if len(maps) > 1 else ''} "
                                            f"{', '.join(repr(m.name) for m in maps)})", (op.name,), (op.name,)))
    return plan.with_nodes(nodes, rewrites=rewrites)
