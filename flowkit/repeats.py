"""When an operator repeats one already in its flow — the same work on the same input, or on
its own result — as happens when a notebook cell that adds it runs again (``Flow`` warns with
``RepeatWarning``). Pure functions over operator specs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from .plan import Op
from .schema import Schema  # noqa: F401  (the doctest builds specs with it)

__all__ = ["repeated", "same_work", "same_function"]


def repeated(op: Op, ops: Iterable[Op], same_as: Mapping[str, str]) -> tuple[str, str] | None:
    """The operator that ``op`` repeats and how: ``"input"`` (the same work on the same input,
    counting repeats as the operator they repeat) or ``"result"`` (the same work again on that
    operator's own result); None when ``op`` repeats nothing.

    >>> from flowkit.plan import Source, Map
    >>> s = Schema({"x": int})
    >>> ops = [Source(name="input", schema=s), Map(name="abs", inputs=("input",), schema=s, fn=abs, col="x")]
    >>> again = Map(name="abs#2", inputs=("input",), schema=s, fn=abs, col="x")
    >>> repeated(again, ops, {}), repeated(dataclasses.replace(again, inputs=("abs",)), ops, {})
    (('abs', 'input'), ('abs', 'result'))
    >>> repeated(dataclasses.replace(again, fn=round), ops, {}) is None
    True
    """
    def canon(names):
        return tuple(same_as.get(n, n) for n in names)

    found = None
    for old in ops:
        if type(old) is not type(op) or not same_work(op, old):
            continue
        if op.inputs == (old.name,):
            return old.name, "result"
        if found is None and canon(op.inputs) == canon(old.inputs):
            found = (same_as.get(old.name, old.name), "input")
    return found


def same_work(a: Op, b: Op) -> bool:
    """Do two specs of one class describe the same work, whatever their names and inputs? A
    function counts as the same when it is, or has the same code (a cell that defines it ran again)."""
    for f in dataclasses.fields(a):
        if f.name in ("name", "inputs"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "fn" and callable(x):
            if not same_function(x, y):
                return False
        elif not (x is y or x == y):
            return False
    return True


def same_function(f: Any, g: Any) -> bool:
    if f is g:
        return True
    if isinstance(f, type) and isinstance(g, type):
        return (f.__module__, f.__qualname__) == (g.__module__, g.__qualname__)
    code_f, code_g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return code_f is not None and code_f == code_g and getattr(f, "__qualname__", None) == getattr(g, "__qualname__", None)
