"""One conformance suite for every executor (the reference ``flow.run`` and deployments).

Each case builds a flow, an input, an optional store and the exact rows (with qids) that every
executor must return. Executors are compared on ``(qid, row)`` pairs, in order where the
semantics fix the order.
"""

from __future__ import annotations

import math
import time

import flowkit as fk


def rows(table) -> list[tuple]:
    return [(r.qid, r.as_dict()) for r in table]


# -- functions used by the cases (module level so workers can unpickle them) -------------------
def double(row) -> int:
    return row["x"] * 2


def split(row) -> tuple[int, str]:
    return row["x"] + 1, row["s"].upper()


def length(s: str) -> int:
    return len(s)


class Scale:
    """A class operator: instantiated once per process, then called per row."""

    instances = 0

    def __init__(self):
        type(self).instances += 1
        self.factor = 10

    def __call__(self, row) -> int:
        return row["x"] * self.factor


def batch_double(table) -> list[int]:
    return [r["x"] * 2 for r in table]


def batch_lengths(values) -> list[int]:
    return [len(v) for v in values]


def is_even(row) -> bool:
    return row["x"] % 2 == 0


def big_group(group) -> bool:
    return len(group) >= 2


SLOW_LABEL_BOUND_S = 30.0


def slow_label(row) -> str:
    """The branch that loses ``anyof``: it waits until it is cancelled (or, where nothing cancels
    a loser, for a long bound), so the fast branch wins however loaded the machine is. Its caller
    never waits for it: the race returns with the fast branch."""
    deadline = time.monotonic() + SLOW_LABEL_BOUND_S
    while not fk.cancelled() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "slow"


def fast_label(row) -> str:
    return "fast"


def plus_vec(row) -> float:
    return float(row["v_value"].sum()) + row["x"]


def nan_when_odd(row) -> tuple[float, float]:
    """A key that is NaN for odd x, and a value that is NaN for x == 4 (``math.nan`` is one
    object in a process: only the NaN rule, not identity, may decide groups and matches)."""
    x = row["x"]
    return (math.nan if x % 2 else float(x % 4)), (math.nan if x == 4 else float(x * x))


def nan_key(row) -> float:
    return math.nan if row["x"] % 2 else float(row["x"])


def tenfold_key(row) -> tuple[float, float]:
    return row["k"], row["k"] * 10


XS = {"x": [1, 2, 3, 4], "s": ["a", "bb", "a", "ccc"]}
SCHEMA = {"x": int, "s": str}


def case_row_map():
    f = fk.Flow("row_map", SCHEMA)
    f.map(double, names=["y"])
    return f, XS, None, [(i, {"y": 2 * x}) for i, x in enumerate(XS["x"])]


def case_multi_names():
    f = fk.Flow("multi_names", SCHEMA)
    f.map(split, names=["n", "u"])
    return f, XS, None, [(i, {"n": x + 1, "u": s.upper()}) for i, (x, s) in enumerate(zip(XS["x"], XS["s"]))]


def case_default_name():
    f = fk.Flow("default_name", SCHEMA)
    f.map(double)
    return f, XS, None, [(i, {"double": 2 * x}) for i, x in enumerate(XS["x"])]


def case_column_map():
    f = fk.Flow("column_map", SCHEMA)
    f.map(length, col="s")
    return f, XS, None, [(i, {"x": x, "s": len(s)}) for i, (x, s) in enumerate(zip(XS["x"], XS["s"]))]


def case_column_map_rename():
    f = fk.Flow("column_rename", SCHEMA)
    f.map(length, names=["n"], col="s")
    return f, XS, None, [(i, {"x": x, "n": len(s)}) for i, (x, s) in enumerate(zip(XS["x"], XS["s"]))]


def case_class_operator():
    f = fk.Flow("class_op", SCHEMA)
    f.map(Scale, names=["z"])
    return f, XS, None, [(i, {"z": 10 * x}) for i, x in enumerate(XS["x"])]


def case_batching_map():
    f = fk.Flow("batching", SCHEMA)
    f.map(batch_double, names=["y"], batching=True)
    return f, XS, None, [(i, {"y": 2 * x}) for i, x in enumerate(XS["x"])]


def case_batching_column_map():
    f = fk.Flow("batching_col", SCHEMA)
    f.map(batch_lengths, col="s", batching=True)
    return f, XS, None, [(i, {"x": x, "s": len(s)}) for i, (x, s) in enumerate(zip(XS["x"], XS["s"]))]


def case_filter():
    f = fk.Flow("filter", SCHEMA)
    f.filter(is_even)
    return f, XS, None, [(1, {"x": 2, "s": "bb"}), (3, {"x": 4, "s": "ccc"})]


def case_groupby_aggs():
    f = fk.Flow("aggs", SCHEMA)
    g = f.groupby("s")
    aggs = [g.agg(fn, "x") for fn in ("sum", "min", "max", "mean")]
    out = g.agg("count", "x")
    for a in aggs:
        out = out.join(a, on="s")
    f.output = out
    expected = [(0, {"s": "a", "count_x": 2, "sum_x": 4.0, "min_x": 1.0, "max_x": 3.0, "mean_x": 2.0}),
                (1, {"s": "bb", "count_x": 1, "sum_x": 2.0, "min_x": 2.0, "max_x": 2.0, "mean_x": 2.0}),
                (2, {"s": "ccc", "count_x": 1, "sum_x": 4.0, "min_x": 4.0, "max_x": 4.0, "mean_x": 4.0})]
    return f, XS, None, expected


def case_ungrouped_agg():
    f = fk.Flow("ungrouped", SCHEMA)
    f.agg("mean", "x")
    return f, XS, None, [(0, {"mean_x": 2.5})]


def case_group_filter_combine():
    f = fk.Flow("group_filter", SCHEMA)
    f.groupby("s").filter(big_group, group=True).combine()
    return f, XS, None, [(0, {"x": 1, "s": "a"}), (2, {"x": 3, "s": "a"})]


def case_static_lookup():
    f = fk.Flow("static_lookup", SCHEMA)
    f.lookup("offset").map(lambda r: r["x"] + r["offset"], names=["y"])
    return f, XS, {"offset": 100}, [(i, {"y": x + 100}) for i, x in enumerate(XS["x"])]


def case_dynamic_lookup():
    import numpy as np

    f = fk.Flow("dynamic_lookup", {"x": int, "v": str})
    f.lookup("v", dynamic=True).map(plus_vec, names=["total"])
    store = {"a": np.ones(3), "b": np.arange(4.0)}
    data = {"x": [1, 2, 3], "v": ["a", "b", "a"]}
    return f, data, store, [(0, {"total": 4.0}), (1, {"total": 8.0}), (2, {"total": 6.0})]


def case_joins():
    f = fk.Flow("joins", SCHEMA)
    ev = f.filter(is_even).map(double, names=["y"])
    left = f.join(ev, how="left")
    f.output = left
    expected = [(0, {"x": 1, "s": "a", "y": None}), (1, {"x": 2, "s": "bb", "y": 4}),
                (2, {"x": 3, "s": "a", "y": None}), (3, {"x": 4, "s": "ccc", "y": 8})]
    return f, XS, None, expected


def case_outer_join_on_column():
    f = fk.Flow("outer", SCHEMA)
    a = f.filter(lambda r: r["x"] <= 2)
    b = f.filter(lambda r: r["x"] >= 2).map(length, names=["n"], col="s")
    f.output = a.join(b, on="x", how="outer")
    expected = [(0, {"x": 1, "s": "a", "n": None}), (1, {"x": 2, "s": "bb", "n": 2}),
                (2, {"x": 3, "s": None, "n": 1}), (3, {"x": 4, "s": None, "n": 3})]
    return f, XS, None, expected


def case_union():
    f = fk.Flow("union", SCHEMA)
    f.filter(is_even).union(f.filter(lambda r: r["x"] == 1))
    return f, XS, None, [(1, {"x": 2, "s": "bb"}), (3, {"x": 4, "s": "ccc"}), (0, {"x": 1, "s": "a"})]


def case_anyof():
    f = fk.Flow("anyof", SCHEMA)
    f.map(slow_label, names=["label"]).anyof(f.map(fast_label, names=["label"]))
    return f, {"x": [1], "s": ["a"]}, None, [(0, {"label": "fast"})]


def case_pipeline():
    f = fk.Flow("pipeline", SCHEMA)
    pre = f.map(lambda r: (r["x"] * 3, r["s"]), names=["x", "s"])
    scored = pre.filter(lambda r: r["x"] > 3).map(double, names=["y"])
    f.output = pre.join(scored, how="inner")
    expected = [(i, {"x": 3 * x, "s": s, "y": 6 * x}) for i, (x, s) in enumerate(zip(XS["x"], XS["s"])) if 3 * x > 3]
    return f, XS, None, expected


# -- nulls and NaN: a float NaN is null wherever it enters, in every input form ----------------
NAN_SCHEMA = {"k": float, "v": float}
NAN_ROWS = [(1.0, math.nan), (math.nan, 1.0), (1.0, 3.0), (math.nan, math.nan), (None, 2.0)]
NAN_GROUP_MEANS = [(0, {"k": 1.0, "mean_v": 3.0}), (1, {"k": None, "mean_v": 1.5})]


def _nan_group_means(form: str, data):
    f = fk.Flow(f"nan_{form}", NAN_SCHEMA)
    f.groupby("k").agg("mean", "v")
    return f, data, None, NAN_GROUP_MEANS


def case_nan_in_records():
    return _nan_group_means("records", [dict(zip(NAN_SCHEMA, r)) for r in NAN_ROWS])


def case_nan_in_columns():
    return _nan_group_means("columns", {n: [r[i] for r in NAN_ROWS] for i, n in enumerate(NAN_SCHEMA)})


def case_nan_in_dataframe():
    import pandas as pd

    return _nan_group_means("dataframe", pd.DataFrame(NAN_ROWS, columns=list(NAN_SCHEMA)))


def case_nan_in_a_table():
    return _nan_group_means("table", fk.Table(NAN_SCHEMA, NAN_ROWS))


def case_nan_ungrouped_mean():
    f = fk.Flow("nan_mean", {"v": float})
    f.agg("mean", "v")
    return f, [{"v": math.nan}, {"v": 1.0}], None, [(0, {"mean_v": 1.0})]


def case_nan_from_an_operator_groups_as_null():
    f = fk.Flow("nan_op_groups", SCHEMA)
    f.map(nan_when_odd, names=["k", "v"]).groupby("k").agg("mean", "v")
    # keys nan, 2.0, nan, 0.0; values 1.0, 4.0, 9.0, nan
    return f, XS, None, [(0, {"k": None, "mean_v": 5.0}), (1, {"k": 2.0, "mean_v": 4.0}),
                         (2, {"k": 0.0, "mean_v": None})]


def case_nan_keys_from_an_operator_never_match():
    f = fk.Flow("nan_op_join", SCHEMA)
    keyed = f.map(nan_key, names=["k"])
    f.output = keyed.join(keyed.map(tenfold_key, names=["k", "w"]), on="k")
    return f, XS, None, [(1, {"k": 2.0, "w": 20.0}), (3, {"k": 4.0, "w": 40.0})]


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
