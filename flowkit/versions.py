"""A flow's version: a hash of its plan and of its functions' code, which changes when the flow
or any of its functions does. Profiles are cached per version (``flowkit.profiling``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from .flow import Flow
from .plan import Op, Plan

__all__ = ["flow_version"]


def _code_digest(obj: Any, h, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    code = getattr(obj, "__code__", None)
    if isinstance(obj, type):
        h.update(obj.__qualname__.encode())
        for k, v in sorted(vars(obj).items(), key=lambda kv: kv[0]):
            if callable(v) or isinstance(v, (staticmethod, classmethod)):
                h.update(k.encode())
                _code_digest(getattr(v, "__func__", v), h, seen)
        return
    if code is None:
        h.update(repr(getattr(obj, "__qualname__", obj)).encode())
        return
    _code_obj(code, h)
    for d in getattr(obj, "__defaults__", None) or ():
        h.update(repr(d).encode())


def _code_obj(code, h) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _code_obj(c, h)
        else:
            h.update(repr(c).encode())


def flow_version(flow: Flow | Plan) -> str:
    """A hash of the plan (every operator's kind, name, inputs, schema and options) and of its
    functions' code: it changes when the flow or any of its functions does.

    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"x": int}); _ = f.map(abs, names=["y"])
    >>> g = fk.Flow("f", {"x": int}); _ = g.map(abs, names=["y"])
    >>> flow_version(f) == flow_version(g), flow_version(f) == flow_version(fk.Flow("f", {"x": int}))
    (True, False)
    """
    plan = flow.plan if isinstance(flow, Flow) else flow
    h = hashlib.sha256(plan.name.encode())
    seen: set = set()

    def visit(op: Op) -> None:
        h.update(f"{type(op).__name__}|{op.name}|{op.inputs}|{op.schema!r}".encode())
        for k, v in sorted(vars(op).items()):
            if k in ("name", "inputs", "schema"):
                continue
            if k == "members":
                for m in v:
                    visit(m)
            elif k == "fn" and callable(v):
                _code_digest(v, h, seen)
            else:
                h.update(f"{k}={v!r}".encode())

    for op in plan.nodes:
        visit(op)
    return h.hexdigest()[:20]
