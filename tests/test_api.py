"""The API as dask and pandas users expect it: columns by name, rows by position, flows that say
when running a notebook cell again changes them, reprs that read as the plan, one unit rule."""

from __future__ import annotations

import warnings

import pytest

import flowkit as fk
from flowkit.flow import RepeatWarning


def inc(v: int) -> int:
    return v + 1


def slow(row) -> int:
    return row["x"]


# -- tables: t["col"] is the column, t[i] the row, t[i:j] the rows ----------------------------------
def test_a_column_by_name_is_its_values_as_pandas_gives_them():
    t = fk.Table({"x": int, "s": str}, [(1, "a"), (2, "b")], qids=[10, 20])
    assert t["s"] == ["a", "b"] == t.to_pandas()["s"].tolist()
    assert t["x"] == t.column("x") == [1, 2]


def test_a_missing_column_names_it_and_lists_the_columns():
    t = fk.Table({"x": int, "s": str}, [(1, "a")])
    with pytest.raises(fk.SchemaError, match=r"no column 'y'; the columns are \['x', 's'\]") as e:
        t["y"]
    assert e.value.column == "y"


def test_rows_by_position_and_slices_of_rows_keep_their_qids():
    t = fk.Table({"x": int}, [(1,), (2,), (3,)], qids=[10, 20, 30])
    assert t[0]["x"] == 1 and t[-1].qid == 30
    part = t[1:]
    assert isinstance(part, fk.Table) and part.qids == [20, 30] and part["x"] == [2, 3]
    with pytest.raises(TypeError, match="row position.*column name"):
        t[1.5]


# -- running a notebook cell again never silently changes a flow ------------------------------------
def run_cell(source: str, ns: dict) -> list[warnings.WarningMessage]:
    """Run ``source`` as a notebook runs a cell (compiled anew each time); the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(source, "<cell>", "exec"), ns)
    return [w for w in caught if issubclass(w.category, RepeatWarning)]


def notebook() -> dict:
    ns = {"fk": fk, "inc": inc, "slow": slow}
    exec("flow = fk.Flow('demo', {'x': int})\n", ns)
    return ns


def test_a_cell_run_again_on_the_same_input_warns_naming_both_sinks_and_flow_output():
    ns = notebook()
    assert run_cell("y = flow.map(slow, names=['y'])\n", ns) == []
    (w,) = run_cell("y = flow.map(slow, names=['y'])\n", ns)
    assert issubclass(w.category, UserWarning) and w.filename == "<cell>"
    message = str(w.message)
    assert "'slow#2' repeats 'slow'" in message and "2 sinks ('slow', 'slow#2')" in message
    assert "flow.output = <node>" in message
    flow = ns["flow"]
    assert "2 sinks (slow, slow#2)" in repr(flow)
    text = flow._repr_mimebundle_()["text/plain"]
    assert "slow <- input" in text and "slow#2 <- input" in text     # the notebook draws both
    with pytest.raises(fk.FlowError, match="2 sinks"):
        flow.run([{"x": 1}])


def test_a_cell_that_extends_a_chain_run_again_warns_that_it_now_applies_twice():
    ns = notebook()
    ns["x"] = ns["flow"]
    cell = "x = x.map(inc, col='x')\n"
    assert run_cell(cell, ns) == []
    (w,) = run_cell(cell, ns)
    assert "'inc#2' repeats 'inc' on the result of 'inc'" in str(w.message)
    assert "applies it twice" in str(w.message)
    assert ns["flow"].run([{"x": 1}])["x"] == [3]   # the meaning changed: the warning said so


def test_a_cell_defining_its_function_run_again_still_counts_as_a_repeat():
    ns = notebook()
    cell = "def double(v):\n    return 2 * v\nz = flow.map(double, col='x')\n"
    assert run_cell(cell, ns) == []
    assert len(run_cell(cell, ns)) == 1


def test_with_an_output_set_a_repeat_says_the_output_stays():
    ns = notebook()
    run_cell("y = flow.map(slow, names=['y'])\nflow.output = y\n", ns)
    (w,) = run_cell("flow.map(slow, names=['y'])\n", ns)
    assert "output stays 'slow'" in str(w.message)
    assert ns["flow"].run([{"x": 4}]).records() == [{"y": 4}]


def test_the_same_code_building_on_purpose_does_not_warn():
    """A loop, one chained expression or a hand-made race is the same code, not a cell run again."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepeatWarning)
        flow = fk.Flow("loop", {"x": int})
        x = flow
        for _ in range(3):
            x = x.map(inc, col="x")
        x.map(inc, col="x").map(inc, col="x")
        a, b = flow.map(slow, names=["y"]), flow.map(slow, names=["y"])
        flow.output = a.anyof(b)
        other = fk.Flow("other", {"x": int})
        other.map(slow, names=["y"]).filter(bool)
        other.map(round, col="x")   # different work on the same input
    assert len(flow.sketch().stages()) == 8


def test_a_flow_still_pickles_and_its_copy_runs_the_same():
    import pickle

    flow = fk.Flow("pickled", {"x": int})
    flow.map(inc, col="x")
    copy = pickle.loads(pickle.dumps(flow))
    assert copy.run([{"x": 1}]) == flow.run([{"x": 1}]) and copy.plan.describe() == flow.plan.describe()


# -- names that say what they hold ----------------------------------------------------------------
def test_a_node_holds_its_operators_name():
    flow = fk.Flow("n", {"x": int})
    node = flow.map(inc, col="x")
    assert node.op_name == node.name == "inc" and flow.op_name == "input" and flow.name == "n"
    assert not hasattr(node, "node")


# -- the plan reads as its description ------------------------------------------------------------
def test_a_plans_repr_is_its_description():
    flow = fk.Flow("p", {"x": int})
    flow.map(inc, col="x").filter(bool)
    opt = fk.optimize(flow)
    text = repr(opt.plan)
    assert text.splitlines()[0] == "<Plan 'p': 1 operator, output 'inc+bool', 1 rewrite>"
    assert text.splitlines()[1:] == ["  " + line for line in opt.plan.describe().splitlines()]
    assert "Map(" not in text and "Schema(" not in text


# -- one of each: percentile, value abbreviation ----------------------------------------------------
def test_one_percentile_serves_stages_and_the_gpu_scheduler():
    from flowkit.gpu import scheduler
    from flowkit.runtime import stats

    assert scheduler.percentile is stats.percentile
    assert scheduler._pct([0.001, 0.002, 0.003, 0.004], 50) == pytest.approx(2.5)
    assert scheduler._pct([], 99) is None


def test_one_abbreviation_of_values_in_messages_and_reprs():
    from flowkit import schema, table

    assert table.short is schema.short
    assert repr(fk.Table({"s": str}, [("x" * 50,)])[0]) == f"Row(qid=0, s='{'x' * 26}...)"
    with pytest.raises(fk.SchemaError, match=r"found str \('" + "y" * 36 + r"\.\.\.\)"):
        fk.Table({"i": int}, [("y" * 50,)])


# -- units: seconds unless the name ends in _ms ---------------------------------------------------
def test_the_dashboard_interval_is_seconds_as_a_number():
    pytest.importorskip("ipywidgets")
    from flowkit_widgets.live import DeploymentView

    for bad in ("500ms", 0, -1, None):
        with pytest.raises(TypeError, match="interval is in seconds"):
            DeploymentView(object(), interval=bad)
