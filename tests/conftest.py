"""What every test module shares: dask clusters built one way, processes that are always
stopped, and the suite's check, at its end, that it left no process behind.

- ``client`` (module scope): two single-threaded worker processes and a ``Client``, shared by
  one module's tests and closed when they are done.
- ``clusters`` (module scope) and ``make_cluster`` (one test): factories of other clusters,
  ``clusters(n_workers=1, threads_per_worker=2, processes=False, client=False)``; each is closed
  with the scope that made it.
- ``processes`` (one test): ``processes.start([...])`` starts a process that is stopped, with
  every process it started, when the test ends, whatever its outcome; ``processes.sweep()``
  stops, then, every process started during the test by any code.
- After the whole run, any child process of pytest still alive fails the run (exit status 1),
  named with its command line, and is stopped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

os.environ.setdefault("DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION", "inf")

GRACE_S = 30.0   # how long a process may take to exit once asked (a loaded machine is slow)


# -- clusters ---------------------------------------------------------------------------------------
def _local_cluster(stack: contextlib.ExitStack, n_workers: int = 2, threads_per_worker: int = 1,
                   processes: bool = True, client: bool = True, **options):
    from distributed import Client, LocalCluster

    cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                               processes=processes, dashboard_address=":0", **options))
    return stack.enter_context(Client(cluster)) if client else cluster


@pytest.fixture(scope="module")
def clusters():
    """Makes LocalClusters (with a Client unless ``client=False``) closed after the module's tests."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: _local_cluster(stack, **options)


@pytest.fixture
def make_cluster():
    """Makes LocalClusters (with a Client unless ``client=False``) closed after this test."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: _local_cluster(stack, **options)


@pytest.fixture(scope="module")
def client(clusters):
    """Two single-threaded worker processes and a Client, shared by one module's tests."""
    return clusters()


# -- processes --------------------------------------------------------------------------------------
def stop_tree(pids, grace: float = GRACE_S) -> list:
    """Terminate these processes and every process they started (children first found, then
    all together); kill those still alive after ``grace`` seconds. Returns the psutil processes
    that were alive when asked."""
    import psutil

    family = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            family += [root, *root.children(recursive=True)]
        except psutil.Error:
            pass
    family = [p for p in dict.fromkeys(family) if _alive(p)]
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return family


class Processes:
    """Processes a test starts; all stopped (with their children) when the test ends. After
    ``sweep()``, also every other process started during the test (by code that starts its own,
    such as a benchmark's peer servers)."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []
        self.before = {p.pid for p in _children()}
        self.sweeping = False

    def sweep(self) -> None:
        self.sweeping = True

    def start(self, args, **popen) -> subprocess.Popen:
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(args, **popen)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        pids = [p.pid for p in self.started if p.poll() is None]
        if self.sweeping:
            pids += [p.pid for p in _children() if p.pid not in self.before and p.pid not in _helpers()]
        stop_tree(pids)
        for p in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(GRACE_S)   # reap it


@pytest.fixture
def processes():
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop()


# -- the suite leaves no process behind -------------------------------------------------------------
def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _helpers() -> set:
    """Processes the standard library keeps for the whole life of the interpreter (not leaks)."""
    pids = set()
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        pids.add(resource_tracker._resource_tracker._pid)
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver

        pids.add(forkserver._forkserver._forkserver_pid)
    return pids - {None}


def _children() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if _alive(p)]


def _describe(p) -> str:
    import psutil

    try:
        return f"pid {p.pid}: {' '.join(p.cmdline()) or p.name()}"
    except psutil.Error:
        return f"pid {p.pid}"


_BEFORE = {p.pid for p in _children()}   # whatever ran before the suite is not the suite's


def leftover_processes(grace: float = 10.0) -> list:
    """Child processes of this pytest still alive after ``grace`` seconds (time for those
    already asked to exit: the last module's cluster, a notebook's kernel)."""
    import psutil

    ignore = _BEFORE | _helpers()
    left = [p for p in _children() if p.pid not in ignore]
    psutil.wait_procs(left, timeout=grace)
    return [p for p in left if _alive(p)]


def pytest_sessionfinish(session, exitstatus):
    """After every test (and fixture) is done: name and stop any process the run left behind,
    and fail the run."""
    left = leftover_processes()
    if not left:
        return
    names = [_describe(p) for p in left]
    stop_tree([p.pid for p in left])
    message = "the test run left these processes running (now stopped):\n  " + "\n  ".join(names)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.section("processes left behind", sep="=", red=True, bold=True)
        reporter.write_line(message)
    else:
        print(message)
    if session.exitstatus == pytest.ExitCode.OK or session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
