"""The notebook layer, headless: renderers on DOT text, widgets on their traits."""

from __future__ import annotations

import re
from html import escape as html_escape

import numpy as np
import pytest

import flowkit as fk
from flowkit_widgets.charts import bar_chart_svg, line_chart_svg
from flowkit_widgets.inspector import Inspector, explain_html
from flowkit_widgets.render import dot_to_svg, plan_to_dot, plan_mimebundle, plan_to_svg


def preprocess(row) -> float:
    return float(len(row["user"]))


def embed(table) -> list[float]:
    return [1.0] * len(table)


def score(row) -> float:
    return 1.0


def translate(row) -> str:
    return "t"


def demo_flow() -> fk.Flow:
    f = fk.Flow("demo", {"user": str, "img": bytes})
    e = f.map(preprocess, names=["x"]).map(embed, names=["e"], batching=True)
    g = f.lookup("user", dynamic=True).map(score, names=["s"], gpu=True).map(translate, names=["t"], high_variance=True)
    f.output = e.join(g)
    return f


def test_nodes_show_function_columns_types_and_hints():
    dot = plan_to_dot(demo_flow().plan)
    assert '"preprocess" [' in dot and "x: float" in dot
    assert re.search(r'"score" \[[^\n]*fillcolor="#c9f0e4"[^\n]*GPU', dot)          # GPU map colour and badge
    assert "high variance" in dot and "batching" in dot and "dynamic key" in dot
    assert '"input" -> "preprocess"' in dot and '"translate" -> "join"' in dot
    assert "cluster_legend" in dot


def test_fused_stages_are_clusters_around_their_operators():
    dot = plan_to_dot(fk.optimize(demo_flow()).plan)
    assert 'subgraph "cluster_preprocess+embed"' in dot
    assert '"preprocess+embed/preprocess" -> "preprocess+embed/embed"' in dot
    assert "batching ≤ 32 rows / 5 ms" in dot
    assert "split for locality" in dot


def test_competitive_replicas_and_their_race_are_drawn_as_such():
    dot = plan_to_dot(fk.optimize(demo_flow(), compete=3).plan)
    assert dot.count("replica ") == 3 and "replica 3 of 3" in dot
    assert re.search(r'"translate" \[shape=diamond[^\n]*race translate', dot)
    assert '"translate~2/translate" -> "translate" [style=dashed' in dot


def test_svg_renders_without_a_dot_program(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    svg, how = dot_to_svg(plan_to_dot(demo_flow().plan))
    assert how == "pygraphviz" and svg.lstrip().startswith("<?xml") and "<svg" in svg and "preprocess" in svg


def test_without_any_renderer_the_dot_text_is_shown_with_the_reason(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pygraphviz(name, *args, **kwargs):
        if name == "pygraphviz":
            raise ImportError("no pygraphviz")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pygraphviz)
    monkeypatch.setenv("PATH", "/nonexistent")
    out = plan_to_svg(demo_flow().plan)
    assert "Could not draw the plan" in out and "no `dot` program on PATH" in out and "digraph flowkit" in out


def test_a_flow_draws_itself_when_it_is_the_value_of_a_cell():
    bundle = demo_flow()._repr_mimebundle_()
    assert "<svg" in bundle["text/html"] and "preprocess" in bundle["text/plain"]
    assert plan_mimebundle(demo_flow().plan)["text/plain"].startswith("demo:")


def test_inspector_shows_before_and_after_and_rerenders_on_toggles():
    insp = demo_flow().inspect()
    assert isinstance(insp, Inspector)
    assert insp.tabs.titles == ("after optimization", "before")
    assert "<svg" in insp.before.value and "cluster_preprocess" not in insp.before.value
    assert "preprocess+embed" in insp.after.value and "fusion" in insp.explain.value
    assert "race translate" not in insp.after.value
    insp.toggles["compete"].value = 2
    assert "race translate" in insp.after.value and "replicas race" in insp.explain.value
    insp.toggles["fusion"].value = False
    assert "preprocess+embed" not in insp.after.value
    insp.toggles["whole"].value = True
    assert "demo[whole]" in insp.after.value
    state = insp.tabs.get_state()
    assert state["_model_name"] == "TabModel"
    assert "application/vnd.jupyter.widget-view+json" in insp._repr_mimebundle_()


def test_an_unfinished_flow_is_drawn_with_what_is_missing():
    """Two sinks (or a grouped end) cannot run, but the notebook still shows what is written."""
    flow = fk.Flow("unfinished", {"x": int, "s": str})
    flow.map(lambda r: r["x"], names=["y"])
    flow.filter(lambda r: r["x"] > 1)
    bundle = flow._repr_mimebundle_()
    assert "<svg" in bundle["text/html"] and "Not runnable yet" in bundle["text/html"]
    assert "2 sinks" in bundle["text/plain"] and "lambda#2" in bundle["text/plain"]
    insp = flow.inspect(compete=2)
    assert "lambda#1" in insp.before.value and "lambda#2" in insp.before.value and "2 sinks" in insp.before.value
    assert "2 sinks" in insp.after.value and insp.tabs.selected_index == 1
    insp.toggles["fusion"].value = False   # toggles still work (and still say why)
    assert "2 sinks" in insp.after.value
    grouped = fk.Flow("grouped", {"k": str})
    grouped.groupby("k")
    assert "end the flow with .agg" in grouped._repr_mimebundle_()["text/html"]


def test_fk_inspect_takes_rules_and_rejects_unknown_ones():
    insp = fk.inspect(demo_flow(), compete=3, fusion=False)
    assert insp.toggles["compete"].value == 3 and insp.toggles["fusion"].value is False
    with pytest.raises(fk.FlowError, match="unknown optimizer rule 'fuse'"):
        fk.inspect(demo_flow(), fuse=True)


def test_explain_html_lists_every_rewrite():
    html = explain_html(fk.optimize(demo_flow(), compete=2).explain())
    assert html.count("<li ") == len(fk.optimize(demo_flow(), compete=2).explain()) >= 5 and "<b>compete</b>" in html
    assert "No rewrites" in explain_html([])


def test_bar_chart_svg_draws_one_bar_per_value_scaled_to_the_largest():
    svg = bar_chart_svg({"time": 5000.0, "spacetime": 70000.0, "none": 0.0}, title="requests/s", unit="")
    assert svg.count("<rect") == 3 and "70,000" in svg and "5,000" in svg and "requests/s" in svg
    widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', svg)]
    assert widths[1] > widths[0] > widths[2] == 0 and abs(widths[0] / widths[1] - 5000 / 70000) < 0.01


def test_line_chart_svg_draws_each_series_with_its_last_value():
    svg = line_chart_svg({"util": [(0, 10), (1, 55)], "mem": [(0, 20), (1, 30)]}, title="GPU", unit="%", ymax=100)
    assert svg.count("<polyline") == 2 and "util 55%" in svg and "mem 30%" in svg


def test_deployment_dashboard_shows_live_stage_figures(make_cluster):
    flow = fk.Flow("live", {"x": int})
    flow.map(lambda r: r["x"] + 1, names=["y"]).filter(lambda r: r["y"] > 0)
    client = make_cluster(n_workers=1, processes=False)
    with fk.deploy(flow, cluster=client) as dep:
        view = dep.dashboard(interval=0.05)
        try:
            for i in range(20):
                dep.run({"x": [i]})
            figures = view.refresh()
        finally:
            view.stop()
        assert figures["(end to end)"]["requests"] == 20
        assert "20 requests" in view.header.value and "p50" in view.graph.value
        assert "dask dashboard" in view.link.value and "<polyline" in view.chart.value


def test_line_chart_marks_an_objective_as_a_horizontal_line_kept_in_view():
    svg = line_chart_svg({"p99": [(0, 5.0), (1, 8.0)]}, title="latency", unit=" ms", hlines={"objective 50 ms": 50})
    lines = re.findall(r'<line class="hline" x1="([\d.]+)" x2="([\d.]+)" y1="([\d.]+)" y2="([\d.]+)"', svg)
    assert len(lines) == 1 and "objective 50 ms" in svg
    x1, x2, y1, y2 = map(float, lines[0])
    assert y1 == y2 and x2 > x1   # horizontal, across the plot
    top = re.search(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"', svg)
    assert float(top.group(1)) <= y1 <= float(top.group(1)) + float(top.group(2))   # inside the plot
    assert 'class="hline"' not in line_chart_svg({"p99": [(0, 5.0)]})


def test_the_dashboard_marks_the_objective_on_its_latency_chart(make_cluster):
    from flowkit.profiling import Profile

    flow = fk.Flow("slo_live", {"x": int})
    flow.map(preprocess_x, names=["y"])
    client = make_cluster(n_workers=1, processes=False)
    prof = Profile.from_latencies({"preprocess_x": {1: [1.0] * 20}})
    with fk.deploy(flow, cluster=client, slo_ms=250, rate=5, profile=prof) as dep:
        dep.replanner.stop()
        view = dep.dashboard(interval=60)
        try:
            for i in range(5):
                dep.run({"x": [i]})
            view.refresh()
        finally:
            view.stop()
        assert "<polyline" in view.latency.value and 'class="hline"' in view.latency.value
        assert "objective 250 ms" in view.latency.value
    with fk.deploy(flow, cluster=client) as plain:
        view = plain.dashboard(interval=60)
        view.stop()
        assert "latency (end to end)" in view.latency.value and 'class="hline"' not in view.latency.value


def preprocess_x(row) -> int:
    return row["x"] + 1


def batched_model(t) -> list[float]:
    return [1.0] * len(t)


def test_the_inspector_labels_nodes_with_a_plans_predicted_latency_batch_and_replicas():
    from flowkit.planner import Resources, plan_slo
    from flowkit.profiling import Profile
    from flowkit_widgets.inspector import slo_labels

    f = fk.Flow("planned", {"user": str})
    f.map(preprocess, names=["x"]).map(batched_model, names=["m"], batching=True) \
        .map(translate, names=["t"], high_variance=True)
    prof = Profile.from_latencies({"preprocess": {1: [0.5] * 50},
                                   "batched_model": {b: [3 + 0.4 * b] * 50 for b in (1, 2, 4, 8, 16, 32)},
                                   "translate": {1: list(np.random.default_rng(0).lognormal(0, 0.9, 400))}},
                                  batching=["batched_model"], high_variance=["translate"])
    slo = plan_slo(f, prof, slo_ms=50, rate=300, resources=Resources(max_workers=3))
    labels = slo_labels(slo)
    assert set(labels) == {s.name for s in slo.prediction.stages}
    assert all(text.startswith("predicted p50") and "p99" in text for text in labels.values())
    batched = [s for s in slo.prediction.stages if s.max_batch > 1]
    raced = [s for s in slo.prediction.stages if s.replicas > 1]
    assert batched and all(f"batch ≤ {s.max_batch}" in labels[s.name] for s in batched)
    assert all(f"{s.replicas} replicas race" in labels[s.name] for s in raced)
    dot = plan_to_dot(slo.plan, labels=labels, legend=False)
    assert all(html_escape(text) in dot for text in labels.values())   # each stage carries its prediction
    assert "predicted" not in plan_to_dot(slo.plan, legend=False)
    view = Inspector(f, slo_plan=slo)
    assert "planned for p99 &lt;= 50 ms" in view.after.value or "planned for p99 <= 50 ms" in view.after.value
    assert "predicted p50" in view.after.value and "objective" in view.explain.value
    roomy = plan_slo(f, prof, slo_ms=50, rate=10, resources=Resources(max_workers=3))   # one worker, room to race
    (stage, width), = roomy.race_widths.items()   # (fused with the stages before it, at this rate)
    assert roomy.workers == 1 and width == 1 and "3 replicas deployed, 1 racing" in slo_labels(roomy)[stage]
    plain = Inspector(f, labels={"preprocess": "a note from the caller"})   # an operator inside a fused stage
    assert "a note from the caller" in plain.after.value and "a note from the caller" not in plain.before.value


def test_the_slo_sliders_replan_the_drawing_and_apply_to_a_live_deployment(make_cluster):
    from flowkit.planner import Resources
    from flowkit.profiling import Profile
    from flowkit_widgets import explore_slo

    f = fk.Flow("sliders", {"x": int})
    f.map(preprocess_x, names=["y"])
    prof = Profile.from_latencies({"preprocess_x": {1: [10.0] * 50}})
    view = explore_slo(f, prof, slo_ms=30, rate=10, resources=Resources(max_workers=4))
    assert "on 1 worker " in view.title and "predicted p50" in view.drawing.value
    view.rate.value = 150   # what a user's drag does: the plan follows
    assert "at 150 req/s on 3 workers" in view.title and "3 workers" in view.drawing.value
    view.slo.value = 5      # below the stage's own 10 ms: no plan, and why
    assert view.title == "unreachable" and "no plan holds p99" in view.drawing.value
    with pytest.raises(fk.FlowError, match="needs a profile"):
        explore_slo(f, slo_ms=30, rate=40)

    client = make_cluster(n_workers=1, processes=False)
    with fk.deploy(f, cluster=client, slo_ms=250, rate=5, profile=prof) as dep:
        dep.replanner.stop()
        live = explore_slo(dep)
        assert live.slo.value == pytest.approx(250) and live.rate.value == pytest.approx(5)
        live.slo.value, live.rate.value = 100, 50
        live.apply.click()
        assert dep.slo_plan.slo_ms == pytest.approx(100) and dep.slo_plan.rate == pytest.approx(50)
        assert "asked: p99 &lt;= 100 ms at 50 req/s" in live.status.value
    with fk.deploy(f, cluster=client) as plain, pytest.raises(fk.FlowError, match="no latency objective"):
        explore_slo(plain)
