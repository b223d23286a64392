"""The suite's own machinery (tests/conftest.py): a run that leaves a process behind fails and
names it; the ``processes`` fixture stops what a test started, whatever its outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _pytest(tmp_path, source: str) -> subprocess.CompletedProcess:
    """pytest in a subprocess over one test file, with this suite's conftest as a plugin."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_ADDOPTS="")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)


def test_a_run_that_leaves_a_process_behind_fails_and_names_it(tmp_path):
    pid_file = tmp_path / "pid"
    done = _pytest(tmp_path, f"""
        import subprocess
        from pathlib import Path

        def test_leaks():
            proc = subprocess.Popen(["sleep", "600"])   # never stopped
            Path({str(pid_file)!r}).write_text(str(proc.pid))
    """)
    out = done.stdout + done.stderr
    pid = int(pid_file.read_text())
    assert done.returncode == 1, out
    assert "1 passed" in out and "processes left behind" in out and f"pid {pid}: sleep 600" in out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE   # and stopped


def test_a_run_that_stops_what_it_starts_passes_even_when_its_test_fails_midway(tmp_path):
    pid_file = tmp_path / "pid"
    done = _pytest(tmp_path, f"""
        import sys
        from pathlib import Path

        def test_starts_a_process_tree_and_fails(processes):
            # a shell that starts a child of its own: both are stopped at teardown
            proc = processes.start(["bash", "-c", "sleep 600 & echo $! > {pid_file}; wait"])
            from tests.waiting import wait_until
            wait_until(lambda: Path({str(pid_file)!r}).exists() and Path({str(pid_file)!r}).read_text().strip(),
                       "the grandchild to start")
            assert False, "the test fails after starting them"

        def test_a_cluster_fixture_is_closed(make_cluster):
            client = make_cluster(n_workers=1)
            assert len(client.scheduler_info()["workers"]) == 1

        def test_a_sweep_stops_what_other_code_started(processes):
            import subprocess
            processes.sweep()
            subprocess.Popen(["sleep", "600"])   # as a benchmark starting its own servers
    """)
    out = done.stdout + done.stderr
    assert "1 failed, 2 passed" in out, out
    assert "processes left behind" not in out
    assert done.returncode == 1   # the failing test's, nothing more
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
