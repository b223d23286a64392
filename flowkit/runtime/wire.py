"""What crosses the wire between the client and workers: pickled plans, tables and errors.

User functions defined in a notebook, a script or a test module are pickled *by value* (their
code travels), so workers run them even when their module cannot be imported there.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Any

import cloudpickle

from ..errors import FlowError, OperatorError
from ..plan import Op, Plan, Stage

__all__ = ["dumps", "loads", "dumps_plan", "dumps_error", "user_modules"]

_INSTALLED = tuple({str(Path(p).resolve()) for k in ("stdlib", "platstdlib", "purelib", "platlib")
                    if (p := sysconfig.get_paths().get(k))})


def dumps(obj: Any) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def _functions(op: Op):
    if isinstance(op, Stage):
        for m in op.members:
            yield from _functions(m)
    fn = getattr(op, "fn", None)
    if callable(fn):
        yield fn


def user_modules(plan: Plan) -> set:
    """Modules of the plan's functions that live outside installed packages (pickled by value)."""
    mods = set()
    for op in plan.nodes:
        for fn in _functions(op):
            name = getattr(fn, "__module__", None)
            mod = sys.modules.get(name) if name else None
            if mod is None or name == "__main__" or name.split(".")[0] == "flowkit":
                continue
            file = getattr(mod, "__file__", None)
            if file and not str(Path(file).resolve()).startswith(_INSTALLED):
                mods.add(mod)
    return mods


def dumps_plan(plan: Plan) -> bytes:
    mods = [m for m in user_modules(plan)]
    for m in mods:
        cloudpickle.register_pickle_by_value(m)
    try:
        return dumps(plan)
    finally:
        for m in mods:
            cloudpickle.unregister_pickle_by_value(m)


def dumps_error(exc: BaseException) -> bytes:
    """Pickle an exception for the client; unpicklable user exceptions become a FlowError text."""
    try:
        data = dumps(exc)
        loads(data)
        return data
    except Exception:
        if isinstance(exc, OperatorError):
            orig = exc.original
            plain = RuntimeError(f"{type(orig).__name__}: {orig}") if orig is not None else None
            return dumps(OperatorError(exc.operator, exc.qid, plain, str(exc)))
        return dumps(FlowError(f"{type(exc).__name__}: {exc}"))
