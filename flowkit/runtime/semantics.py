"""Operator semantics over tables: the one definition every executor shares.

``apply(op, inputs, ctx)`` computes one operator spec over its input tables. The reference
executor, fused stages and the dask workers all call it, so every executor gives the same rows
with the same qids. ``ctx`` supplies stored objects for lookups (``ctx.lookup(key)``).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from ..errors import FlowError, OperatorError, SchemaError
from ..plan import QID, Agg, AnyOf, Combine, Filter, GroupBy, Join, Lookup, Map, Op, Source, Stage, Union
from ..schema import fits, is_null, short, type_name
from ..table import GroupedTable, Row, Table
from .cancel import Cancelled, checkpoint

__all__ = ["apply", "run_members", "run_batched", "callable_for", "Context", "DictStore"]


class Context(Protocol):
    def lookup(self, key: Any) -> Any: ...


class DictStore:
    """A lookup context over a plain mapping (``flow.run(x, store={...})``)."""

    __slots__ = ("store",)

    def __init__(self, store=None):
        self.store = store or {}

    def lookup(self, key: Any) -> Any:
        try:
            return self.store[key]
        except KeyError:
            raise KeyError(f"no stored object under key {key!r}") from None
        except TypeError:
            raise KeyError(f"unusable store key {key!r}") from None


# -- class operators: one instance per process ---------------------------------------------
_instances: dict[type, Any] = {}
_instances_lock = threading.Lock()


def callable_for(fn: Callable) -> Callable:
    """The callable to invoke: ``fn`` itself, or for a class its one instance in this process."""
    if not isinstance(fn, type):
        return fn
    inst = _instances.get(fn)
    if inst is None:
        with _instances_lock:
            inst = _instances.get(fn)
            if inst is None:
                inst = _instances[fn] = fn()
    return inst


def _callable(op) -> Callable:
    """``callable_for(op.fn)``; a class whose constructor raises is the operator's error."""
    try:
        return callable_for(op.fn)
    except Cancelled:
        raise
    except BaseException as e:
        raise OperatorError(op.name, None, e, message=f"operator {op.name!r}: creating {op.fn.__name__}() raised "
                                                     f"{type(e).__name__}: {e}") from e


# -- the operators ---------------------------------------------------------------------------
def apply(op: Op, inputs: list, ctx: Context):
    """Compute ``op`` over its inputs (Tables, or a GroupedTable where the op takes one)."""
    impl = _IMPLS.get(type(op))
    if impl is None:
        raise FlowError(f"no semantics for {type(op).__name__} {op.name!r}")
    return impl(op, inputs, ctx)


def run_members(stage: Stage, inputs: list, ctx: Context):
    """Run a fused stage's members in order, in this thread, with no copies between them."""
    from .reference import evaluate

    return evaluate(stage.members, dict(zip(stage.inputs, inputs)), stage.output, ctx)


def run_batched(stage: Stage, tables: list[Table], ctx: Context) -> list:
    """Run a batching stage over several requests' tables at once; one result per request, in
    order: its output Table, or the exception that failed it.

    Its batching maps run once over every request's rows (merged in order); every other member
    runs per request, so qids stay each request's own ints and a join on qid never mixes
    requests. A batching map returns one value per row, in order, so its output splits back by
    each request's row count. A failing batching map fails every request of the batch; any other
    member fails only its own request.
    """
    envs: list[dict | BaseException] = [{stage.inputs[0]: t} for t in tables]
    for m in stage.members:
        checkpoint()
        live = [env for env in envs if isinstance(env, dict)]
        if not live:
            break
        if isinstance(m, Map) and m.batching:
            parts = [env[m.inputs[0]] for env in live]
            merged = Table._make(parts[0].schema, [r for t in parts for r in t.rows], [q for t in parts for q in t.qids])
            out, start = apply(m, [merged], ctx), 0
            for env, t in zip(live, parts):
                env[m.name] = Table._make(out.schema, out.rows[start:start + len(t)], out.qids[start:start + len(t)])
                start += len(t)
            continue
        for i, env in enumerate(envs):
            if isinstance(env, dict):
                try:
                    env[m.name] = apply(m, [env[x] for x in m.inputs], ctx)
                except Cancelled:
                    raise
                except BaseException as e:
                    envs[i] = e
    return [env[stage.output] if isinstance(env, dict) else env for env in envs]


def _map(op: Map, inputs: list, ctx: Context) -> Table:
    t: Table = inputs[0]
    fn = _callable(op)
    if op.batching:
        rows = _map_batch(op, fn, t)
    elif op.col is None:
        rows = []
        schema, single = t.schema, len(op.names) == 1
        append = rows.append
        for r, q in zip(t.rows, t.qids):
            checkpoint()
            try:
                v = fn(Row(schema, r, q))
            except Cancelled:
                raise
            except BaseException as e:
                raise OperatorError(op.name, q, e) from e
            append((v,) if single else _unpack(op, v, q))
    else:
        i = t.schema.index[op.col]
        rows = []
        for r, q in zip(t.rows, t.qids):
            try:
                v = fn(r[i])
            except Cancelled:
                raise
            except BaseException as e:
                raise OperatorError(op.name, q, e) from e
            rows.append(r[:i] + (v,) + r[i + 1:])
    if op.out_types and any(ty is not object for ty in op.out_types):
        _check_outputs(op, rows, t.qids)
    return Table._make(op.schema, rows, list(t.qids))


def _map_batch(op: Map, fn: Callable, t: Table) -> list:
    arg = t.column(op.col) if op.col is not None else t
    first = t.qids[0] if t.qids else None
    if not t.rows:
        return []
    try:
        out = list(fn(arg))
    except Cancelled:
        raise
    except BaseException as e:
        raise OperatorError(op.name, first, e) from e
    if len(out) != len(t):
        raise OperatorError(op.name, first, None, message=f"batching map {op.name!r} returned {len(out)} values for "
                                                           f"{len(t)} rows; return one value per row, in order")
    if op.col is not None:
        i = t.schema.index[op.col]
        return [r[:i] + (v,) + r[i + 1:] for r, v in zip(t.rows, out)]
    if len(op.names) == 1:
        return [(v,) for v in out]
    return [_unpack(op, v, q) for v, q in zip(out, t.qids)]


def _unpack(op: Map, v: Any, qid: Any) -> tuple:
    try:
        tup = tuple(v)
    except Exception:   # not iterable, or its iteration failed
        tup = None
    if tup is None or len(tup) != len(op.names):
        raise OperatorError(op.name, qid, None, message=f"map {op.name!r} must return {len(op.names)} values for "
                                                         f"names {list(op.names)}, got {short(v)} (row qid={qid})")
    return tup


def _check_outputs(op: Map, rows: list, qids: list) -> None:
    # a column map's one output column is names[0] (its new or kept name); a row map's are all of them
    cols = [op.schema.index[op.names[0]]] if op.col else range(len(op.names))
    for c in cols:
        name, ty = op.schema.names[c], op.schema.types[c]
        if ty is object:
            continue
        for r, q in zip(rows, qids):
            v = r[c]
            if v is not None and not fits(v, ty):
                raise SchemaError(f"map {op.name!r} declares column {name!r} as {type_name(ty)} but returned "
                                  f"{type_name(type(v))} ({short(v)}) for row qid={q}", column=name)


def _filter(op: Filter, inputs: list, ctx: Context):
    src = inputs[0]
    fn = _callable(op)
    if op.group:
        kept = {}
        for key, t in src.groups.items():
            if _keeps(op, fn, t, t.qids[0] if t.qids else None):
                kept[key] = t
        return GroupedTable(src.schema, src.key, kept)
    if isinstance(src, GroupedTable):
        groups = {k: _filter_rows(op, fn, t) for k, t in src.groups.items()}
        return GroupedTable(src.schema, src.key, {k: t for k, t in groups.items() if len(t)})
    return _filter_rows(op, fn, src)


def _filter_rows(op: Filter, fn: Callable, t: Table) -> Table:
    rows, qids, schema = [], [], t.schema
    for r, q in zip(t.rows, t.qids):
        checkpoint()
        if _keeps(op, fn, Row(schema, r, q), q):
            rows.append(r)
            qids.append(q)
    return Table._make(t.schema, rows, qids)


def _keeps(op: Filter, fn: Callable, arg, qid) -> bool:
    """Whether the predicate keeps ``arg``. Its truth value is part of the user's code: a
    predicate returning an array (whose truth is ambiguous) fails as the operator, naming the row."""
    try:
        return bool(fn(arg))
    except Cancelled:
        raise
    except BaseException as e:
        raise OperatorError(op.name, qid, e) from e


def _groupby(op: GroupBy, inputs: list, ctx: Context) -> GroupedTable:
    t: Table = inputs[0]
    i = t.schema.index[op.column]
    rows: dict[Any, list] = {}
    qids: dict[Any, list] = {}
    for r, q in zip(t.rows, t.qids):
        k = _group_key(r[i])
        rows.setdefault(k, []).append(r)
        qids.setdefault(k, []).append(q)
    return GroupedTable(t.schema, op.column, {k: Table._make(t.schema, rows[k], qids[k]) for k in rows})


def _group_key(v: Any) -> Any:
    """A row's group: its value, with every null (NaN included, however many NaN objects there
    are) in the one null group, keyed ``None``."""
    if is_null(v):
        return None
    try:
        hash(v)
        return v
    except TypeError:
        raise SchemaError(f"groupby: value {short(v)} is not hashable and cannot be a group key") from None


def _agg(op: Agg, inputs: list, ctx: Context) -> Table:
    src = inputs[0]
    if isinstance(src, GroupedTable):
        rows = [(key, _aggregate(op, t)) for key, t in src.groups.items()]
    else:
        rows = [(_aggregate(op, src),)]
    return Table._make(op.schema, rows, list(range(len(rows))))


def _aggregate(op: Agg, t: Table) -> Any:
    if op.column is None:
        return len(t)
    values = [v for v in t.column(op.column) if not is_null(v)]
    if op.fn == "count":
        return len(values)
    try:
        if op.fn == "sum":
            return float(sum(values))
        if not values:
            return None
        if op.fn == "mean":
            return float(sum(values)) / len(values)
        v = min(values) if op.fn == "min" else max(values)
        return float(v) if op.schema.types[-1] is float else v
    except Exception as e:
        raise OperatorError(op.name, t.qids[0] if t.qids else None, e) from e


def _combine(op: Combine, inputs: list, ctx: Context) -> Table:
    return inputs[0].combine()


def _lookup(op: Lookup, inputs: list, ctx: Context) -> Table:
    t: Table = inputs[0]
    if not op.dynamic:
        try:
            obj = ctx.lookup(op.key)
        except Exception as e:
            raise OperatorError(op.name, t.qids[0] if t.qids else None, e) from e
        return Table._make(op.schema, [r + (obj,) for r in t.rows], list(t.qids))
    i = t.schema.index[op.key]
    rows = []
    for r, q in zip(t.rows, t.qids):
        try:
            rows.append(r + (ctx.lookup(r[i]),))
        except Exception as e:
            raise OperatorError(op.name, q, e) from e
    return Table._make(op.schema, rows, list(t.qids))


def _join(op: Join, inputs: list, ctx: Context) -> Table:
    left, right = inputs
    ls, rs = left.schema, right.schema
    extra = [rs.index[n] for n in rs.names if n not in ls.index]
    if op.on is QID:
        lkeys, rkeys = left.qids, right.qids
    else:
        li, ri = ls.index[op.on], rs.index[op.on]
        lkeys, rkeys = [r[li] for r in left.rows], [r[ri] for r in right.rows]
    index: dict[Any, list[int]] = {}   # null keys (NaN included) never match: they are not indexed
    for j, k in enumerate(rkeys):
        if not is_null(k):
            index.setdefault(k, []).append(j)
    rows, qids, matched = [], [], set()
    pad = (None,) * len(extra)
    for r, q, k in zip(left.rows, left.qids, lkeys):
        hits = None if is_null(k) else index.get(k)
        if hits:
            for j in hits:
                rr = right.rows[j]
                rows.append(r + tuple(rr[e] for e in extra))
                qids.append(q)
                matched.add(j)
        elif op.how != "inner":
            rows.append(r + pad)
            qids.append(q)
    if op.how == "outer":
        back = [rs.index.get(n) for n in ls.names]
        for j, (rr, q) in enumerate(zip(right.rows, right.qids)):
            if j not in matched:
                rows.append(tuple(None if b is None else rr[b] for b in back) + tuple(rr[e] for e in extra))
                qids.append(q)
    return Table._make(op.schema, rows, qids)


def _union(op: Union, inputs: list, ctx: Context) -> Table:
    rows, qids = [], []
    for t in inputs:
        rows.extend(t.rows)
        qids.extend(t.qids)
    return Table._make(op.schema, rows, qids)


def _anyof(op: AnyOf, inputs: list, ctx: Context) -> Table:
    t = inputs[0]
    return Table._make(op.schema, t.rows, t.qids)


def _stage(op: Stage, inputs: list, ctx: Context):
    return run_members(op, inputs, ctx)


def _source(op: Source, inputs: list, ctx: Context):
    return inputs[0]


_IMPLS: dict[type, Callable] = {
    Map: _map, Filter: _filter, GroupBy: _groupby, Agg: _agg, Combine: _combine, Lookup: _lookup,
    Join: _join, Union: _union, AnyOf: _anyof, Stage: _stage, Source: _source,
}
