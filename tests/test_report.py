"""benchmarks/report.py: the docs' measured parts agree with the committed results, and --check
notices when they do not."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import report as module

    return module


@pytest.fixture
def docs_copy(report, tmp_path, monkeypatch):
    """The docs in a scratch folder, so a test can change them; the results stay the real ones."""
    for name in report.DOC_FILES:
        shutil.copy(report.DOCS / name, tmp_path / name)
    monkeypatch.setattr(report, "DOCS", tmp_path)
    monkeypatch.setattr(report, "uncommitted", lambda names: [])
    return tmp_path


def test_the_docs_agree_with_the_committed_results():
    """What CI runs: exit 0, or the disagreements on stderr."""
    out = subprocess.run([sys.executable, str(BENCH / "report.py"), "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "agree" in out.stdout


def test_every_doc_has_report_blocks_and_each_is_known(report):
    for name in report.DOC_FILES:
        found = report.BLOCK.findall((report.DOCS / name).read_text())
        assert found, f"docs/{name} has no report block"
        assert {n for n, _ in found} <= set(report.BLOCKS)


def test_a_changed_number_in_a_block_is_caught(report, docs_copy):
    assert report.process(check=True) == []
    doc = docs_copy / "serving.md"
    text = doc.read_text()
    block = report.BLOCK.search(text)
    body = block.group("body")
    changed = re.sub(r"\| (\d+) \|", lambda m: f"| {int(m[1]) + 1} |", body, count=1)   # the first count in a table
    assert changed != body
    doc.write_text(text.replace(body, changed))
    problems = report.process(check=True)
    assert any("serving.md" in p and "'http'" in p for p in problems), problems


def test_a_hand_written_measurement_in_a_measured_section_is_caught(report, docs_copy):
    doc = docs_copy / "deploy.md"
    doc.write_text(doc.read_text().replace("## Measured (", "## Measured (flowkit answers in 0.5 ms; ", 1))
    problems = report.process(check=True)
    assert any("deploy.md" in p and "0.5 ms" in p for p in problems), problems


def test_a_measurement_outside_measured_sections_is_left_alone(report, docs_copy):
    doc = docs_copy / "deploy.md"
    doc.write_text("A note: 3 ms here is not in a measured section.\n\n" + doc.read_text())
    assert report.process(check=True) == []


def test_an_unknown_block_is_an_error(report, docs_copy):
    doc = docs_copy / "optimizations.md"
    doc.write_text(doc.read_text() + "\n<!-- report:nonesuch -->\n<!-- /report:nonesuch -->\n")
    assert any("nonesuch" in p for p in report.process(check=True))


def test_writing_fills_an_emptied_block_back(report, docs_copy):
    doc = docs_copy / "optimizations.md"
    original = doc.read_text()
    emptied = report.BLOCK.sub(lambda m: f"<!-- report:{m['name']} -->\n<!-- /report:{m['name']} -->", original)
    doc.write_text(emptied)
    assert report.process(check=True)                  # empty blocks disagree with the results
    monkey_figures = report.figures_pipelines
    try:
        report.figures_pipelines = lambda write: []    # do not redraw the real figures from a test
        assert report.process(check=False) == []
    finally:
        report.figures_pipelines = monkey_figures
    assert doc.read_text() == original


def test_the_highest_rate_held_stops_at_the_first_failing_rate(report):
    rows = [{"rate": 100, "sent": 10, "completed": 10, "errors": 0, "within_target": 1.0},
            {"rate": 200, "sent": 20, "completed": 19, "errors": 0, "within_target": 0.95},   # a failure
            {"rate": 400, "sent": 40, "completed": 40, "errors": 0, "within_target": 1.0}]
    assert report.held(rows) == 100
    rows[0]["errors"] = 1
    assert report.held(rows) is None


def test_a_missing_result_says_not_measured(report, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.render("http").startswith("Not measured: `benchmarks/results/http_vs_fastapi.json`")


def test_save_records_commit_versions_configuration_and_machine(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import _report

    monkeypatch.setattr(_report, "RESULTS", tmp_path)
    path = _report.save("probe", {"rows": []}, "table", config={"workers": 2, "torch_threads": 1})
    meta = json.loads(path.read_text())["meta"]
    assert meta["config"] == {"workers": 2, "torch_threads": 1}
    assert meta["cpus"] >= 1 and meta["python"] and "date" in meta
    assert "numpy" in meta["versions"] and isinstance(meta["peer_versions"], dict)
    if shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert meta["commit"] == head


def test_the_models_result_names_a_real_model_for_each_random_one(report):
    models = report.load("models")["models"]
    mobilenet = [m for m in models if m["model"] == "MobileNetV2"]
    assert {m["input"] for m in mobilenet} == {"1×3×96×96", "1×3×224×224"}
    heavy = next(m for m in mobilenet if m["pipeline"] == "heavy")
    assert heavy["gflops"] == pytest.approx(0.6015, rel=0.01)   # torchvision states 0.301 GMACs at 224
    assert all(m["sized_as"] for m in models)


def test_pipeline_tables_take_each_pipeline_from_its_newest_run_by_the_current_harness(report, tmp_path,
                                                                                       monkeypatch):
    def run(date, pipelines, reps=True, p50=1.0):
        rows = [{"pipeline": p, "system": "flowkit optimized, HTTP", "p50_ms": p50, "p99_ms": 2 * p50, "n": 2000,
                 **({"reps": 3} if reps else {})} for p in pipelines]
        return {"meta": {"date": date, "commit": "c" * 40}, "closed": rows,
                "open": [{**r, "rate": 10, "sent": 100, "completed": 100, "within_target": 1.0} for r in rows]}

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "pipelines.json").write_text(json.dumps(run("2026-11-29T01:00", ["cascade", "video"], p50=5.0)))
    (tmp_path / "pipelines_recommender_video.json").write_text(json.dumps(run("2026-11-30T01:00", ["video", "recommender"])))
    (tmp_path / "pipelines_heavy.json").write_text(json.dumps(run("2026-11-30T02:00", ["heavy"], reps=False)))   # old harness
    assert report.pipeline_files() == ("pipelines_recommender_video", "pipelines")
    used, merged = report._pipelines()
    assert used == ("pipelines_recommender_video", "pipelines")
    assert [(r["pipeline"], r["p50_ms"]) for r in merged["closed"]] == [("cascade", 5.0), ("video", 1.0),
                                                                       ("recommender", 1.0)]
    assert report.provenance(used).count("*Source:") == 2
    for name in ("pipelines.json", "pipelines_recommender_video.json"):
        (tmp_path / name).unlink()
    with pytest.raises(report.Missing):
        report._pipelines()
