import numpy as np
import pandas as pd
import pytest

import flowkit as fk
from flowkit.table import as_table


def test_table_basics_match_the_contract():
    t = fk.Table({"x": int, "s": str}, [(1, "a"), (2, "b")])
    assert t.schema == {"x": int, "s": str}
    assert len(t) == 2
    assert [r["x"] for r in t] == [1, 2]
    assert t[0]["x"] == 1 and t[0].qid == 0 and t[1].qid == 1
    df = t.to_pandas()
    assert df.index.name == "qid"
    assert list(df.columns) == ["x", "s"] and df["s"].tolist() == ["a", "b"]


def test_rows_support_get_dict_and_missing_column_message():
    r = fk.Table({"x": int}, [(5,)])[0]
    assert r.get("x") == 5 and r.get("nope", 7) == 7 and r.as_dict() == {"x": 5}
    with pytest.raises(KeyError, match="no column 'y'"):
        r["y"]


def test_every_column_type_is_checked_and_none_is_null():
    import torch

    schema = {"i": int, "f": float, "s": str, "b": bool, "y": bytes, "a": np.ndarray, "t": torch.Tensor, "o": object}
    row = (1, 2.5, "s", True, b"x", np.zeros(2), torch.ones(1), {"any": 1})
    t = fk.Table(schema, [row, (None,) * 8])
    assert len(t) == 2 and t[1]["t"] is None
    for col, bad in [("i", "1"), ("i", True), ("f", "x"), ("s", 1), ("b", 1), ("y", "x"), ("a", [1]), ("t", np.zeros(1))]:
        values = list(row)
        values[list(schema).index(col)] = bad
        with pytest.raises(fk.SchemaError, match=f"column '{col}' expects") as e:
            fk.Table(schema, [tuple(values)])
        assert e.value.column == col


def test_float_columns_accept_ints_and_numpy_scalars():
    t = fk.Table({"f": float, "i": int}, [(1, np.int64(3)), (np.float32(2.5), 4)])
    assert t.column("f") == [1, np.float32(2.5)]


def test_schema_errors_name_the_types():
    with pytest.raises(fk.SchemaError, match="expects int, found str"):
        fk.Table({"x": int}, [("a",)])
    with pytest.raises(fk.SchemaError, match="must be a class"):
        fk.Schema({"x": "int"})
    with pytest.raises(fk.SchemaError, match="1 values"):
        fk.Table({"x": int, "y": int}, [(1,)])


def test_from_records_infers_types_and_fills_nulls():
    t = fk.Table.from_records([{"x": 1}, {"x": 2, "y": "b"}])
    assert t.schema == {"x": int, "y": str}
    assert t.records() == [{"x": 1, "y": None}, {"x": 2, "y": "b"}]
    with pytest.raises(fk.SchemaError, match="unexpected column 'z'"):
        fk.Table.from_records([{"z": 1}], schema={"x": int})


def test_from_pandas_roundtrip_keeps_qids_and_nulls():
    df = pd.DataFrame({"x": [1, 2], "v": [0.5, None], "s": ["a", None]}, index=pd.Index([10, 20], name="qid"))
    t = fk.Table.from_pandas(df)
    assert t.qids == [10, 20]
    assert t.schema == {"x": int, "v": float, "s": str}
    assert t.records() == [{"x": 1, "v": 0.5, "s": "a"}, {"x": 2, "v": None, "s": None}]
    back = t.to_pandas()
    assert back.index.tolist() == [10, 20] and back["x"].tolist() == [1, 2]


def test_inputs_may_be_table_dataframe_records_columns_or_one_row():
    schema = fk.Schema({"x": int, "s": str})
    expected = [{"x": 1, "s": "a"}, {"x": 2, "s": "b"}]
    for x in (fk.Table(schema, [(1, "a"), (2, "b")]), pd.DataFrame(expected), expected,
              {"x": [1, 2], "s": ["a", "b"]}):
        assert as_table(x, schema).records() == expected
    assert as_table({"x": 1, "s": "a"}, schema).records() == [expected[0]]
    reordered = fk.Table({"s": str, "x": int}, [("a", 1)], qids=[7])
    t = as_table(reordered, schema)
    assert t.records() == [expected[0]] and t.qids == [7]



def test_an_int_column_with_nulls_from_pandas_is_ints_again():
    """pandas stores ints with nulls as floats; an int column takes them back (whole ones only)."""
    schema = fk.Schema({"x": int})
    df = pd.DataFrame({"x": [1, None, 3]})
    assert df["x"].dtype.kind == "f"
    for t in (as_table(df, schema), fk.Table.from_pandas(df, schema=schema)):
        assert t.records() == [{"x": 1}, {"x": None}, {"x": 3}]
        assert all(type(v) is int for v in t.column("x") if v is not None)
    with pytest.raises(fk.SchemaError, match="column 'x' expects int, found float"):
        as_table(pd.DataFrame({"x": [1.5, None]}), schema)
    assert fk.Table.from_pandas(df).schema == {"x": float}   # no schema given: floats stay floats

def test_bad_inputs_raise_schema_errors_naming_the_column():
    schema = fk.Schema({"x": int})
    with pytest.raises(fk.SchemaError, match="unexpected column 'y'"):
        as_table([{"x": 1, "y": 2}], schema)
    with pytest.raises(fk.SchemaError, match="column 'x' expects int, found str"):
        as_table({"x": ["a"]}, schema)
    with pytest.raises(fk.SchemaError, match="expected a Table"):
        as_table(42, schema)
    with pytest.raises(fk.SchemaError, match="missing column .z."):
        as_table(fk.Table({"x": int, "y": int}, [(1, 2)]), fk.Schema({"x": int, "y": int, "z": int}))


def test_one_row_dict_with_an_array_value_is_one_row():
    schema = fk.Schema({"img": np.ndarray})
    t = as_table({"img": np.zeros((2, 2))}, schema)
    assert len(t) == 1 and t[0]["img"].shape == (2, 2)


NULLS = [float("nan"), np.nan, np.float32("nan"), np.float64("nan"), pd.NA, None]


def test_nan_is_null_in_every_input_form():
    """A float NaN (and pandas' NA) is stored as None whatever form brings it in."""
    schema = fk.Schema({"k": str, "v": float})
    expected = [{"k": None, "v": None}] * len(NULLS) + [{"k": "a", "v": 1.0}]
    records = [{"k": n, "v": n} for n in NULLS] + [{"k": "a", "v": 1.0}]
    tuples = [(r["k"], r["v"]) for r in records]
    columns = {"k": [r[0] for r in tuples], "v": [r[1] for r in tuples]}
    frame = pd.DataFrame(columns)
    tables = [fk.Table(schema, tuples), fk.Table.from_records(records, schema=schema),
              fk.Table.from_columns(columns, schema=schema), fk.Table.from_pandas(frame, schema=schema)]
    tables += [as_table(x, schema) for x in (records, columns, frame, _computed(tuples))]
    for t in tables:
        assert t.records() == expected
    for n in NULLS:
        assert as_table({"k": n, "v": n}, schema).records() == [{"k": None, "v": None}]


def _computed(rows):
    """A flow's output Table holding the NaN its operator returned (to be passed in as input)."""
    flow = fk.Flow("computed", {"i": int})
    flow.map(lambda r: rows[r["i"]], names=["k", "v"])
    return flow.run({"i": list(range(len(rows)))})


def test_nan_is_null_for_types_and_checks():
    """NaN does not widen an inferred type, and is a null (not a float) in int and str columns."""
    nan = float("nan")
    assert fk.Table.from_records([{"s": "a"}, {"s": nan}]).schema == {"s": str}
    assert fk.Table.from_columns({"s": ["a", nan], "x": [1, nan]}).schema == {"s": str, "x": int}
    assert fk.Table.from_pandas(pd.DataFrame({"s": ["a", nan]})).schema == {"s": str}
    assert fk.Table({"x": int}, [(nan,)]).records() == [{"x": None}]
    assert as_table([{"x": nan}], fk.Schema({"x": int})).records() == [{"x": None}]
