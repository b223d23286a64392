"""The conformance suite on the reference executor, plus operator details and errors."""

import math
import threading
import time

import pytest

import flowkit as fk

from .conformance import CASES, SCHEMA, XS, Scale, double, rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_conformance(case):
    flow, data, store, expected = CASES[case]()
    assert rows(flow.run(data, store=store)) == expected


def test_class_operator_is_instantiated_once_per_process():
    flow = fk.Flow("once", SCHEMA)
    flow.map(Scale, names=["z"])
    before = Scale.instances
    flow.run(XS)
    flow.run(XS)
    assert Scale.instances - before <= 1


def test_operator_names_follow_functions_and_lambdas_are_numbered():
    flow = fk.Flow("names", SCHEMA)
    a = flow.map(lambda r: 1, names=["a"])
    b = a.map(lambda r: 2, names=["b"])
    c = b.map(Scale, names=["c"])
    d = c.map(Scale, names=["d"])
    assert [a.name, b.name, c.name, d.name] == ["lambda#1", "lambda#2", "Scale", "Scale#2"]


def test_schema_propagates_from_names_and_annotations():
    flow = fk.Flow("types", SCHEMA)

    def two(row) -> tuple[int, str]:
        return 1, "a"

    assert flow.map(two, names=["n", "t"]).schema == {"n": int, "t": str}
    assert flow.map(lambda r: r["x"], names=["y"]).schema == {"y": object}
    assert flow.lookup("s", dynamic=True).schema == {"x": int, "s": str, "s_value": object}
    assert flow.groupby("s").agg("count").schema == {"s": str, "count": int}
    assert flow.agg("max", "s").schema == {"max_s": str}


def test_declared_output_type_is_checked_at_run_time():
    flow = fk.Flow("liar", SCHEMA)

    def lies(row) -> int:
        return "not an int"

    flow.map(lies, names=["y"])
    with pytest.raises(fk.SchemaError, match="'lies' declares column 'y' as int but returned str") as e:
        flow.run(XS)
    assert e.value.column == "y"


def test_a_declared_column_takes_nan_as_null():
    """NaN is null, and null fits every declared type: an int column may hold a computed NaN,
    which aggregates then skip."""
    flow = fk.Flow("nan_int", SCHEMA)

    def score(row) -> int:
        return math.nan if row["x"] == 1 else row["x"]

    flow.map(score, names=["y"]).agg("count", "y")
    assert rows(flow.run(XS)) == [(0, {"count_y": 3})]


def test_operator_error_names_operator_and_qid_and_chains_the_cause():
    flow = fk.Flow("boom", SCHEMA)

    def explode(row) -> int:
        if row["x"] == 3:
            raise ValueError("bad row")
        return 1

    flow.map(explode, names=["y"])
    with pytest.raises(fk.OperatorError, match="'explode' raised ValueError: bad row on row qid=2") as e:
        flow.run(XS)
    assert e.value.operator == "explode" and e.value.qid == 2
    assert isinstance(e.value.__cause__, ValueError)


def test_a_class_operator_whose_constructor_raises_is_an_operator_error():
    class Model:
        def __init__(self):
            raise FileNotFoundError("weights.bin")

        def __call__(self, row) -> int:
            return 1

    flow = fk.Flow("broken-model", SCHEMA)
    flow.filter(Model)
    with pytest.raises(fk.OperatorError, match=r"operator 'Model': creating Model\(\) raised FileNotFoundError") as e:
        flow.run(XS)
    assert e.value.operator == "Model" and isinstance(e.value.original, FileNotFoundError)


def test_batching_map_must_return_one_value_per_row():
    flow = fk.Flow("short", SCHEMA)
    flow.map(lambda t: [1], names=["y"], batching=True)
    with pytest.raises(fk.OperatorError, match="returned 1 values for 4 rows"):
        flow.run(XS)


def test_multi_name_map_must_return_that_many_values():
    flow = fk.Flow("arity", SCHEMA)
    flow.map(lambda r: 1, names=["a", "b"])
    with pytest.raises(fk.OperatorError, match="must return 2 values"):
        flow.run(XS)


def test_missing_store_key_is_an_operator_error():
    flow = fk.Flow("nokey", SCHEMA)
    flow.lookup("s", dynamic=True)
    with pytest.raises(fk.OperatorError, match="no stored object under key 'a'") as e:
        flow.run(XS, store={})
    assert e.value.qid == 0


def test_schema_error_before_any_work_starts():
    calls = []
    flow = fk.Flow("guarded", SCHEMA)
    flow.map(lambda r: calls.append(r) or 1, names=["y"])
    with pytest.raises(fk.SchemaError, match="column 'x' expects int, found str"):
        flow.run([{"x": 1, "s": "a"}, {"x": "2", "s": "b"}])
    assert calls == []


@pytest.mark.parametrize("build, message", [
    (lambda f: f.groupby("nope"), "groupby: no column 'nope'"),
    (lambda f: f.map(len, col="nope"), "no column 'nope'"),
    (lambda f: f.join(f.map(lambda r: 1, names=["x"]).map(str, col="x"), on="nope"), "no such column"),
    (lambda f: f.union(f.map(lambda r: 1, names=["y"])), "inputs need the same columns"),
    (lambda f: f.groupby("s").map(len), "call .agg"),
    (lambda f: f.filter(len, group=True), "needs a grouped input"),
    (lambda f: f.agg("median", "x"), "unknown aggregate 'median'"),
    (lambda f: f.agg("sum", "s"), "not numeric"),
    (lambda f: f.join(f, how="right"), "swap the sides"),
    (lambda f: f.join(fk.Flow("other", SCHEMA)), "belongs to flow 'other'"),
    (lambda f: f.map(lambda r: (1, 2), names=["a", "a"]), "repeat a column"),
    (lambda f: f.lookup("x"), "already has a column 'x'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_building_errors_are_raised_by_the_call_that_builds_them(build, message):
    with pytest.raises(fk.FlowError, match=message):
        build(fk.Flow("bad", SCHEMA))


def test_join_of_incompatible_tables_fails_when_built():
    flow = fk.Flow("bad", SCHEMA)

    def as_bytes(row) -> bytes:
        return b""

    with pytest.raises(fk.SchemaError, match="column 'x' is int on the left and bytes on the right"):
        flow.join(flow.map(as_bytes, names=["x"]))


def test_two_sinks_without_output_is_an_error_and_output_resolves_it():
    flow = fk.Flow("sinks", SCHEMA)
    a = flow.map(double, names=["y"])
    flow.filter(lambda r: True)
    with pytest.raises(fk.FlowError, match="2 sinks"):
        flow.run(XS)
    flow.output = a
    assert len(flow.run(XS)) == 4


def test_a_flow_without_operators_returns_its_input():
    flow = fk.Flow("identity", SCHEMA)
    assert rows(flow.run(XS)) == rows(fk.Table(SCHEMA, list(zip(XS["x"], XS["s"]))))


def test_anyof_returns_the_first_branch_to_finish_and_errors_only_if_all_fail():
    flow = fk.Flow("race", SCHEMA)

    def fails(row) -> str:
        raise RuntimeError("no")

    def slowish(row) -> str:
        time.sleep(0.05)
        return "ok"

    flow.map(fails, names=["v"]).anyof(flow.map(slowish, names=["v"]))
    assert flow.run(XS).column("v") == ["ok"] * 4
    flow2 = fk.Flow("race2", SCHEMA)
    flow2.map(fails, names=["v"]).anyof(flow2.map(fails, names=["v"]))
    with pytest.raises(fk.OperatorError):
        flow2.run(XS)


def test_anyof_branches_really_run_concurrently():
    flow = fk.Flow("concurrent", SCHEMA)
    started = []
    barrier = threading.Barrier(2, timeout=5)

    def meet(row) -> str:
        started.append(threading.get_ident())
        barrier.wait()
        return "met"

    flow.map(meet, names=["v"]).anyof(flow.map(meet, names=["v"]))
    assert flow.run({"x": [1], "s": ["a"]}).column("v") == ["met"]
    assert len(set(started)) == 2


def test_anyof_runs_under_a_running_event_loop_and_tells_the_loser_to_stop():
    """flow.run in a notebook cell (an event loop already runs in the thread): the first branch
    wins, and the losing one, still running, is told to stop (fk.cancelled()) once it is over."""
    import asyncio

    flow = fk.Flow("notebook", SCHEMA)
    stopped = threading.Event()

    def quick(row) -> str:
        return "quick"

    def until_told(row) -> str:
        while not fk.cancelled():
            if stopped.wait(0.001):   # (never set here: a pause between checks)
                break
        stopped.set()
        return "told"

    flow.map(quick, names=["v"]).anyof(flow.map(until_told, names=["v"]))

    async def cell():
        asyncio.get_running_loop()   # as in a kernel: a loop runs in this thread
        return flow.run({"x": [1], "s": ["a"]})

    assert asyncio.run(cell()).column("v") == ["quick"]
    assert stopped.wait(60), "the losing branch was never told to stop"


def test_join_null_keys_never_match_and_duplicates_multiply():
    flow = fk.Flow("keys", {"k": str, "v": int})
    right = flow.map(lambda r: (r["k"], r["v"] * 10), names=["k", "w"])
    flow.output = flow.join(right, on="k", how="inner")
    out = flow.run({"k": ["a", None, "a"], "v": [1, 2, 3]})
    assert sorted((r.qid, r["v"], r["w"]) for r in out) == [(0, 1, 10), (0, 1, 30), (2, 3, 10), (2, 3, 30)]


def test_agg_of_empty_and_null_values():
    flow = fk.Flow("empty", {"x": float})
    g = flow.filter(lambda r: False)
    outs = [g.agg(fn, "x") for fn in ("count", "sum", "mean", "min")]
    joined = outs[0]
    for o in outs[1:]:
        joined = joined.join(o)
    flow.output = joined
    assert flow.run({"x": [1.0]}).records() == [{"count_x": 0, "sum_x": 0.0, "mean_x": None, "min_x": None}]
    flow2 = fk.Flow("nulls", {"x": float})
    flow2.agg("mean", "x")
    assert flow2.run({"x": [1.0, None, 3.0]}).records() == [{"mean_x": 2.0}]
