"""The optimizer: each pass on hand-built plans, explain(), rules, and result equivalence."""

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowkit as fk
from flowkit.optimize import find_chains, fuse, fuse_whole, mark_batching, optimize_steps, race, split_lookups
from flowkit.plan import AnyOf, Stage

SCHEMA = {"x": int, "s": str}
DATA = {"x": [3, 1, 4, 1, 5, 9, 2, 6], "s": ["a", "b", "a", "c", "b", "a", "c", "b"]}


def names(plan):
    return [op.name for op in plan.stages()]


def inc(row) -> tuple[int, str]:
    return row["x"] + 1, row["s"]


def model(row) -> tuple[int, str]:
    return row["x"] * 2, row["s"]


def test_a_linear_chain_fuses_into_one_stage_and_the_input_flow_is_untouched():
    f = fk.Flow("chain", SCHEMA)
    f.map(inc, names=["x", "s"]).filter(lambda r: r["x"] > 1).map(model, names=["x", "s"])
    before = f.plan
    opt = fk.optimize(f)
    assert names(opt.plan) == ["inc+lambda#1+model"]
    stage = opt.plan["inc+lambda#1+model"]
    assert stage.member_names == ("inc", "lambda#1", "model") and stage.inputs == ("input",)
    assert f.plan == before and names(f.plan) == ["inc", "lambda#1", "model"]
    assert opt.run(DATA) == f.run(DATA)


def test_joins_and_fan_outs_end_chains():
    f = fk.Flow("shape", SCHEMA)
    a = f.map(inc, names=["x", "s"])
    b = a.map(model, names=["x", "s"])          # a fans out to b and c: a ends its chain
    c = a.filter(lambda r: r["x"] > 2)
    j = b.join(c)
    j.map(inc, names=["x", "s"]).map(model, names=["x", "s"])
    assert find_chains(f.plan) == [("inc#2", "model#2")]
    p = fuse(f.plan)
    assert names(p) == ["inc", "model", "lambda#1", "join", "inc#2+model#2"]
    assert p["inc#2+model#2"].inputs == ("join",)


def test_a_chain_does_not_cross_a_change_of_resource_class_unless_whole():
    f = fk.Flow("gpu", SCHEMA)
    f.map(inc, names=["x", "s"]).map(inc, names=["x", "s"]).map(model, names=["x", "s"], gpu=True) \
        .map(model, names=["x", "s"], gpu=True).map(inc, names=["x", "s"])
    p = fuse(f.plan)
    assert names(p) == ["inc+inc#2", "model+model#2", "inc#3"]
    assert p["model+model#2"].is_gpu and not p["inc+inc#2"].is_gpu
    assert any("runs on a GPU" in r.message for r in p.rewrites)
    whole = fuse_whole(f.plan)
    assert names(whole) == ["gpu[whole]"] and len(whole["gpu[whole]"].members) == 5


def test_whole_fuses_a_dag_with_joins_and_gives_the_same_rows():
    f = fk.Flow("dag", SCHEMA)
    a = f.map(inc, names=["x", "s"])
    f.output = a.join(a.filter(lambda r: r["x"] % 2 == 0).map(model, names=["x", "y"]), how="left")
    opt = fk.optimize(f, whole=True)
    assert len(opt.plan.stages()) == 1
    assert opt.run(DATA) == f.run(DATA)


def test_compete_adds_k_replicas_feeding_an_anyof_under_the_original_name():
    f = fk.Flow("race", SCHEMA)
    f.map(inc, names=["x", "s"]).map(model, names=["x", "s"], high_variance=True).map(inc, names=["x", "s"])
    p = race(f.plan, 3)
    assert names(p) == ["inc", "model~1", "model~2", "model~3", "model", "inc#2"]
    anyof = p["model"]
    assert isinstance(anyof, AnyOf) and anyof.race == "model" and anyof.inputs == ("model~1", "model~2", "model~3")
    assert [p[f"model~{i}"].replica for i in (1, 2, 3)] == [1, 2, 3]
    assert p["inc#2"].inputs == ("model",)
    assert race(f.plan, 1) == f.plan


def test_compete_replicates_the_whole_fused_stage_of_a_high_variance_operator():
    f = fk.Flow("race", SCHEMA)
    f.map(inc, names=["x", "s"]).map(model, names=["x", "s"], high_variance=True)
    opt = fk.optimize(f, compete=2)
    assert names(opt.plan) == ["inc+model~1", "inc+model~2", "inc+model"]
    assert opt.plan["inc+model~1"].member_names == ("inc", "model")
    assert opt.run(DATA) == f.run(DATA)
    assert "2 replicas race (inc+model~1, inc+model~2)" in " ".join(opt.explain())


def test_locality_splits_a_fused_stage_before_each_dynamic_lookup():
    f = fk.Flow("rec", {"user": str})
    f.map(str.lower, col="user").lookup("user", dynamic=True).map(lambda r: r["user_value"] + 1, names=["cat"]) \
        .map(lambda r: str(r["cat"]), names=["c"]).lookup("c", dynamic=True).map(lambda r: r["c_value"] * 2, names=["s"])
    p = split_lookups(fuse(f.plan))
    assert names(p) == ["lower", "lookup_user+lambda#1+lambda#2", "lookup_c+lambda#3"]
    assert p["lookup_user+lambda#1+lambda#2"].lookup_split and p["lookup_c+lambda#3"].lookup_split
    assert p["lookup_c+lambda#3"].inputs == ("lookup_user+lambda#1+lambda#2",)
    store = {"u1": 1, "u2": 2, "2": 10, "3": 20}
    data = {"user": ["U1", "U2"]}
    assert fk.optimize(f).run(data, store=store) == f.run(data, store=store)
    assert [r["s"] for r in f.run(data, store=store)] == [20, 40]


def test_locality_without_fusion_gives_each_dynamic_lookup_its_own_stage():
    f = fk.Flow("rec", {"k": str})
    f.lookup("k", dynamic=True).map(len, col="k")
    p = split_lookups(f.plan)
    assert isinstance(p["lookup_k"], Stage) and p["lookup_k"].lookup_split
    assert "placed where the object for each key already lives" in str(p.rewrites[0])


def test_batching_marks_stages_with_per_operator_or_global_settings():
    def embed(table) -> list[int]:
        return [r["x"] for r in table]

    f = fk.Flow("batch", SCHEMA)
    f.map(inc, names=["x", "s"]).map(embed, names=["e"], batching=True, max_wait_ms=2)
    p = mark_batching(fuse(f.plan), max_batch=16, max_wait_ms=10)
    stage = p["inc+embed"]
    assert (stage.batching.max_batch, stage.batching.max_wait_ms) == (16, 2)
    assert "batches of up to 16 rows, at once while a thread is free" in str(p.rewrites[-1])
    waiting = mark_batching(fuse(f.plan), max_batch=16, max_wait_ms=10, eager=False)
    assert "batches of up to 16 rows, waiting at most 2 ms" in str(waiting.rewrites[-1])
    assert fk.optimize(f, batching=False).plan["inc+embed"].batching is None


def test_explain_names_every_rewrite_with_its_operators():
    f = fk.Flow("all", {"k": str, "x": int})
    f.map(inc, names=["x", "k"]).lookup("k", dynamic=True).map(lambda r: (r["x"], r["k"]), names=["x", "k"],
                                                                high_variance=True)
    lines = fk.optimize(f, compete=2).explain()
    text = "\n".join(lines)
    assert lines[0].startswith("fusion: fused inc → lookup_k → lambda#1")
    assert "locality: split 'inc+lookup_k+lambda#1' before dynamic lookup 'lookup_k'" in text
    assert "compete: 'lookup_k+lambda#1' is high-variance: 2 replicas race" in text
    assert fk.Flow("empty", SCHEMA).explain() == []


def test_rules_are_checked_and_documented():
    f = fk.Flow("rules", SCHEMA)
    with pytest.raises(fk.FlowError, match="unknown optimizer rule 'compete_replicas'; valid rules: fusion"):
        fk.optimize(f, compete_replicas=2)
    with pytest.raises(fk.FlowError, match="compete must be"):
        fk.optimize(f, compete=0)
    steps = optimize_steps(f.plan, compete=True)
    assert [name for name, _ in steps] == ["input", "fusion", "locality", "batching", "compete"]


# -- property: every combination of rules gives the same rows ---------------------------------
def ident(row) -> tuple[int, str]:
    return row["x"], row["s"]


def neg(row) -> tuple[int, str]:
    return -row["x"], row["s"] + "!"


def batch_inc(table) -> list[tuple[int, str]]:
    return [(r["x"] + 1, r["s"]) for r in table]


def back_from_agg(row) -> tuple[int, str]:
    return int(row["sum_x"]), row["s"]


def back_from_lookup(row) -> tuple[int, str]:
    return row["x"] + row["s_value"], row["s"]


STORE = {s: len(s) for s in ["a", "b", "c", "a!", "b!", "c!", "a!!", "b!!", "c!!"]}
ops = st.lists(st.tuples(st.sampled_from(["map", "neg", "batch", "filter", "join", "union", "anyof", "agg", "lookup"]),
                         st.integers(0, 100), st.sampled_from(["", "gpu", "hv"])), min_size=1, max_size=7)


def build(program):
    f = fk.Flow("random", SCHEMA)
    nodes = [f]
    for kind, pick, hint in program:
        a = nodes[pick % len(nodes)]
        b = nodes[(pick // 7) % len(nodes)]
        kw = {"gpu": hint == "gpu", "high_variance": hint == "hv"}
        if kind == "map":
            n = a.map(ident, names=["x", "s"], **kw)
        elif kind == "neg":
            n = a.map(neg, names=["x", "s"], **kw)
        elif kind == "batch":
            n = a.map(batch_inc, names=["x", "s"], batching=True, **kw)
        elif kind == "filter":
            n = a.filter(lambda r: r["x"] % 3 != 0)
        elif kind == "join":
            n = a.join(b, how=["inner", "left", "outer"][pick % 3]) if a is not b else a.join(a.map(ident, names=["x", "s"]))
        elif kind == "union":
            n = a.union(b)
        elif kind == "anyof":
            n = a.anyof(a.map(ident, names=["x", "s"], **kw))
        elif kind == "agg":
            n = a.groupby("s").agg("sum", "x").map(back_from_agg, names=["x", "s"])
        else:
            n = a.lookup("s", dynamic=True).map(back_from_lookup, names=["x", "s"], **kw)
        nodes.append(n)
    f.output = nodes[-1]
    return f


def multiset(table):
    return Counter((r.qid, tuple(r.values)) for r in table)


RULE_SETS = [dict(fusion=fu, whole=wh, compete=c, locality=lo, batching=ba)
             for fu, wh, c, lo, ba in itertools.product([True, False], [False, True], [1, 2], [True, False], [True, False])]


@settings(max_examples=25, deadline=None)
@given(ops)
def test_every_combination_of_rules_gives_the_same_rows(program):
    flow = build(program)
    expected = multiset(flow.run(DATA, store=STORE))
    for rules in RULE_SETS:
        assert multiset(fk.optimize(flow, **rules).run(DATA, store=STORE)) == expected, rules


@settings(max_examples=25, deadline=None)
@given(ops)
def test_optimizing_an_optimized_flow_again_changes_nothing(program):
    """``fk.deploy(fk.optimize(flow, compete=2), optimize={"compete": 2})`` used to race the
    replicas again (four, nested), and re-optimizing undid locality splits by fusing them."""
    flow = build(program)
    for rules in RULE_SETS:
        once = fk.optimize(flow, **rules)
        twice = fk.optimize(once, **rules)
        assert twice.plan.stages() == once.plan.stages() and twice.explain() == once.explain(), rules
        again = fk.optimize(once)   # what fk.deploy does with its default rules
        assert sum(isinstance(op, AnyOf) and bool(op.race) for op in again.plan.nodes) == \
            sum(isinstance(op, AnyOf) and bool(op.race) for op in once.plan.nodes), rules
