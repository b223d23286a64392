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
        schema = schema if isinstance(schema, Schema) else Schema(schema)
        rows = [_nulls_as_none(tuple(r)) for r in rows]
        qids = list(range(len(rows))) if qids is None else list(qids)
        if len(qids) != len(rows):
            raise SchemaError(f"{len(rows)} rows but {len(qids)} qids")
        width = len(schema)
        for r, q in zip(rows, qids):
            if len(r) != width:
                raise SchemaError(f"row qid={q} has {len(r)} values; the schema has {width} columns ({schema.describe()})")
            schema.check_row(r, q)
        self.schema = schema
        self.rows = rows
        self.qids = qids

    @classmethod
    def _make(cls, schema: Schema, rows: list, qids: list) -> "Table":
        """Build without checks (internal: operators produce rows already checked)."""
        t = object.__new__(cls)
        t.schema = schema
        t.rows = rows
        t.qids = qids
        return t

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], schema: Mapping[str, Any] | Schema | None = None,
                     qids: Iterable | None = None) -> "Table":
        """Rows from dicts; missing keys are null. Without ``schema``, types are inferred.

        >>> Table.from_records([{"x": 1}, {"x": 2, "y": "b"}]).schema
        Schema({'x': int, 'y': str})
        """
        records = list(records)
        if schema is None:
            names: dict[str, None] = {}
            for rec in records:
                for k in rec:
                    names.setdefault(k, None)
            schema = Schema({n: infer_type(rec.get(n) for rec in records) for n in names})
        else:
            schema = schema if isinstance(schema, Schema) else Schema(schema)
            for rec in records:
                for k in rec:
                    if k not in schema.index:
                        raise SchemaError(f"unexpected column {k!r}; the schema has {list(schema.names)}", column=k)
        rows = [tuple(rec.get(n) for n in schema.names) for rec in records]
        return cls(schema, rows, qids)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence], schema: Mapping[str, Any] | Schema | None = None) -> "Table":
        """Rows from a dict of equally long columns.

        >>> Table.from_columns({"x": [1, 2], "s": ["a", "b"]})[1].as_dict()
        {'x': 2, 's': 'b'}
        """
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise SchemaError(f"columns have different lengths: {lengths}")
        if schema is None:
            schema = Schema({k: infer_type(v) for k, v in columns.items()})
        else:
            schema = schema if isinstance(schema, Schema) else Schema(schema)
            for k in columns:
                if k not in schema.index:
                    raise SchemaError(f"unexpected column {k!r}; the schema has {list(schema.names)}", column=k)
        n = next(iter(lengths.values()), 0)
        cols = [list(columns[name]) if name in columns else [None] * n for name in schema.names]
        return cls(schema, list(zip(*cols)) if cols else [() for _ in range(n)])

    @classmethod
    def from_pandas(cls, df, schema: Mapping[str, Any] | Schema | None = None) -> "Table":
        """Rows from a DataFrame; an index named ``qid`` becomes the qids. NaN/NA become null."""
        if schema is not None:
            schema = schema if isinstance(schema, Schema) else Schema(schema)
        columns = {str(name): _column_values(df[name], schema and _type_of(schema, str(name))) for name in df.columns}
        if schema is None:
            schema = Schema({k: _pandas_type(df[k].dtype, v) for k, v in zip(columns, columns.values())})
        t = cls.from_columns(columns, schema)
        if df.index.name == "qid":
            t.qids = list(df.index)
        return t

    # -- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        schema = self.schema
        return (Row(schema, r, q) for r, q in zip(self.rows, self.qids))

    def __getitem__(self, i: int) -> Row:
        return Row(self.schema, self.rows[i], self.qids[i])

    def column(self, name: str) -> list:
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


# -- input conversion --------------------------------------------------------------------
def as_table(x: Any, schema: Schema, where: str = "input") -> Table:
    """Turn a run/submit input into a Table checked against ``schema``, nulls as ``None``.

    Accepts a Table, a pandas DataFrame, a list of dicts (one per row), a dict of columns, or a
    single dict (one row). Raises ``SchemaError`` naming the first offending column.
    """
    if isinstance(x, Table):
        if x.schema.names != schema.names:
            _check_names(x.schema.names, schema, where)
            idx = [x.schema.index[n] for n in schema.names]
            t = Table._make(schema, [tuple(r[i] for i in idx) for r in x.rows], list(x.qids))
        else:
            t = Table._make(schema, x.rows, x.qids)
    elif isinstance(x, Mapping):
        _check_names(x.keys(), schema, where, all_required=False)
        values = list(x.values())
        if values and all(_is_column(v) for v in values):
            n = len(values[0])
            if any(len(v) != n for v in values):
                raise SchemaError(f"{where}: columns have different lengths: { {k: len(v) for k, v in x.items()} }")
            cols = [list(x[n_]) if n_ in x else [None] * n for n_ in schema.names]
            t = Table._make(schema, list(zip(*cols)), list(range(n)))
        else:  # one row as a dict
            t = Table._make(schema, [tuple(x.get(n) for n in schema.names)], [0])
    elif isinstance(x, list):
        rows = []
        for i, rec in enumerate(x):
            if not isinstance(rec, Mapping):
                raise SchemaError(f"{where}: row {i} is a {type(rec).__name__}; give rows as dicts of column values")
            _check_names(rec.keys(), schema, where, all_required=False)
            rows.append(tuple(rec.get(n) for n in schema.names))
        t = Table._make(schema, rows, list(range(len(rows))))
    elif type(x).__name__ == "DataFrame":
        _check_names([str(c) for c in x.columns], schema, where, all_required=False)
        n = len(x)
        cols = {str(c): _column_values(x[c], _type_of(schema, str(c))) for c in x.columns}
        qids = list(x.index) if x.index.name == "qid" else list(range(n))
        t = Table._make(schema, list(zip(*[cols.get(c, [None] * n) for c in schema.names])), qids)
    else:
        raise SchemaError(f"{where}: expected a Table, a DataFrame, a list of dicts or a dict of columns, "
                          f"not {type(x).__name__}")
    t.rows = [_nulls_as_none(r) for r in t.rows]
    for r, q in zip(t.rows, t.qids):
        schema.check_row(r, q, where)
    return t


def _check_names(names, schema: Schema, where: str, all_required: bool = True) -> None:
    names = list(names)
    for n in names:
        if n not in schema.index:
            raise SchemaError(f"{where}: unexpected column {n!r}; the flow's input has {list(schema.names)}", column=n)
    if all_required:
        for n in schema.names:
            if n not in names:
                raise SchemaError(f"{where}: missing column {n!r}", column=n)


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
