"""Schemas: ordered column names with their types, and the checks that values fit them.

Column types are Python classes: ``int``, ``float``, ``str``, ``bool``, ``bytes``,
``numpy.ndarray``, ``torch.Tensor`` (or any other class, checked with ``isinstance``) and
``object`` for anything. Null fits every type: ``None``, and a float NaN, pandas' ``NA`` or
``NaT``, which are null wherever they enter (``is_null``). ``float`` columns accept ints;
``int`` and ``float`` columns do not accept bools.
"""

from __future__ import annotations

import numbers
import typing
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import SchemaError

__all__ = ["Schema", "type_name", "fits", "check_type", "is_null", "short", "declared_types", "merged_type", "as_type"]


def type_name(t: Any) -> str:
    """Short, readable name of a column type (``numpy.ndarray``, ``torch.Tensor``)."""
    if t is object:
        return "object"
    module = getattr(t, "__module__", "builtins")
    name = getattr(t, "__qualname__", None) or repr(t)
    if module == "builtins":
        return name
    return f"{module.split('.')[0]}.{name}"


def is_null(v: Any) -> bool:
    """Is ``v`` null: ``None``, a float NaN (Python's or numpy's), pandas' ``NA`` or ``NaT``?

    >>> is_null(None), is_null(float("nan")), is_null(np.float32("nan")), is_null(0.0), is_null("")
    (True, True, True, False, False)
    """
    if v is None:
        return True
    if isinstance(v, (float, np.floating)):
        return bool(v != v)
    return type(v).__name__ in ("NAType", "NaTType")


def fits(value: Any, t: Any) -> bool:
    """Does ``value`` fit a column of type ``t``? A null fits every type.

    >>> fits(1, float), fits(True, int), fits(None, str), fits(float("nan"), int), fits("a", object)
    (True, False, True, True, True)
    """
    if t is object or is_null(value):
        return True
    if t is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if t is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if t is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    return isinstance(value, t)


def check_type(t: Any, where: str) -> Any:
    """Validate that ``t`` can be a column type; returns it."""
    if not isinstance(t, type):
        raise SchemaError(f"{where}: column type must be a class such as int, str or numpy.ndarray, not {t!r}")
    return t


def compatible(a: Any, b: Any) -> bool:
    """Can columns of types ``a`` and ``b`` hold the same values (for joins and unions)?"""
    if a is b or a is object or b is object:
        return True
    if {a, b} == {int, float}:
        return True
    return issubclass(a, b) or issubclass(b, a)


class Schema:
    """Ordered column names and types.

    >>> s = Schema({"x": int, "s": str})
    >>> s.names, s["x"], "s" in s, len(s)
    (('x', 's'), <class 'int'>, True, 2)
    >>> s
    Schema({'x': int, 's': str})
    """

    __slots__ = ("names", "types", "index", "_hash")

    def __init__(self, columns: Mapping[str, Any] | Iterable[tuple[str, Any]] | "Schema"):
        if isinstance(columns, Schema):
            items = list(columns.items())
        elif isinstance(columns, Mapping):
            items = list(columns.items())
        else:
            items = list(columns)
        names = []
        for name, t in items:
            if not isinstance(name, str) or not name:
                raise SchemaError(f"column names must be non-empty strings, not {name!r}")
            if name in names:
                raise SchemaError(f"column {name!r} appears twice in the schema", column=name)
            check_type(t, f"column {name!r}")
            names.append(name)
        self.names: tuple[str, ...] = tuple(names)
        self.types: tuple[Any, ...] = tuple(t for _, t in items)
        self.index: dict[str, int] = {n: i for i, n in enumerate(self.names)}
        self._hash = None

    def __getitem__(self, name: str) -> Any:
        try:
            return self.types[self.index[name]]
        except KeyError:
            raise SchemaError(f"no column {name!r}; the columns are {list(self.names)}", column=name) from None

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):
        return zip(self.names, self.types)

    def keys(self):
        return self.names

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Schema):
            return self.names == other.names and self.types == other.types
        if isinstance(other, Mapping):
            return list(self.items()) == list(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.names, self.types))
        return self._hash

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {type_name(t)}" for n, t in self.items())
        return f"Schema({{{inner}}})"

    def __getstate__(self):
        return list(self.items())

    def __setstate__(self, state):
        self.__init__(state)

    def describe(self) -> str:
        """``x: int, s: str`` — the form used in labels and messages."""
        return ", ".join(f"{n}: {type_name(t)}" for n, t in self.items())

    def check_row(self, values: tuple, qid: Any, where: str = "input") -> None:
        """Raise ``SchemaError`` naming the column if a value does not fit its type."""
        for name, t, v in zip(self.names, self.types, values):
            if t is not object and v is not None and not fits(v, t):
                raise SchemaError(
                    f"{where}: column {name!r} expects {type_name(t)}, found {type_name(type(v))} "
                    f"({short(v)}) in row qid={qid}",
                    column=name,
                )


def short(v: Any, limit: int = 40) -> str:
    """``repr(v)`` cut to ``limit`` characters (ending in ``...`` when cut): a value in a message.

    >>> short("abc"), short(list(range(30)), limit=12)
    ("'abc'", '[0, 1, 2,...')
    """
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


# -- types declared by annotations, and merged by union ----------------------------------------------
def merged_type(a: Any, b: Any) -> Any:
    """The column type of a union of compatible columns: ``object`` if either is, int+float is float.

    >>> merged_type(int, float), merged_type(str, object), merged_type(str, str)
    (<class 'float'>, <class 'object'>, <class 'str'>)
    """
    if a is b:
        return a
    if object in (a, b):
        return object
    return float if {a, b} == {int, float} else a


def declared_types(fn: Callable, batching: bool) -> tuple[Any, ...] | None:
    """Output types from the return annotation: ``T`` -> (T,), ``tuple[A, B]`` -> (A, B).

    Batching maps return a list per table, so ``list[T]`` is read as ``T``. ``None`` when absent.
    """
    target = fn.__call__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        try:
            hints = getattr(target, "__annotations__", {}) or {}
        except Exception:
            return None
    if "return" not in hints:
        return None
    ann = hints["return"]
    if batching:
        if typing.get_origin(ann) in (list, tuple, typing.Sequence) and typing.get_args(ann):
            args = typing.get_args(ann)
            ann = args[0]
        else:
            return None
    if typing.get_origin(ann) is tuple:
        args = typing.get_args(ann)
        if not args or Ellipsis in args:
            return None
        return tuple(as_type(a) for a in args)
    return (as_type(ann),)


def as_type(ann: Any) -> Any:
    if ann is None or ann is type(None) or ann is typing.Any:
        return object
    if isinstance(ann, type):
        return ann
    origin = typing.get_origin(ann)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return as_type(args[0]) if len(args) == 1 else object
    if isinstance(origin, type):
        return origin
    return object

