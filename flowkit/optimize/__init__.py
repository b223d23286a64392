"""The optimizer: pure ``Plan -> Plan`` passes, each recording what it rewrote and why.

``optimize`` is a straight line over the passes and keeps every intermediate plan
(``optimize_steps``), which is what the DAG inspector draws.

Rules (keyword arguments of ``fk.optimize``) and their defaults:

==============  =======  ==================================================================
rule            default  meaning
==============  =======  ==================================================================
fusion          True     fuse single-input/single-output chains of the same resource class
whole           False    fuse the entire flow into one stage (implies fusion; no locality split)
compete         1        copies in total of each high-variance operator (1 = no race)
locality        True     split stages before dynamic lookups, to run them where data lives
batching        True     mark stages with batching maps for dynamic batching
max_batch       32       default largest batch (a map's own ``max_batch`` wins)
max_wait_ms     5.0      default longest wait for a batch to fill (a map's own value wins)
eager_batches   True     a batch goes at once while its stage has a free thread; rows wait to
                         join one only while the stage is busy (False: always wait to fill)
==============  =======  ==================================================================
"""

from __future__ import annotations

from typing import Any

from ..errors import FlowError
from ..flow import Flow
from ..plan import Plan
from .batching import mark_batching
from .compete import race
from .fusion import find_chains, fuse, fuse_whole
from .locality import split_lookups

__all__ = ["optimize", "optimize_steps", "RULES", "resolve_rules", "fuse", "fuse_whole", "find_chains", "race",
           "split_lookups", "mark_batching"]

RULES: dict[str, Any] = {"fusion": True, "whole": False, "compete": 1, "locality": True, "batching": True,
                         "max_batch": 32, "max_wait_ms": 5.0, "eager_batches": True}


def resolve_rules(rules: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults updated by ``rules``; an unknown rule is an error naming the valid ones."""
    rules = dict(rules or {})
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise FlowError(f"unknown optimizer rule{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"valid rules: {', '.join(RULES)}")
    out = {**RULES, **rules}
    compete = out["compete"]
    if isinstance(compete, bool):
        out["compete"] = 2 if compete else 1
    elif not isinstance(compete, int) or compete < 1:
        raise FlowError(f"compete must be a whole number of copies >= 1 (or True for 2), not {compete!r}")
    if not isinstance(out["max_batch"], int) or out["max_batch"] < 1:
        raise FlowError(f"max_batch must be a whole number >= 1, not {out['max_batch']!r}")
    if out["max_wait_ms"] < 0:
        raise FlowError(f"max_wait_ms must not be negative, not {out['max_wait_ms']!r}")
    return out


def optimize_steps(plan: Plan, **rules) -> list[tuple[str, Plan]]:
    """Every intermediate plan, named by the pass that produced it (the first is the input)."""
    r = resolve_rules(rules)
    steps = [("input", plan)]
    if r["whole"]:
        steps.append(("fusion", fuse_whole(steps[-1][1])))
    elif r["fusion"]:
        steps.append(("fusion", fuse(steps[-1][1])))
    if r["locality"] and not r["whole"]:  # whole=True asks for one stage: locality does not split it
        steps.append(("locality", split_lookups(steps[-1][1])))
    if r["batching"]:
        steps.append(("batching", mark_batching(steps[-1][1], r["max_batch"], r["max_wait_ms"], r["eager_batches"])))
    if r["compete"] > 1:
        steps.append(("compete", race(steps[-1][1], r["compete"])))
    return steps


def optimize(flow: Flow, **rules) -> Flow:
    """A new flow whose plan is rewritten by the enabled passes; ``flow`` is untouched.

    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"x": int})
    >>> _ = f.map(abs, names=["a"]).map(abs, names=["b"])
    >>> fk.optimize(f).explain()
    ["fusion: fused abs → abs#2 into stage 'abs+abs#2': one task, no serialization between its 2 operators"]
    >>> fk.optimize(f, fuse=True)
    Traceback (most recent call last):
    ...
    flowkit.errors.FlowError: unknown optimizer rule 'fuse'; valid rules: fusion, whole, compete, locality, batching, max_batch, max_wait_ms, eager_batches
    """
    if not isinstance(flow, Flow):
        raise FlowError(f"optimize needs a Flow, not {type(flow).__name__}")
    final = optimize_steps(flow.plan, **rules)[-1][1]
    return Flow.from_plan(final, original=flow.original)
