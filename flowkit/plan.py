"""The plan: an immutable logical DAG of operator specs.

An operator spec describes work; it does not run it (the executors in ``flowkit.runtime`` do).
Every spec is a frozen dataclass with a unique ``name`` (the operator's function name, made
unique within the plan), the names of its ``inputs`` and its output ``schema``. A ``Plan`` is the
specs in topological order plus the name of its output, and the notes that optimizer passes
recorded. Passes in ``flowkit.optimize`` build new plans; nothing here mutates.

>>> from flowkit.schema import Schema
>>> s = Schema({"x": int})
>>> p = Plan("demo", (Source(name="input", schema=s), Map(name="inc", inputs=("input",), schema=s, fn=abs)), "inc")
>>> [op.name for op in p.nodes], p.consumers("input")
(['input', 'inc'], ('inc',))
>>> p
<Plan 'demo': 1 operator, output 'inc'>
  inc <- input: map (output)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

from .errors import FlowError
from .schema import Schema

__all__ = [
    "QID", "Op", "Source", "Map", "Filter", "GroupBy", "Agg", "Combine", "Lookup", "Join", "Union",
    "AnyOf", "Stage", "Batching", "Rewrite", "Plan", "AGGREGATES", "JOIN_KINDS", "stage_of",
]

AGGREGATES = ("count", "sum", "min", "max", "mean")
JOIN_KINDS = ("inner", "left", "outer")


class _Qid:
    """The join key meaning "the row's qid" (``fk.QID``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "fk.QID"

    def __reduce__(self):
        return (_Qid, ())


QID = _Qid()


@dataclass(frozen=True, kw_only=True)
class Op:
    """Base of every operator spec."""

    name: str
    inputs: tuple[str, ...] = ()
    schema: Schema
    grouped_by: str | None = None

    kind = "op"
    shape = "box"       # the renderer's node shape: a visual hint on the class (streamz-style)

    @property
    def hints(self) -> tuple[str, ...]:
        return ()

    @property
    def is_gpu(self) -> bool:
        return False

    @property
    def operators(self) -> tuple["Op", ...]:
        """The user's operators this node runs: itself (a fused stage: its members)."""
        return (self,)


@dataclass(frozen=True, kw_only=True)
class Source(Op):
    """The flow's input table."""

    kind = "input"
    shape = "invhouse"


@dataclass(frozen=True, kw_only=True)
class Batching:
    """Dynamic batching settings recorded on a batching map or stage.

    ``eager``: a batch goes at once while the stage has a free thread on its worker, and rows wait
    to join one only while the worker's threads are busy, until one is free — as Triton's dynamic
    batcher without a queue delay waits for a free model instance; ``max_wait_ms`` bounds that
    wait only behind stuck work (``runtime/batcher.batch_wait``). Not eager: every batch waits
    up to ``max_wait_ms`` to fill, even a lone request on an idle worker, and then goes whether
    or not a thread is free (as Ray Serve's ``@serve.batch``; for a batching map that mostly
    waits on I/O, whose batches gain from overlapping). A GPU stage
    batches on its GPU's scheduler (``flowkit.gpu``), which packs batches by its own rule."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    eager: bool = True

    def describe(self) -> str:
        """The window in words.

        >>> Batching(max_batch=8).describe(), Batching(max_batch=8, max_wait_ms=2, eager=False).describe()
        ('batches of up to 8 rows, at once while a thread is free, else when one frees', 'batches of up to 8 rows, waiting at most 2 ms')
        """
        how = "at once while a thread is free, else when one frees" if self.eager else \
            f"waiting at most {self.max_wait_ms:g} ms"
        return f"batches of up to {self.max_batch} rows, {how}"


@dataclass(frozen=True, kw_only=True)
class Map(Op):
    """Row map (``col is None``): the output row is exactly the ``names`` columns.
    Column map (``col``): ``col`` is replaced by ``fn(row[col])``. ``batching``: ``fn`` takes
    the whole table and returns one value (or tuple) per row."""

    fn: Callable
    names: tuple[str, ...] = ()
    col: str | None = None
    batching: bool = False
    gpu: bool = False
    high_variance: bool = False
    max_batch: int | None = None
    max_wait_ms: float | None = None
    out_types: tuple[Any, ...] = ()     # declared output types checked at run time (object = unchecked)

    kind = "map"

    @property
    def hints(self) -> tuple[str, ...]:
        return tuple(h for h, on in (("gpu", self.gpu), ("batching", self.batching),
                                     ("high_variance", self.high_variance)) if on)

    @property
    def is_gpu(self) -> bool:
        return self.gpu


@dataclass(frozen=True, kw_only=True)
class Filter(Op):
    """Keep rows where ``fn(row)`` is true; with ``group``, keep groups where ``fn(group_table)`` is."""

    fn: Callable
    group: bool = False
    kind = "filter"


@dataclass(frozen=True, kw_only=True)
class GroupBy(Op):
    column: str
    kind = "groupby"


@dataclass(frozen=True, kw_only=True)
class Agg(Op):
    fn: str
    column: str | None
    kind = "agg"


@dataclass(frozen=True, kw_only=True)
class Combine(Op):
    kind = "combine"


@dataclass(frozen=True, kw_only=True)
class Lookup(Op):
    """Add a column holding a stored object: ``key`` itself, or (``dynamic``) the key in column ``key``."""

    key: str
    dynamic: bool = False
    kind = "lookup"

    @property
    def hints(self) -> tuple[str, ...]:
        return ("dynamic",) if self.dynamic else ()


@dataclass(frozen=True, kw_only=True)
class Join(Op):
    on: Any = QID
    how: str = "inner"
    kind = "join"


@dataclass(frozen=True, kw_only=True)
class Union(Op):
    kind = "union"


@dataclass(frozen=True, kw_only=True)
class AnyOf(Op):
    """Whichever input is ready first wins. ``race`` names the stage it races replicas of."""

    race: str | None = None
    kind = "anyof"
    shape = "diamond"


@dataclass(frozen=True, kw_only=True)
class Stage(Op):
    """A fused group of operators run as one task, in order, with no serialization between them.

    ``members`` are specs whose inputs name either earlier members or the stage's own inputs.
    ``replica_of``/``replica`` mark a competitive copy; ``lookup_split`` marks a stage that
    starts at a dynamic lookup (so the runtime may run it where the looked-up object lives).
    """

    members: tuple[Op, ...]
    output: str = ""
    batching: Batching | None = None
    replica_of: str | None = None
    replica: int | None = None
    lookup_split: bool = False
    kind = "stage"

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def operators(self) -> tuple[Op, ...]:
        return self.members

    @property
    def is_gpu(self) -> bool:
        return any(m.is_gpu for m in self.members)

    @property
    def high_variance(self) -> bool:
        return any(getattr(m, "high_variance", False) for m in self.members)

    @property
    def hints(self) -> tuple[str, ...]:
        hs: list[str] = []
        for m in self.members:
            hs += [h for h in m.hints if h not in hs]
        return tuple(hs)


@dataclass(frozen=True)
class Rewrite:
    """One change an optimizer pass made: which pass, what it says, which operators it touched."""

    rule: str
    message: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


@dataclass(frozen=True, repr=False)
class Plan:
    """Operator specs in topological order, the output's name, and the rewrites recorded so far.

    Its repr is its name and ``describe()``:

    >>> Plan("demo", (Source(name="input", schema=Schema({"x": int})),), "input")
    <Plan 'demo': 0 operators, output 'input'>
    """

    name: str
    nodes: tuple[Op, ...]
    output: str
    rewrites: tuple[Rewrite, ...] = field(default=(), compare=False)

    @cached_property
    def by_name(self) -> dict[str, Op]:
        return {op.name: op for op in self.nodes}

    @cached_property
    def _consumers(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {op.name: [] for op in self.nodes}
        for op in self.nodes:
            for i in op.inputs:
                if op.name not in out[i]:
                    out[i].append(op.name)
        return {k: tuple(v) for k, v in out.items()}

    def __getitem__(self, name: str) -> Op:
        try:
            return self.by_name[name]
        except KeyError:
            raise FlowError(f"no operator {name!r} in plan {self.name!r}") from None

    def consumers(self, name: str) -> tuple[str, ...]:
        return self._consumers[name]

    @property
    def source(self) -> Source:
        return next(op for op in self.nodes if isinstance(op, Source))

    @property
    def schema(self) -> Schema:
        return self[self.output].schema

    def with_nodes(self, nodes, output: str | None = None, rewrites=()) -> "Plan":
        """A new plan with these nodes (sorted topologically), keeping earlier rewrites (a rewrite
        already recorded, by a pass run again on its own output, is not recorded twice)."""
        new = tuple(r for r in dict.fromkeys(rewrites) if r not in self.rewrites)
        return Plan(self.name, toposort(tuple(nodes)), output or self.output, self.rewrites + new)

    def __repr__(self) -> str:
        n = len(self.stages())
        notes = f", {len(self.rewrites)} rewrite{'s' if len(self.rewrites) != 1 else ''}" if self.rewrites else ""
        head = f"<Plan {self.name!r}: {n} operator{'s' if n != 1 else ''}, output {self.output!r}{notes}>"
        body = self.describe()
        return head + ("\n" + "\n".join("  " + line for line in body.splitlines()) if body else "")

    def describe(self) -> str:
        """The plan as text, one operator per line: name, kind, inputs and marks."""
        lines = []
        for op in self.stages():
            marks = [h for h in op.hints if not (h == "batching" and getattr(op, "batching", None))]
            if isinstance(op, Stage):
                marks.insert(0, "[" + " → ".join(op.member_names) + "]")
                if op.batching:
                    marks.append(f"batching(max_batch={op.batching.max_batch}, max_wait_ms={op.batching.max_wait_ms:g}"
                                 f"{'' if op.batching.eager else ', eager=False'})")
                if op.lookup_split:
                    marks.append("lookup_split")
                if op.replica:
                    marks.append(f"replica {op.replica} of {op.replica_of!r}")
            out = " (output)" if op.name == self.output else ""
            lines.append(f"{op.name} <- {', '.join(op.inputs)}: {op.kind} {' '.join(marks)}".rstrip() + out)
        return "\n".join(lines)

    def stages(self) -> tuple[Op, ...]:
        """The units an executor schedules: every spec except the source."""
        return tuple(op for op in self.nodes if not isinstance(op, Source))


def toposort(nodes: tuple[Op, ...]) -> tuple[Op, ...]:
    """Order specs so every input comes before its consumers (stable for already-sorted input)."""
    by_name = {op.name: op for op in nodes}
    done: set[str] = set()
    out: list[Op] = []
    visiting: set[str] = set()

    def visit(op: Op) -> None:
        if op.name in done:
            return
        if op.name in visiting:
            raise FlowError(f"the plan has a cycle through {op.name!r}")
        visiting.add(op.name)
        for i in op.inputs:
            if i not in by_name:
                raise FlowError(f"operator {op.name!r} reads {i!r}, which is not in the plan")
            visit(by_name[i])
        visiting.discard(op.name)
        done.add(op.name)
        out.append(op)

    for op in nodes:
        visit(op)
    return tuple(out)


def cull(plan: Plan) -> Plan:
    """Keep only the operators the output depends on."""
    keep: set[str] = set()
    stack = [plan.output]
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack.extend(plan[n].inputs)
    return Plan(plan.name, tuple(op for op in plan.nodes if op.name in keep), plan.output, plan.rewrites)


def stage_of(members: tuple[Op, ...], output: str | None = None, **fields) -> Stage:
    """One stage running ``members`` (topologically ordered) in order. Its output is the member
    ``output`` (the last one by default), its inputs what members read from outside it, and its
    name the members' names joined by ``+`` unless ``fields`` gives one.

    >>> s = Schema({"x": int})
    >>> a = Map(name="a", inputs=("input",), schema=s, fn=abs)
    >>> b = Map(name="b", inputs=("a",), schema=s, fn=abs)
    >>> st = stage_of((a, b))
    >>> st.name, st.inputs, st.output, stage_of((a,), lookup_split=True).name
    ('a+b', ('input',), 'b', 'a')
    """
    inside = {m.name for m in members}
    out = members[-1] if output is None else next(m for m in members if m.name == output)
    inputs = tuple(dict.fromkeys(i for m in members for i in m.inputs if i not in inside))
    fields.setdefault("name", "+".join(m.name for m in members))
    return Stage(inputs=inputs, schema=out.schema, grouped_by=out.grouped_by, members=members, output=out.name,
                 **fields)
