"""The latency-objectives notebook, executed for real (a kernel, the embedded cluster, a
profile, a deployment planned for an objective, load), checked by what its cells show."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_latency_objectives_notebook_plans_deploys_and_compares(processes):
    import nbformat
    from nbclient import NotebookClient

    processes.sweep()   # the kernel and its clusters stop with the test
    path = ROOT / "notebooks" / "05_latency_objectives.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   store_widget_state=True).execute()

    def shown(cell) -> str:
        return "".join(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values())
                       for o in cell.get("outputs", []))

    cells = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.splitlines()[0]: shown(c) for c in cells}
    assert "(request path)" in by_source['sample = {"x": list(range(8))}']           # the profile's table
    explain = by_source["dep = fk.deploy(flow, slo_ms=40, rate=60, max_workers=2)"]
    assert explain.startswith("objective: p99 <= 40 ms") and "workers:" in explain
    compared = by_source["rng = np.random.default_rng(0)"]                             # predicted next to measured
    assert "(end to end)" in compared and "measured_p99_ms" in compared and "NaN" not in compared.split("\n")[1]
    assert "no plan holds p99 <= 40 ms at 5000 req/s" in by_source["try:"]            # refused before deploying
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert any("svg" in str(m.get("state", {}).get("value", "")) for m in state.values())   # the drawings
