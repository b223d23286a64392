"""Property-based tests of table, join and aggregate semantics against a pandas oracle.

The strategies put NaN beside None: a float NaN is null wherever it enters (as in pandas).
"""

import math
from collections import Counter

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkit as fk

nulls = st.sampled_from([None, math.nan])
keys = st.one_of(nulls, st.sampled_from(["a", "b", "c"]))
ints = st.one_of(nulls, st.integers(-5, 5))
left_rows = st.lists(st.tuples(keys, ints), max_size=8)
right_rows = st.lists(st.tuples(keys, ints), max_size=8)


def multiset(records):
    return Counter(tuple(sorted(r.items())) for r in records)


def _none(v):
    return None if pd.isna(v) else (int(v) if isinstance(v, float) and v.is_integer() else v)


def join_flow(how, on):
    flow = fk.Flow("j", {"k": str, "v": int})
    right = flow.map(lambda r: (r["k"], r["v"]), names=["k", "w"])
    flow.output = flow.join(right, on=on, how=how)
    return flow


@settings(max_examples=60, deadline=None)
@given(left_rows, right_rows, st.sampled_from(["inner", "left", "outer"]))
def test_column_join_matches_pandas_merge(left, right, how):
    flow = fk.Flow("j", {"k": str, "v": int, "side": str})
    lt = flow.filter(lambda r: r["side"] == "L")
    rt = flow.filter(lambda r: r["side"] == "R").map(lambda r: (r["k"], r["v"]), names=["k", "w"])
    flow.output = lt.join(rt, on="k", how=how)
    data = [{"k": k, "v": v, "side": "L"} for k, v in left] + [{"k": k, "v": v, "side": "R"} for k, v in right]
    got = flow.run(data).records() if data else []

    ldf = pd.DataFrame([(k, v, "L") for k, v in left], columns=["k", "v", "side"], dtype=object)
    rdf = pd.DataFrame(right, columns=["k", "w"], dtype=object)
    # SQL semantics: null keys never match, so give them unique placeholders in the oracle
    ldf["key"] = [k if not pd.isna(k) else f"__l{i}" for i, k in enumerate(ldf["k"])]
    rdf["key"] = [k if not pd.isna(k) else f"__r{i}" for i, k in enumerate(rdf["k"])]
    merged = ldf.merge(rdf, on="key", how=how, suffixes=("", "_r"))
    expected = []
    for _, m in merged.iterrows():
        k = m["k"] if not pd.isna(m["side"]) else m["k_r"]
        expected.append({"k": _none(k), "v": _none(m["v"]), "side": _none(m["side"]), "w": _none(m["w"])})
    assert multiset(got) == multiset(expected)


INPUT_FORMS = {
    "records": lambda data: [{"k": k, "v": v} for k, v in data],
    "columns": lambda data: {"k": [k for k, _ in data], "v": [v for _, v in data]},
    "dataframe": lambda data: pd.DataFrame(data, columns=["k", "v"]),
    "table": lambda data: fk.Table({"k": str, "v": int}, data),
}


def null_as_nan(row):
    """An operator that computes NaN where its input is null (NaN from an operator is null too)."""
    return tuple(math.nan if row[c] is None else row[c] for c in ("k", "v"))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(keys, ints), min_size=1, max_size=10), st.sampled_from(["count", "sum", "min", "max", "mean"]),
       st.sampled_from(sorted(INPUT_FORMS)), st.booleans())
def test_grouped_aggregates_match_pandas(data, fn, form, through_an_operator):
    flow = fk.Flow("g", {"k": str, "v": int})
    src = flow.map(null_as_nan, names=["k", "v"]) if through_an_operator else flow
    src.groupby("k").agg(fn, "v")
    got = [(r["k"], r[f"{fn}_v"]) for r in flow.run(INPUT_FORMS[form](data))]
    df = pd.DataFrame(data, columns=["k", "v"], dtype=object)
    df["v"] = df["v"].astype("Float64")
    expected = df.groupby("k", sort=False, dropna=False)["v"].agg(fn)   # null is a group of its own
    assert [k for k, _ in got] == [_none(k) for k in expected.index]
    for (_, v), e in zip(got, expected):
        assert _none(v) == _none(e)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(keys, ints), max_size=10))
def test_records_and_pandas_roundtrip(data):
    t = fk.Table({"k": str, "v": int}, data, qids=[q * 3 for q in range(len(data))])
    back = fk.Table.from_pandas(t.to_pandas(), schema=t.schema)
    assert back == t
    assert fk.Table.from_records(t.records(), schema=t.schema, qids=t.qids) == t


@settings(max_examples=40, deadline=None)
@given(left_rows, st.sampled_from(["inner", "left", "outer"]))
def test_qid_join_with_a_filtered_self_keeps_qids(data, how):
    flow = fk.Flow("q", {"k": str, "v": int})
    kept = flow.filter(lambda r: r["v"] is not None and r["v"] > 0).map(lambda r: r["v"] * 2, names=["w"])
    flow.output = flow.join(kept, how=how)
    out = flow.run([{"k": k, "v": v} for k, v in data])
    positive = {i for i, (_, v) in enumerate(data) if v is not None and v > 0}
    assert out.qids == ([i for i in range(len(data)) if i in positive] if how == "inner" else list(range(len(data))))
    for r in out:
        assert r["w"] == (2 * r["v"] if r.qid in positive else None)
