"""Starting the peers (in .venv-peers) and talking to every HTTP system the same way."""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"
SERVERS = Path(__file__).resolve().parent / "servers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return PEERS_PY.exists()


def _get(port: int, path: str, timeout: float = 2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


#: glibc's allocator as flowkit sets it in the worker processes it tunes (``plugin.tune_malloc``:
#: mmap threshold 32 MiB, trim threshold 64 MiB), given to every peer too, so that no system's
#: tensors are allocated differently. It also replaces what dask's nanny leaves in the
#: environment of the process that starts a LocalCluster (this benchmark's own, for flowkit's
#: systems): ``MALLOC_TRIM_THRESHOLD_=65536``, inherited, had every tensor buffer of a peer
#: mmap'd and unmapped per call.
SERVING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024 * 1024)}


def peer_env() -> dict:
    """A peer server's environment: this process's, with the allocator settings flowkit's
    workers run with (``SERVING_MALLOC``) and one torch thread."""
    return dict(os.environ, **SERVING_MALLOC, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def start(system: str, *args: str, ready_path: str = "/healthz", ready=None, timeout: float = 600.0, tries: int = 2):
    """Start a peer server; returns (process, port) once it answers ``ready_path`` (one retry:
    Ray's start-up on 2 busy cores occasionally loses its proxy actor). ``timeout`` guards a
    start that hangs; it is long because a loaded 2-core machine starting three peers at once
    took over 240 s to bring Ray Serve up."""
    for attempt in range(1, tries + 1):
        try:
            return _start(system, args, ready_path, ready, timeout)
        except RuntimeError:
            if attempt == tries:
                raise
            time.sleep(5)


def _start(system: str, args: tuple, ready_path: str, ready, timeout: float):
    """Start a peer server and wait until it is ready; on any failure (it exited, it never got
    ready, the wait was interrupted) it is stopped, with every process it started, before the
    error propagates."""
    port = free_port()
    log_path = ROOT / "benchmarks" / "results" / f"peer_{system}{'_' + '_'.join(a for a in args if not a.startswith('-')) if args else ''}.log"
    # In this session, not a new one: with the kernel's autogroup scheduling a session is a
    # scheduling group, so a peer in its own session got half the CPU against the whole benchmark
    # (flowkit's client and workers) whenever it was busy. stop() ends its children by walking them.
    with open(log_path, "w") as log:   # the server writes through its own copy of the descriptor
        proc = subprocess.Popen([str(PEERS_PY), str(SERVERS), system, "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=peer_env())
    started: list = []   # what it started, seen while waiting: stopped too if it exits first
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            started = _family(proc.pid, started)
            if proc.poll() is not None:
                raise RuntimeError(f"peer {system} exited with {proc.returncode}; see {log_path}")
            try:
                status, body = _get(port, ready_path)
                if status == 200 and (ready is None or ready(body)):
                    return proc, port
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"peer {system} did not become ready within {timeout:g} s; see {log_path}")
    except BaseException:
        stop(proc, others=started)
        raise


def _family(pid: int, known: list) -> list:
    """``known`` and the processes ``pid`` now has below it (psutil processes, each once)."""
    import psutil

    try:
        return list(dict.fromkeys([*known, *psutil.Process(pid).children(recursive=True)]))
    except psutil.Error:
        return known


def stop(proc, timeout: float = 30.0, others=()) -> None:
    """End a peer server and every process it started (LitServe's workers, Ray's), and
    ``others`` (psutil processes it was seen to start): terminating the server alone left them
    running after the benchmark. Never raises: a caller stopping several servers stops them all."""
    import psutil

    try:
        family = [psutil.Process(proc.pid)]
    except psutil.Error:
        family = []
    family = [p for p in _family(proc.pid, [*family, *others]) if p.is_running()]
    for p in family:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    try:
        proc.wait(timeout)   # reap it
    except subprocess.TimeoutExpired:
        pass


def ray_ready(pipelines, variants=("fused", "graph")) -> callable:
    """Ready when Ray Serve routes every pipeline's variants (/<pipeline>/<variant>)."""
    def check(body: bytes) -> bool:
        routes = json.loads(body)
        return all(f"/{p}/{v}" in routes for p in pipelines for v in variants)
    return check


def answer_row(data: bytes | str) -> dict:
    """The row an HTTP answer carries (``{"rows": [row]}``), without flowkit's ``qid``."""
    out = json.loads(data)["rows"][0]
    out.pop("qid", None)
    return out


def encode_row(row: dict) -> dict:
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in row.items()}


class HTTPSystem:
    """One HTTP endpoint: ``call(row)`` for closed loop, ``send(row, done)`` for open loop."""

    def __init__(self, port: int, path: str, connections: int = 32, timeout: float = 10.0):
        self.port, self.path = port, path
        self.pool: queue.Queue = queue.Queue()
        for _ in range(connections):
            self.pool.put(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
        self.executor = ThreadPoolExecutor(connections)

    def call(self, row: dict) -> dict:
        body = json.dumps({"rows": [encode_row(row)]}).encode()
        conn = self.pool.get()
        try:
            for attempt in (1, 2):   # a server may close an idle keep-alive connection: reconnect once
                try:
                    conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    break
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                    conn.close()
                    if attempt == 2:
                        raise
            if r.status != 200:
                raise RuntimeError(f"{self.path}: HTTP {r.status}: {data[:200]!r}")
            return answer_row(data)
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        finally:
            self.pool.put(conn)

    def send(self, row: dict, done) -> None:
        def go():
            try:
                self.call(row)
                done()
            except Exception:
                pass  # a failed or timed-out request never counts as done
        self.executor.submit(go)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
