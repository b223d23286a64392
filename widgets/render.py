"""Drawing plans: plan -> DOT -> SVG, as pure functions.

``plan_to_dot`` describes every operator as a node: its function's name, its output columns
and types, and its hints (gpu, batching, high_variance, dynamic). Fused stages are clusters
around their original operators; competitive replicas are clusters marked "replica i of k"
feeding the race (a gold diamond); stages split for locality are marked. ``stats`` (from
``dep.stats()``) adds per-stage throughput and latency to the labels. ``dot_to_svg`` renders
in-process with pygraphviz's bundled Graphviz, else with a ``dot`` program on PATH, else gives
back no SVG and says why (callers then show the DOT text).
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import subprocess
from typing import Any, Mapping

from flowkit.plan import AnyOf, Op, Plan, Stage
from flowkit.schema import type_name

__all__ = ["plan_to_dot", "dot_to_svg", "plan_to_svg", "plan_mimebundle", "COLORS", "legend_dot"]

# One fill colour per kind, so kinds are told apart at a glance (and the legend says which).
COLORS = {
    "input": "#e8e8e8", "map": "#cfe3f7", "filter": "#fbeec1", "groupby": "#e6d3f0", "agg": "#e6d3f0",
    "combine": "#e6d3f0", "lookup": "#f9d5c0", "join": "#d4efd1", "union": "#d4efd1", "anyof": "#f6c945",
    "stage": "#f4f8fc", "replica": "#fff4d6", "split": "#fde9df", "gpu": "#c9f0e4",
}
HINT_BADGES = {"gpu": "GPU", "batching": "batching", "high_variance": "high variance", "dynamic": "dynamic key"}


def _id(*parts: str) -> str:
    return '"' + "/".join(p.replace('"', "'") for p in parts) + '"'


def _label(op: Op, stats: Mapping[str, Any] | None, note: str = "") -> str:
    name = html.escape(op.name)
    cols = "<BR/>".join(f"{html.escape(n)}: {html.escape(type_name(t))}" for n, t in op.schema.items())
    rows = [f'<TR><TD><B>{name}</B> <FONT POINT-SIZE="9" COLOR="#555555">{op.kind}</FONT></TD></TR>',
            f'<TR><TD BALIGN="LEFT"><FONT POINT-SIZE="9">{cols or "(no columns)"}</FONT></TD></TR>']
    badges = [HINT_BADGES.get(h, h) for h in op.hints]
    if op.grouped_by:
        badges.append(f"grouped by {op.grouped_by}")
    if badges:
        rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="#8a3b00">{html.escape(" · ".join(badges))}</FONT></TD></TR>')
    line = _stats_line(stats, op.name)
    if line:
        rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="#1a5e20">{html.escape(line)}</FONT></TD></TR>')
    if note:
        rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="#1f3f8f">{html.escape(note)}</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0">' + "".join(rows) + "</TABLE>>"


def _stats_line(stats: Mapping[str, Any] | None, name: str) -> str:
    if not stats or name not in stats:
        return ""
    s = stats[name]
    parts = []
    if s.get("rate") is not None:
        parts.append(f"{s['rate']:.1f} req/s")
    if s.get("p50_ms") == s.get("p50_ms") and s.get("p50_ms") is not None:
        parts.append(f"p50 {s['p50_ms']:.2f} ms")
    if s.get("p99_ms") == s.get("p99_ms") and s.get("p99_ms") is not None:
        parts.append(f"p99 {s['p99_ms']:.2f} ms")
    if s.get("errors"):
        parts.append(f"{s['errors']} errors")
    return " · ".join(parts)


def _node(node_id: str, op: Op, stats, note: str = "") -> str:
    kind = "gpu" if op.is_gpu and op.kind == "map" else op.kind
    fill = COLORS.get(kind, "#ffffff")
    style = "filled" if op.shape != "box" else "rounded,filled"
    if isinstance(op, AnyOf):
        text = ("race " if op.race else "anyof ") + op.name + (f"\n{note}" if note else "")
        label = f'"{html.escape(text)}"'
    else:
        label = _label(op, stats, note)
    return f"  {node_id} [shape={op.shape}, style=\"{style}\", fillcolor=\"{fill}\", label={label}];"


def _stage_title(stage: Stage, replicas: int) -> tuple[str, str]:
    marks, fill = ["fused" if len(stage.members) > 1 else "stage"], COLORS["stage"]
    if stage.replica:
        marks = [f"replica {stage.replica} of {replicas}"]
        fill = COLORS["replica"]
    if stage.lookup_split:
        marks.append("split for locality: runs where the key's object lives")
        fill = COLORS["split"] if not stage.replica else fill
    if stage.batching:
        marks.append(f"batching ≤ {stage.batching.max_batch} rows / {stage.batching.max_wait_ms:g} ms")
    return f"{stage.name}\n{' · '.join(marks)}", fill


def _outputs(plan: Plan) -> dict[str, str]:
    """The node that carries each operator's output (a stage's output member)."""
    return {op.name: (_id(op.name, op.output) if isinstance(op, Stage) else _id(op.name)) for op in plan.nodes}


def plan_to_dot(plan: Plan, stats: Mapping[str, Any] | None = None, title: str | None = None,
                legend: bool = True, labels: Mapping[str, str] | None = None) -> str:
    """The DOT source for ``plan``: nodes per operator, clusters per stage, a legend.
    ``labels``: ``{stage or operator name: text}`` the caller adds to that node (a plan's
    predicted latency, batch and replicas: ``inspector.slo_labels``).

    >>> import flowkit as fk
    >>> f = fk.Flow("f", {"x": int})
    >>> _ = f.map(abs, names=["y"], gpu=True)
    >>> dot = plan_to_dot(f.plan, legend=False)
    >>> '"abs"' in dot and "GPU" in dot and '"input" -> "abs"' in dot
    True
    >>> "predicted p99 3 ms" in plan_to_dot(f.plan, legend=False, labels={"abs": "predicted p99 3 ms"})
    True
    """
    labels = labels or {}
    out = _outputs(plan)
    replicas = {}
    for op in plan.nodes:
        if isinstance(op, Stage) and op.replica_of:
            replicas[op.replica_of] = replicas.get(op.replica_of, 0) + 1
    lines = ["digraph flowkit {", "  rankdir=LR; compound=true; newrank=true;",
             '  node [fontname="Helvetica", fontsize=11, margin="0.08,0.04"];',
             '  edge [color="#555555", arrowsize=0.7]; graph [fontname="Helvetica", fontsize=11];']
    if title:
        lines.append(f'  labelloc=t; label="{html.escape(title)}";')
    edges = []
    for op in plan.nodes:
        if isinstance(op, Stage):
            label, fill = _stage_title(op, replicas.get(op.replica_of, 0))
            line = _stats_line(stats, op.name)
            label = label + (f"\n{line}" if line else "") + (f"\n{labels[op.name]}" if labels.get(op.name) else "")
            lines.append(f"  subgraph {_id('cluster_' + op.name)} {{")
            lines.append(f'    label="{html.escape(label)}"; style="rounded,filled"; fillcolor="{fill}"; color="#7a8ca5";')
            inside = {m.name for m in op.members}
            for m in op.members:
                lines.append("  " + _node(_id(op.name, m.name), m, None, labels.get(m.name, "")))
                for i in m.inputs:
                    src = _id(op.name, i) if i in inside else out[i]
                    edges.append(f"  {src} -> {_id(op.name, m.name)};")
            lines.append("  }")
        else:
            lines.append(_node(_id(op.name), op, stats, labels.get(op.name, "")))
            for i in op.inputs:
                style = ' [style=dashed, color="#b8860b"]' if isinstance(op, AnyOf) else ""
                edges.append(f"  {out[i]} -> {_id(op.name)}{style};")
    lines += edges
    if legend:
        lines.append(legend_dot())
    lines.append("}")
    return "\n".join(lines)


def legend_dot() -> str:
    """A small legend cluster: one swatch per kind of node and stage."""
    items = [("map", "map"), ("gpu", "GPU map"), ("filter", "filter"), ("agg", "group/agg"), ("lookup", "lookup"),
             ("join", "join/union"), ("anyof", "race/anyof"), ("stage", "fused stage"), ("replica", "replica"),
             ("split", "locality split")]
    cells = "".join(f'<TD BGCOLOR="{COLORS[k]}"><FONT POINT-SIZE="9">{html.escape(t)}</FONT></TD>' for k, t in items)
    return (f'  subgraph "cluster_legend" {{ label="legend"; fontsize=9; color="#bbbbbb"; '
            f'"legend" [shape=plain, label=<<TABLE BORDER="0" CELLSPACING="2" CELLPADDING="3"><TR>{cells}</TR></TABLE>>]; }}')


def dot_to_svg(dot: str) -> tuple[str | None, str]:
    """Render DOT to SVG: pygraphviz in-process, else the ``dot`` program; (None, why) if neither."""
    reasons = []
    try:
        import pygraphviz

        with _quiet_stderr():  # Graphviz's bundled fontconfig warns about an unknown config element
            svg = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
        return svg.decode() if isinstance(svg, bytes) else svg, "pygraphviz"
    except ImportError:
        reasons.append("pygraphviz is not installed")
    except Exception as e:
        reasons.append(f"pygraphviz failed: {e}")
    exe = shutil.which("dot")
    if exe:
        try:
            res = subprocess.run([exe, "-Tsvg"], input=dot.encode(), capture_output=True, timeout=30, check=True)
            return res.stdout.decode(), "dot"
        except Exception as e:
            reasons.append(f"dot failed: {e}")
    else:
        reasons.append("no `dot` program on PATH")
    return None, "; ".join(reasons)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (file descriptor 2) for the duration."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _scalable(svg: str) -> str:
    """Let the drawing shrink to its container's width (keeping its natural size as the maximum)."""
    return re.sub(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"',
                  lambda m: f'<svg width="100%" style="max-width:{m.group(1)}pt; height:auto"', svg, count=1)


def plan_to_svg(plan: Plan, stats=None, title: str | None = None, labels: Mapping[str, str] | None = None) -> str:
    """SVG markup for ``plan``, or the DOT text in a <pre> with the reason it could not be drawn.
    ``labels``: per-node text from the caller (see ``plan_to_dot``)."""
    dot = plan_to_dot(plan, stats, title, labels=labels)
    svg, how = dot_to_svg(dot)
    if svg is None:
        return (f'<div><p><b>Could not draw the plan</b> ({html.escape(how)}); install pygraphviz or Graphviz. '
                f"Its DOT source:</p><pre>{html.escape(dot)}</pre></div>")
    start = svg.find("<svg")
    return _scalable(svg[start:] if start >= 0 else svg)


def problem_html(problem: str) -> str:
    """A flow that cannot run yet, said above its drawing (pure)."""
    return (f'<p style="color:#8a4b00"><b>Not runnable yet:</b> {html.escape(problem)}. '
            "Every operator written so far is drawn below.</p>")


def plan_mimebundle(plan: Plan, problem: str | None = None) -> dict:
    """What a notebook shows for a Flow: the drawn plan (HTML+SVG) and a text description;
    ``problem`` says why an unfinished flow (drawn from ``flow.sketch()``) cannot run yet."""
    svg = plan_to_svg(plan)
    note = problem_html(problem) if problem else ""
    text = f"{plan.name}:\n{plan.describe()}" + (f"\nnot runnable yet: {problem}" if problem else "")
    return {"text/html": f'<div class="flowkit-plan">{note}{svg}</div>', "text/plain": text}


