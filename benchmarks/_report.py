"""Shared helpers for benchmarks: timing, percentiles, and writing table + JSON (+ PNG) results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

from flowkit.runtime.stats import percentile  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def summarize(seconds) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan")}


def time_calls(fn, n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats shown with 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


PACKAGES = ("torch", "numpy", "dask", "distributed", "uvicorn", "starlette", "fastapi", "ray", "litserve",
            "nvidia-pytriton", "bentoml", "torchserve")


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions(site: Path | None = None) -> dict:
    """Installed versions of the serving packages that matter here: this environment's, or those of
    another environment's site-packages (the peers' venv), read from its dist-info folders."""
    import importlib.metadata as md

    found = {}
    if site is None:
        for name in PACKAGES:
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
        return found
    for dist in md.distributions(path=[str(site)]):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in PACKAGES:
            found[name] = dist.version
    return found


def python_loop_ms() -> float:
    """This machine's speed now: the milliseconds one million additions take in a Python loop
    (the fastest of 3). The same CPU model has been seen here at several times the usual figure
    (a shared host): results taken on different days compare only through it."""
    best = float("inf")
    for _ in range(3):
        t0, s = time.perf_counter(), 0
        for i in range(1_000_000):
            s += i
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def machine() -> dict:
    """What the run ran on: CPU model, count and speed now (``python_loop_ms``), memory, OS, Python."""
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "os": platform.platform(terse=True), "python_loop_ms": python_loop_ms()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


def metadata(config: dict | None = None) -> dict:
    """The record every result carries: date, commit (and whether the tree had changes), the
    command, configuration, package versions here and in the peers' venv (where there is one),
    and the machine."""
    import sys

    peers_site = sorted((ROOT / ".venv-peers" / "lib").glob("python*/site-packages"))
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "flowkit", "benchmarks")),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
            "config": config or {}, "versions": _versions(),
            "peer_versions": _versions(peers_site[0]) if peers_site else {}}
    meta.update(machine())
    return meta


def save(name: str, payload: dict, markdown: str, config: dict | None = None) -> Path:
    """Write ``results/<name>.json`` and ``.md`` with the run's record (``metadata``: date, commit,
    versions, ``config``, machine); returns the JSON path. ``benchmarks/report.py`` turns the JSON
    into the docs' tables."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = metadata(config if config is not None else payload.get("config"))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, **payload}, indent=2, default=str))
    short = {k: meta[k] for k in ("date", "commit", "dirty", "cpu_model", "cpus", "python_loop_ms", "python") if k in meta}
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{short}\n\n{markdown}\n")
    return path


def open_loop(send, rate: float, seconds: float, seed: int = 0, timeout: float = 10.0, target_ms: float = 50.0) -> dict:
    """Poisson arrivals at ``rate``/s for ``seconds``. ``send(done)`` starts one request and
    calls ``done()`` from any thread when it finishes. Latency counts from each request's
    *scheduled* send time, so a backlog is not hidden (no coordinated omission)."""
    import random
    import threading

    rng = random.Random(seed)
    n = max(1, int(rate * seconds))
    schedule, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        schedule.append(t)
    latencies = [None] * n
    remaining = threading.Semaphore(0)
    start = time.perf_counter()
    errors = 0
    for i, at in enumerate(schedule):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

        def done(i=i, at=at):
            latencies[i] = time.perf_counter() - (start + at)
            remaining.release()

        try:
            send(done)
        except Exception:
            errors += 1
            remaining.release()
    deadline = time.perf_counter() + timeout
    for _ in range(n):
        if not remaining.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            break
    got = [x for x in latencies if x is not None]
    ms = [x * 1000 for x in got]
    return {"rate": rate, "sent": n, "completed": len(got), "errors": errors, "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99) if len(got) == n else float("inf"),
            "within_50ms": sum(1 for x in ms if x <= 50) / n,
            "within_target": sum(1 for x in ms if x <= target_ms) / n,
            "goodput": sum(1 for x in ms if x <= target_ms) / seconds}


def plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
    """A line plot of ``{label: (xs, ys)}`` saved as PNG (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
