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

__all__ = ["dumps", "loads", "dumps_plan", "dumps_table", "dumps_error", "user_modules", "operator_needing"]

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
        try:
            return dumps(plan)
        except Exception as e:
            raise _unpicklable(plan, e) from e
    finally:
        for m in mods:
            cloudpickle.unregister_pickle_by_value(m)


def _unpicklable(plan: Plan, error: Exception) -> FlowError:
    """Which operator's function cannot travel to the workers, and what to do about it."""
    for op in plan.nodes:
        for fn in _functions(op):
            try:
                dumps(fn)
            except Exception as e:
                return FlowError(f"operator {op.name!r} cannot be sent to the workers: {type(e).__name__}: {e}. "
                                 "A function takes everything it refers to along; create such objects inside it, "
                                 "or in a class operator's __init__ (which runs once on each worker)")
    return FlowError(f"the plan of flow {plan.name!r} cannot be sent to the workers: {type(error).__name__}: {error}")


def operator_needing(plan: Plan, module: str) -> str | None:
    """The first operator whose pickled function refers to ``module`` (which a worker could not
    import), if any."""
    for op in plan.nodes:
        for fn in _functions(op):
            try:
                if module.encode() in dumps(fn):
                    return op.name
            except Exception:
                continue
    return None


def dumps_table(table) -> bytes:
    """A result table for the wire; a value that cannot be pickled is a FlowError naming its column."""
    try:
        return dumps(table)
    except Exception as e:
        for name in table.schema.names:
            for value in table.column(name):
                try:
                    dumps(value)
                except Exception as bad:
                    raise FlowError(f"column {name!r} of the result holds a {type(value).__name__}, which cannot be "
                                    f"sent back ({type(bad).__name__}: {bad}); return plain data: numbers, "
                                    "strings, arrays, tensors") from e
        raise


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
