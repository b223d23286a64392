"""Tables of rows with qids: the data that flows between operators.

A ``Table`` is a schema, a list of row tuples and a list of qids (one per row). It is cheap for
the common serving case of one row. A ``Row`` is a light view used to call user functions:
``row["col"]`` and ``row.qid``. A ``GroupedTable`` is what ``groupby`` produces: sub-tables by
group value, consumed by ``agg``, ``filter(group=True)`` and ``combine``.

Null is ``None``. A float NaN (Python's or numpy's), pandas' ``NA`` and ``NaT`` are null too
(``schema.is_null`` says what counts): every constructor and every input form stores them as
``None``, and groupby, agg and join treat a NaN that an operator computed as null.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import SchemaError
from .schema import Schema, is_null, short

__all__ = ["Table", "Row", "GroupedTable", "as_table", "infer_type"]


class Row:
    """One row: ``row["col"]``, ``row.qid``, ``row.get("col", default)``, ``dict(row)``."""

    __slots__ = ("schema", "values", "qid")

    def __init__(self, schema: Schema, values: tuple, qid: Any):
        self.schema = schema
        self.values = values
        self.qid = qid

    def __getitem__(self, name: str) -> Any:
        try:
            return self.values[self.schema.index[name]]
        except KeyError:
            raise KeyError(f"no column {name!r}; the row has {list(self.schema.names)}") from None

    def get(self, name: str, default: Any = None) -> Any:
        i = self.schema.index.get(name)
        return default if i is None else self.values[i]

    def keys(self):
        return self.schema.names

    def __iter__(self):
        return iter(self.schema.names)

    def __len__(self) -> int:
        return len(self.values)

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(self.schema.names, self.values))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self.qid == other.qid and self.as_dict() == other.as_dict()
        return NotImplemented

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={short(v, 30)}" for n, v in zip(self.schema.names, self.values))
        return f"Row(qid={self.qid!r}, {inner})"


class Table:
    """A typed table whose rows carry qids.

    >>> t = Table({"x": int, "s": str}, [(1, "a"), (2, "b")])
    >>> len(t), t[0]["x"], t[1].qid, t.column("s")
    (2, 1, 1, ['a', 'b'])

    ``qids`` defaults to ``0..n-1``. Values are checked against the schema (``SchemaError``
    names the column, the expected and the found type); NaN is stored as null.
    """

    __slots__ = ("schema", "rows", "qids")

    def __init__(self, schema: Schema | Mapping[str, Any], rows: Iterable[Sequence] = (), qids: Iterable | None = None):
        schema = _as_schema(schema)
        self.schema = schema
        self.rows, self.qids = _checked(schema, [tuple(r) for r in rows], qids)

    @classmethod
    def _make(cls, schema: Schema, rows: list, qids: list) -> "Table":
        """Build without checks (internal: operators produce rows already checked)."""
        t = object.__new__(cls)
        t.schema = schema
        t.rows = rows
        t.qids = qids
        return t

    # -- constructors: each infers a schema where none is given, then converts as inputs are ---
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], schema: Mapping[str, Any] | Schema | None = None,
                     qids: Iterable | None = None) -> "Table":
        """Rows from dicts; missing keys are null. Without ``schema``, types are inferred.

        >>> Table.from_records([{"x": 1}, {"x": 2, "y": "b"}]).schema
        Schema({'x': int, 'y': str})
        """
        records = list(records)
        if schema is None:
            names = dict.fromkeys(k for rec in records for k in rec)
            schema = Schema({n: infer_type(rec.get(n) for rec in records) for n in names})
        return _convert(records, _as_schema(schema), None, qids)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence], schema: Mapping[str, Any] | Schema | None = None) -> "Table":
        """Rows from a dict of equally long columns.

        >>> Table.from_columns({"x": [1, 2], "s": ["a", "b"]})[1].as_dict()
        {'x': 2, 's': 'b'}
        """
        if schema is None:
            schema = Schema({k: infer_type(v) for k, v in columns.items()})
        return _convert(dict(columns), _as_schema(schema), None, columnar=True)

    @classmethod
    def from_pandas(cls, df, schema: Mapping[str, Any] | Schema | None = None) -> "Table":
        """Rows from a DataFrame; an index named ``qid`` becomes the qids. NaN/NA become null."""
        if schema is None:
            schema = Schema({str(c): _pandas_type(df[c].dtype, _column_values(df[c])) for c in df.columns})
        return _convert(df, _as_schema(schema), None)

    # -- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        schema = self.schema
        return (Row(schema, r, q) for r, q in zip(self.rows, self.qids))

    def __getitem__(self, key: int | slice | str) -> Row | Table | list:
        """``t[i]`` is the row at position ``i``, ``t[i:j]`` a Table of those rows (with their qids),
        ``t["col"]`` the column's values as a list (as pandas' ``df["col"]`` is the column).

        >>> t = Table({"x": int, "s": str}, [(1, "a"), (2, "b"), (3, "c")])
        >>> t["s"], t[-1]["x"], t[1:].qids
        (['a', 'b', 'c'], 3, [1, 2])
        >>> t["y"]
        Traceback (most recent call last):
        ...
        flowkit.errors.SchemaError: no column 'y'; the columns are ['x', 's']
        """
        if isinstance(key, str):
            return self.column(key)
        if isinstance(key, slice):
            return Table._make(self.schema, self.rows[key], self.qids[key])
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return Row(self.schema, self.rows[key], self.qids[key])
        raise TypeError(f"a Table is indexed by a row position (t[0]), a slice of rows (t[1:3]) or a column name "
                        f"(t['x']), not {type(key).__name__}")

    def column(self, name: str) -> list:
        """The values of column ``name`` (``t[name]`` is the same)."""
        i = self.schema.index.get(name)
        if i is None:
            raise SchemaError(f"no column {name!r}; the columns are {list(self.schema.names)}", column=name)
        return [r[i] for r in self.rows]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.schema.names

    def records(self) -> list[dict[str, Any]]:
        names = self.schema.names
        return [dict(zip(names, r)) for r in self.rows]

    def to_pandas(self):
        """A DataFrame with one column per schema column and the qids as its index (``qid``)."""
        import pandas as pd

        index = pd.Index(self.qids, name="qid")
        data = {n: pd.Series([r[i] for r in self.rows], dtype=_pandas_dtype(t), index=index)
                for i, (n, t) in enumerate(self.schema.items())}
        return pd.DataFrame(data, index=index, columns=list(self.schema.names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return self.schema == other.schema and self.qids == other.qids and _rows_equal(self.rows, other.rows)

    def __repr__(self) -> str:
        head = ", ".join(repr(r) for r in list(self)[:3])
        more = f", ... {len(self) - 3} more" if len(self) > 3 else ""
        return f"Table({self.schema.describe()}; {len(self)} rows: {head}{more})"

    def _repr_html_(self) -> str:
        return self.to_pandas()._repr_html_()


class GroupedTable:
    """The output of ``groupby``: the grouping column and an ordered mapping value -> Table."""

    __slots__ = ("schema", "key", "groups")

    def __init__(self, schema: Schema, key: str, groups: dict[Any, Table]):
        self.schema = schema
        self.key = key
        self.groups = groups

    def __len__(self) -> int:
        return sum(len(t) for t in self.groups.values())

    def combine(self) -> Table:
        rows, qids = [], []
        for t in self.groups.values():
            rows.extend(t.rows)
            qids.extend(t.qids)
        return Table._make(self.schema, rows, qids)

    def __repr__(self) -> str:
        return f"GroupedTable(by {self.key!r}; {len(self.groups)} groups, {len(self)} rows)"


# -- input conversion: the one path every input form takes -------------------------------
def as_table(x: Any, schema: Schema, where: str = "input") -> Table:
    """Turn a run/submit input into a Table checked against ``schema``, nulls as ``None``.

    Accepts a Table, a pandas DataFrame, a list of dicts (one per row), a dict of columns, or a
    single dict (one row). Raises ``SchemaError`` naming the first offending column.
    """
    return _convert(x, schema, where)


def _convert(x: Any, schema: Schema, where: str | None, qids: Iterable | None = None,
             columnar: bool = False) -> Table:
    """``x`` as rows of ``schema`` (in its column order), then checked (``_checked``). ``where``
    prefixes messages (None: a constructor, whose schema is the table's own); ``columnar``: a
    mapping is a dict of columns even when its values are not lists."""
    if isinstance(x, Table):
        if x.schema.names != schema.names:
            _check_names(x.schema.names, schema, where)
            idx = [x.schema.index[n] for n in schema.names]
            rows = [tuple(r[i] for i in idx) for r in x.rows]
        else:
            rows = x.rows
        qids = x.qids
    elif isinstance(x, Mapping):
        _check_names(x.keys(), schema, where, all_required=False)
        values = list(x.values())
        if columnar or (values and all(_is_column(v) for v in values)):
            lengths = {k: len(v) for k, v in x.items()}
            if len(set(lengths.values())) > 1:
                raise SchemaError(f"{_prefix(where)}columns have different lengths: {lengths}")
            n = next(iter(lengths.values()), 0)
            cols = [list(x[c]) if c in x else [None] * n for c in schema.names]
            rows = list(zip(*cols)) if cols else [() for _ in range(n)]
        else:  # one row as a dict
            rows = [tuple(x.get(c) for c in schema.names)]
    elif isinstance(x, list):
        for i, rec in enumerate(x):
            if not isinstance(rec, Mapping):
                raise SchemaError(f"{_prefix(where)}row {i} is a {type(rec).__name__}; give rows as dicts of "
                                  f"column values")
            _check_names(rec.keys(), schema, where, all_required=False)
        rows = [tuple(rec.get(c) for c in schema.names) for rec in x]
    elif type(x).__name__ == "DataFrame":
        _check_names([str(c) for c in x.columns], schema, where, all_required=False)
        n = len(x)
        cols = {str(c): _column_values(x[c], _type_of(schema, str(c))) for c in x.columns}
        rows = list(zip(*[cols.get(c, [None] * n) for c in schema.names])) if len(schema) else [() for _ in range(n)]
        if x.index.name == "qid":
            qids = list(x.index)
    else:
        raise SchemaError(f"{_prefix(where)}expected a Table, a DataFrame, a list of dicts or a dict of columns, "
                          f"not {type(x).__name__}")
    t = Table._make(schema, [], [])
    t.rows, t.qids = _checked(schema, rows, qids, where)
    return t


def _checked(schema: Schema, rows: list[tuple], qids: Iterable | None, where: str | None = None
             ) -> tuple[list[tuple], list]:
    """``rows`` with nulls as ``None`` and ``qids`` (``0..n-1`` by default), after checking that
    every row has one value per column and every value fits its column's type."""
    rows = [_nulls_as_none(r) for r in rows]
    qids = list(range(len(rows))) if qids is None else list(qids)
    if len(qids) != len(rows):
        raise SchemaError(f"{_prefix(where)}{len(rows)} rows but {len(qids)} qids")
    width = len(schema)
    for r, q in zip(rows, qids):
        if len(r) != width:
            raise SchemaError(f"{_prefix(where)}row qid={q} has {len(r)} values; the schema has {width} columns "
                              f"({schema.describe()})")
        schema.check_row(r, q, where or "input")
    return rows, qids


def _as_schema(schema: Schema | Mapping[str, Any]) -> Schema:
    return schema if isinstance(schema, Schema) else Schema(schema)


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def _check_names(names, schema: Schema, where: str | None, all_required: bool = True) -> None:
    names = list(names)
    whose = "the flow's input" if where else "the schema"
    for n in names:
        if n not in schema.index:
            raise SchemaError(f"{_prefix(where)}unexpected column {n!r}; {whose} has {list(schema.names)}", column=n)
    if all_required:
        for n in schema.names:
            if n not in names:
                raise SchemaError(f"{_prefix(where)}missing column {n!r}", column=n)


def _is_column(v: Any) -> bool:
    """A dict is columnar when all its values are lists, tuples or Series; otherwise it is one row."""
    return isinstance(v, (list, tuple)) or type(v).__name__ == "Series"


def infer_type(values: Iterable[Any]) -> Any:
    """The narrowest column type that fits all non-null values (``object`` when they differ).

    >>> infer_type([1, None, 2]), infer_type([1, 2.5]), infer_type(["a", 1])
    (<class 'int'>, <class 'float'>, <class 'object'>)
    """
    found: set = set()
    for v in values:
        if is_null(v):
            continue
        if isinstance(v, bool) or type(v).__name__ == "bool_":
            found.add(bool)
        elif isinstance(v, (int, np.integer)):
            found.add(int)
        elif isinstance(v, (float, np.floating)):
            found.add(float)
        else:
            found.add(type(v))
        if len(found) > 2:
            return object
    if not found:
        return object
    if len(found) == 1:
        return found.pop()
    if found == {int, float}:
        return float
    return object


def _pandas_type(dtype, values) -> Any:
    kind = getattr(dtype, "kind", "O")
    if kind in "iu":
        return int
    if kind == "f":
        return float
    if kind == "b":
        return bool
    return infer_type(values)


def _pandas_dtype(t: Any):
    return {int: "Int64", float: "float64", bool: "boolean", str: "object"}.get(t, "object")


def _column_values(series, typ: Any = None) -> list:
    """A DataFrame column's values (NaN/NA stay as they are, for ``_nulls_as_none``). pandas
    stores an int column with nulls as floats: where ``typ`` is int, whole floats of such a
    column become ints again."""
    values = series.tolist()
    if typ is int and series.dtype.kind == "f":
        values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    return values


def _type_of(schema: Schema, name: str) -> Any:
    return schema[name] if name in schema else None


def _nulls_as_none(row: tuple) -> tuple:
    """``row`` with every null stored as ``None`` (the row itself when it has no other null):
    the one place where input nulls are normalized."""
    for v in row:
        if v is not None and is_null(v):
            return tuple(None if is_null(x) else x for x in row)
    return row


def _rows_equal(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        if len(ra) != len(rb):
            return False
        for va, vb in zip(ra, rb):
            if not values_equal(va, vb):
                return False
    return True


def values_equal(a: Any, b: Any) -> bool:
    """Equality that works for arrays and tensors too (used by tests and by Table ==)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or type(a).__name__ == "Tensor":
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
        except Exception:
            return False
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
