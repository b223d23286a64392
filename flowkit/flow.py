"""Flow and Node: the builder API. Each operator method adds a spec and returns a Node handle.

>>> import flowkit as fk
>>> flow = fk.Flow("demo", {"x": int})
>>> def double(row) -> int:
...     return row["x"] * 2
>>> out = flow.map(double, names=["y"]).filter(lambda row: row["y"] > 2)
>>> flow.run([{"x": 1}, {"x": 2}]).records()
[{'y': 4}]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping

from .errors import FlowError, SchemaError
from .plan import (AGGREGATES, JOIN_KINDS, QID, Agg, AnyOf, Combine, Filter, GroupBy, Join, Lookup, Map, Op,
                   Plan, Source, Union, cull, toposort)
from .repeats import repeated
from .schema import Schema, compatible, declared_types, merged_type, type_name
from .table import Table

__all__ = ["Flow", "Node", "RepeatWarning", "function_name"]


def function_name(fn: Callable) -> str:
    """``__name__`` of a function, the class name of a class or callable instance."""
    if isinstance(fn, type):
        return fn.__name__
    name = getattr(fn, "__name__", None)
    if name is None:
        name = getattr(getattr(fn, "func", None), "__name__", None) or type(fn).__name__
    return name


class RepeatWarning(UserWarning):
    """A builder call added an operator that repeats one the flow already has (the same function
    and options, on the same input or on that operator's own result): what running a notebook
    cell again does. The operator is added, and the warning says what the flow now means."""


class Node:
    """A handle to one operator in a flow; its methods add operators downstream of it."""

    __slots__ = ("flow", "op_name")

    def __init__(self, flow: "Flow", op_name: str):
        self.flow = flow
        self.op_name = op_name

    @property
    def name(self) -> str:
        """The operator's name (unique in its flow)."""
        return self.op_name

    @property
    def op(self) -> Op:
        return self.flow._ops[self.op_name]

    @property
    def schema(self) -> Schema:
        return self.op.schema

    def __repr__(self) -> str:
        op = self.op
        grouped = f" grouped by {op.grouped_by!r}" if op.grouped_by else ""
        return f"<Node {self.op_name!r} ({op.kind}) -> [{op.schema.describe()}]{grouped}>"

    # -- operators --------------------------------------------------------------------------
    def map(self, fn: Callable, names: str | Iterable[str] | None = None, *, col: str | None = None,
            batching: bool = False, gpu: bool = False, high_variance: bool = False,
            max_batch: int | None = None, max_wait_ms: float | None = None) -> "Node":
        """Apply ``fn`` per row (or per table with ``batching``); see docs/api.md for the exact rules."""
        self._ungrouped("map")
        if not callable(fn):
            raise FlowError(f"map needs a function or class, not {fn!r}")
        name = self.flow._unique(fn)
        names = (names,) if isinstance(names, str) else (tuple(names) if names is not None else None)
        declared = declared_types(fn, batching=batching)
        src = self.schema
        if col is not None:
            if col not in src:
                raise SchemaError(f"map {name!r}: no column {col!r}; the input has {list(src.names)}", column=col)
            if names is not None and len(names) != 1:
                raise SchemaError(f"map {name!r}: a column map renames at most one column, got names={list(names)}")
            new = names[0] if names else col
            t = declared[0] if declared and len(declared) == 1 else object
            cols = [(new if n == col else n, t if n == col else ty) for n, ty in src.items()]
            if new != col and new in src:
                raise SchemaError(f"map {name!r}: renaming {col!r} to {new!r} clashes with an existing column", column=new)
            schema, out_types, names = Schema(cols), (t,), (new,)
        else:
            if names is None:
                names = (name.split("#")[0] if not name.startswith("lambda") else "value",)
            if len(set(names)) != len(names):
                raise SchemaError(f"map {name!r}: names repeat a column: {list(names)}")
            if declared is None:
                out_types = (object,) * len(names)
            elif len(declared) != len(names):
                raise SchemaError(f"map {name!r}: {len(names)} names {list(names)} but the return annotation gives "
                                  f"{len(declared)} value(s) ({', '.join(type_name(t) for t in declared)})")
            else:
                out_types = declared
            schema = Schema(zip(names, out_types))
        if max_batch is not None and max_batch < 1:
            raise FlowError(f"map {name!r}: max_batch must be at least 1, not {max_batch}")
        if max_wait_ms is not None and max_wait_ms < 0:
            raise FlowError(f"map {name!r}: max_wait_ms must not be negative, not {max_wait_ms}")
        return self.flow._add(Map(name=name, inputs=(self.op_name,), schema=schema, fn=fn, names=names, col=col,
                                  batching=batching, gpu=gpu, high_variance=high_variance, max_batch=max_batch,
                                  max_wait_ms=max_wait_ms, out_types=out_types))

    def filter(self, pred: Callable, *, group: bool = False) -> "Node":
        """Keep rows where ``pred(row)`` is true; with ``group=True``, keep whole groups where
        ``pred(group_table)`` is true (the input must be grouped)."""
        if not callable(pred):
            raise FlowError(f"filter needs a function, not {pred!r}")
        name = self.flow._unique(pred)
        if group and not self.op.grouped_by:
            raise FlowError(f"filter {name!r} with group=True needs a grouped input: call .groupby(column) first")
        return self.flow._add(Filter(name=name, inputs=(self.op_name,), schema=self.schema, fn=pred, group=group,
                                     grouped_by=self.op.grouped_by))

    def groupby(self, column: str) -> "Node":
        """Group rows by the value of ``column`` (for ``agg``, ``filter(group=True)``, ``combine``)."""
        self._ungrouped("groupby")
        if column not in self.schema:
            raise SchemaError(f"groupby: no column {column!r}; the input has {list(self.schema.names)}", column=column)
        return self.flow._add(GroupBy(name=self.flow._unique_name(f"groupby_{column}"), inputs=(self.op_name,),
                                      schema=self.schema, column=column, grouped_by=column))

    def agg(self, fn: str, column: str | None = None) -> "Node":
        """Aggregate ``column`` with count|sum|min|max|mean: one row per group, or one row."""
        if fn not in AGGREGATES:
            raise FlowError(f"agg: unknown aggregate {fn!r}; choose one of {', '.join(AGGREGATES)}")
        src = self.schema
        if column is None:
            if fn != "count":
                raise FlowError(f"agg({fn!r}) needs a column")
            out = "count"
        else:
            if column not in src:
                raise SchemaError(f"agg: no column {column!r}; the input has {list(src.names)}", column=column)
            t = src[column]
            if fn in ("sum", "mean") and t not in (int, float, bool, object):
                raise SchemaError(f"agg({fn!r}): column {column!r} is {type_name(t)}, not numeric", column=column)
            out = f"{fn}_{column}"
        if fn == "count":
            out_t = int
        elif fn in ("min", "max") and column is not None and src[column] not in (int, float, bool):
            out_t = src[column]
        else:
            out_t = float
        key = self.op.grouped_by
        cols = ([(key, src[key])] if key else []) + [(out, out_t)]
        return self.flow._add(Agg(name=self.flow._unique_name(out if not key else f"{out}_by_{key}"),
                                  inputs=(self.op_name,), schema=Schema(cols), fn=fn, column=column))

    def combine(self) -> "Node":
        """Ungroup: the rows of every group, as one table."""
        if not self.op.grouped_by:
            raise FlowError("combine needs a grouped input: call .groupby(column) first")
        return self.flow._add(Combine(name=self.flow._unique_name("combine"), inputs=(self.op_name,), schema=self.schema))

    def lookup(self, key: str, *, dynamic: bool = False) -> "Node":
        """Add a column holding a stored object: the object under ``key`` (a column named ``key``),
        or with ``dynamic=True`` the object whose key is in column ``key`` (column ``f"{key}_value"``)."""
        self._ungrouped("lookup")
        src = self.schema
        if dynamic and key not in src:
            raise SchemaError(f"lookup(dynamic=True): no column {key!r} holds the keys; the input has {list(src.names)}",
                              column=key)
        out = f"{key}_value" if dynamic else key
        if out in src:
            raise SchemaError(f"lookup: the input already has a column {out!r}", column=out)
        return self.flow._add(Lookup(name=self.flow._unique_name(f"lookup_{key}"), inputs=(self.op_name,),
                                     schema=Schema(list(src.items()) + [(out, object)]), key=key, dynamic=dynamic))

    def join(self, other: "Node", on: Any = QID, how: str = "inner") -> "Node":
        """Join with ``other`` on the qid (default) or a column: inner, left or outer."""
        self._ungrouped("join")
        other = self._same_flow(other, "join")
        other._ungrouped("join")
        if how == "right":
            raise FlowError("join: how='right' is not supported; swap the sides and use how='left'")
        if how not in JOIN_KINDS:
            raise FlowError(f"join: how must be one of {', '.join(JOIN_KINDS)}, not {how!r}")
        left, right = self.schema, other.schema
        if on is not QID:
            for side, s in (("left", left), ("right", right)):
                if on not in s:
                    raise SchemaError(f"join on {on!r}: the {side} side has no such column; it has {list(s.names)}", column=on)
        for n, t in right.items():
            if n in left and not compatible(left[n], t):
                raise SchemaError(f"join: column {n!r} is {type_name(left[n])} on the left and {type_name(t)} on the "
                                  f"right; rename one side with a map first", column=n)
        schema = Schema(list(left.items()) + [(n, t) for n, t in right.items() if n not in left])
        return self.flow._add(Join(name=self.flow._unique_name("join"), inputs=(self.op_name, other.op_name), schema=schema,
                                   on=on, how=how))

    def union(self, other: "Node") -> "Node":
        """Rows of both inputs (which must have the same columns); each keeps its qid."""
        return self._same_schema_op(Union, "union", [other])

    def anyof(self, *others: "Node") -> "Node":
        """Whichever input produces its result first (inputs need the same columns)."""
        if not others:
            raise FlowError("anyof needs at least one other branch")
        return self._same_schema_op(AnyOf, "anyof", list(others))

    # -- helpers ----------------------------------------------------------------------------
    def _same_schema_op(self, cls, what: str, others: list) -> "Node":
        self._ungrouped(what)
        nodes = [self] + [self._same_flow(o, what) for o in others]
        cols = list(self.schema.items())
        for o in nodes[1:]:
            o._ungrouped(what)
            s = o.schema
            if s.names != self.schema.names:
                raise SchemaError(f"{what}: inputs need the same columns; {self.op_name!r} has {list(self.schema.names)}, "
                                  f"{o.op_name!r} has {list(s.names)}")
            for i, (n, t) in enumerate(s.items()):
                if not compatible(cols[i][1], t):
                    raise SchemaError(f"{what}: column {n!r} is {type_name(cols[i][1])} in {self.op_name!r} and "
                                      f"{type_name(t)} in {o.op_name!r}", column=n)
                cols[i] = (n, merged_type(cols[i][1], t))
        return self.flow._add(cls(name=self.flow._unique_name(what), inputs=tuple(n.op_name for n in nodes),
                                  schema=Schema(cols)))

    def _same_flow(self, other: Any, what: str) -> "Node":
        if not isinstance(other, Node):
            raise FlowError(f"{what} needs a node of the same flow, not {type(other).__name__}")
        if other.flow is not self.flow:
            raise FlowError(f"{what}: {other.op_name!r} belongs to flow {other.flow.name!r}, not {self.flow.name!r}")
        return other

    def _ungrouped(self, what: str) -> None:
        if self.op.grouped_by:
            raise FlowError(f"{what} on a table grouped by {self.op.grouped_by!r}: call .agg(...), "
                            f".filter(..., group=True) or .combine() first")


class Flow(Node):
    """A named dataflow with an input schema. The flow object is also its source node.

    ``flow.output = node`` chooses the output; without it the flow's single sink is the output.
    """

    def __init__(self, name: str, schema: Mapping[str, Any] | Schema):
        if not isinstance(name, str) or not name:
            raise FlowError("a flow needs a non-empty name")
        if not (name.isascii() and name[0].isalnum() and all(c.isalnum() or c in "-._~" for c in name)):
            # the name is a segment of the flow's HTTP path and a label value in /metrics
            raise FlowError(f"flow name {name!r} cannot be a URL path segment: use ASCII letters, digits and "
                            "'-', '_', '.', '~', starting with a letter or digit")
        self._name = name
        self.input_schema = schema if isinstance(schema, Schema) else Schema(schema)
        self._ops: dict[str, Op] = {}
        self._output: str | None = None
        self._lambdas = 0
        self._rewrites: tuple = ()
        self._original: Flow | None = None
        self._same_as: dict[str, str] = {}   # an operator that repeats another -> the one it repeats
        self._callers: dict[str, tuple] = {}  # operator -> the code (stack of code objects) that added it
        Node.__init__(self, self, "input")
        self._ops["input"] = Source(name="input", schema=self.input_schema)

    def __getstate__(self):
        """Pickled without the code that built it (code objects do not pickle)."""
        state, slots = super().__getstate__()
        return {**state, "_callers": {}}, slots

    @classmethod
    def from_plan(cls, plan: Plan, original: "Flow | None" = None) -> "Flow":
        """A flow whose operators are those of ``plan`` (used by ``fk.optimize``)."""
        f = cls(plan.name, plan.source.schema)
        f._ops = {op.name: op for op in plan.nodes}
        f._output = plan.output
        f._rewrites = plan.rewrites
        f._original = original
        f._lambdas = original._lambdas if original is not None else 0
        return f

    def __repr__(self) -> str:
        sinks = self._sinks() if self._output is None else []
        more = f"; {len(sinks)} sinks ({', '.join(sinks)}): set flow.output = node" if len(sinks) > 1 else ""
        return f"<Flow {self.name!r}: {len(self._ops) - 1} operators, input [{self.input_schema.describe()}]{more}>"

    @property
    def name(self) -> str:  # type: ignore[override]
        """The flow's name (the source node itself is named "input")."""
        return self._name

    # -- output and plan --------------------------------------------------------------------
    @property
    def output(self) -> Node:
        return Node(self, self._output_name())

    @output.setter
    def output(self, node: Node) -> None:
        self._output = self._same_flow(node, "output").op_name

    def _sinks(self) -> list[str]:
        """The operators nothing reads, in the order they were added."""
        consumed = {i for op in self._ops.values() for i in op.inputs}
        return [n for n in self._ops if n not in consumed]

    def _output_name(self) -> str:
        if self._output is not None:
            return self._output
        sinks = self._sinks()
        if len(sinks) > 1:
            raise FlowError(f"flow {self.name!r} has {len(sinks)} sinks ({', '.join(sinks)}); join them or set "
                            f"flow.output = node")
        return sinks[0]

    @property
    def plan(self) -> Plan:
        """The immutable plan: the operators the output depends on, in topological order."""
        output = self._output_name()
        if self._ops[output].grouped_by:
            raise FlowError(f"the output {output!r} is grouped: end the flow with .agg(...) or .combine()")
        return cull(Plan(self.name, toposort(tuple(self._ops.values())), output, self._rewrites))

    def sketch(self) -> Plan:
        """Every operator written so far, even while the flow has no single output yet (two
        sinks, a grouped end): what a notebook draws while the flow is being built. Its output
        is the empty name: it is for looking at, not for running."""
        return Plan(self.name, toposort(tuple(self._ops.values())), "", self._rewrites)

    @property
    def original(self) -> "Flow":
        """For an optimized flow, the flow it was optimized from (else itself)."""
        return self._original if self._original is not None else self

    def explain(self) -> list[str]:
        """Every rewrite the optimizer made, in plain words (empty for an unoptimized flow)."""
        return [str(r) for r in self._rewrites]

    # -- execution --------------------------------------------------------------------------
    def run(self, data: Any, store: Mapping[str, Any] | None = None) -> Table:
        """Run in this process with the reference executor; returns a Table."""
        from .runtime.reference import run_plan

        return run_plan(self.plan, data, store)

    # -- notebook ---------------------------------------------------------------------------
    def inspect(self, **rules):
        """A widget showing the plan before and after ``fk.optimize(self, **rules)``."""
        from flowkit_widgets import inspect as _inspect_widget

        return _inspect_widget(self, **rules)

    def _repr_mimebundle_(self, include=None, exclude=None):
        try:
            from flowkit_widgets.render import plan_mimebundle
        except ImportError:
            return {"text/plain": repr(self)}
        try:
            return plan_mimebundle(self.plan)
        except FlowError as e:   # not finished yet: draw what there is, and say what is missing
            return plan_mimebundle(self.sketch(), problem=str(e))

    # -- building ---------------------------------------------------------------------------
    def _add(self, op: Op) -> Node:
        level, caller = _caller()
        repeat = repeated(op, self._ops.values(), self._same_as)
        self._ops[op.name] = op
        self._callers[op.name] = caller
        if repeat is not None:
            twin, how = repeat
            if how == "input":
                self._same_as[op.name] = twin
            first = self._callers.get(twin, ())
            if len(first) != len(caller) or any(a is not b for a, b in zip(first, caller)):
                # other code added it (a cell ran again, equal code but compiled anew), not a loop
                warnings.warn(self._repeat_message(op, twin, how), RepeatWarning, stacklevel=level)
        return Node(self, op.name)

    def _repeat_message(self, op: Op, twin: str, how: str) -> str:
        """What a repeated operator does to the flow's meaning, and what to do about it."""
        rebuild = "rebuild the flow from its first cell (fk.Flow(...))"
        if how == "result":
            return (f"flow {self.name!r}: {op.name!r} repeats {twin!r} on the result of {twin!r} (same function and "
                    f"options): did a cell such as `x = x.{op.kind}(...)` run again? The flow now applies it twice; "
                    f"if that is not meant, {rebuild}.")
        head = (f"flow {self.name!r}: {op.name!r} repeats {twin!r} on the same input (same function and options): "
                f"did a notebook cell run again?")
        if self._output is not None:
            return f"{head} The output stays {self._output!r}; {op.name!r} is unused unless something reads it."
        sinks = self._sinks()
        return (f"{head} The flow now has {len(sinks)} sinks ({', '.join(map(repr, sinks))}): set flow.output = "
                f"<node> to choose one, or {rebuild}.")

    def _unique(self, fn: Callable) -> str:
        base = function_name(fn)
        if base == "<lambda>":
            self._lambdas += 1
            base = f"lambda#{self._lambdas}"
        return self._unique_name(base)

    def _unique_name(self, base: str) -> str:
        if base not in self._ops:
            return base
        i = 2
        while f"{base}#{i}" in self._ops:
            i += 1
        return f"{base}#{i}"


def _caller() -> tuple[int, tuple]:
    """The ``stacklevel`` of the first caller outside this module (for a warning) and the code
    objects of the calling stack from there on: a cell run again is other code, a loop is not."""
    here, level = os.path.abspath(__file__), 1
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1
    codes = []
    while frame is not None and len(codes) < 64:
        codes.append(frame.f_code)
        frame = frame.f_back
    return level, tuple(codes)
