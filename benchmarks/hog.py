"""Run a command under a CPU hog: one busy process per core beside it, the whole time.

    python benchmarks/hog.py -- python3 tasks.py test              # the suite, 3 times in a row
    python benchmarks/hog.py --runs 1 -- .venv/bin/python -m pytest -q tests/test_table.py
    python benchmarks/hog.py --procs 4 --runs 5 -- <command> [args...]
    python benchmarks/hog.py --nice 19 --runs 1 -- <benchmark>   # the cores kept from idling
    python benchmarks/hog.py --procs 0 --cpu-latency-us 0 --runs 1 -- <benchmark>   # ... by the kernel

The proof that the test suite "passes on any machine": a test that asserts a wall-clock bound, a
CPU-time share or a utilization figure, or that sleeps instead of waiting for a condition, fails
under the hog sooner or later. The hog starts ``--procs`` processes (default: one per core) that
spin (at normal priority, or at ``--nice``), runs the command ``--runs`` times (default 3) one
after another, each to its end, then stops the hog, whatever happened (a failed run, Ctrl-C,
SIGTERM; a hog process also ends by itself if this script dies, as it checks its parent). Prints
one line per run and a summary; the exit status is 0 only if every run exited with 0, else that
of the first failed run.

For benchmarks: ``--nice 19`` hogs take only CPU time nothing else wants, which keeps the cores
from idling; ``--cpu-latency-us 0`` (root) has the kernel keep them polling instead (PM QoS).
Either way the summary says how often the cores entered each idle state while the command ran
(Linux's ``cpuidle`` counts), and ``--save NAME`` writes that to ``benchmarks/results/NAME``.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import time

# Spins until its parent (this script) is gone: a hog never outlives the run it loads.
SPIN = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(200_000):
        pass
"""


def idle_state_entries() -> dict[str, int]:
    """How often this machine's cores have entered each idle state, summed over the cores, by the
    state's name (Linux's ``cpuidle``; empty where there is none)."""
    out: dict[str, int] = {}
    for state in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpuidle/state[0-9]*"):
        try:
            with open(f"{state}/name") as n, open(f"{state}/usage") as u:
                name, usage = n.read().strip(), int(u.read())
        except OSError:
            continue
        out[name] = out.get(name, 0) + usage
    return out


def start_hog(procs: int, nice: int = 0) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                             preexec_fn=(lambda: os.nice(nice)) if nice else None) for _ in range(procs)]


def hold_cpu_latency(us: int):
    """Ask the kernel (PM QoS, ``/dev/cpu_dma_latency``: needs root) to keep every core in idle
    states it can leave within ``us`` microseconds, until the returned file is closed; 0 keeps
    them polling instead of halting, as the latency-performance profile of ``tuned`` does."""
    import struct

    f = open("/dev/cpu_dma_latency", "wb", buffering=0)
    f.write(struct.pack("i", us))
    return f


def stop_hog(hog: list[subprocess.Popen]) -> None:
    for p in hog:
        if p.poll() is None:
            p.terminate()
    for p in hog:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        print("hog.py: give the command after --", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="hog.py", description="Run a command under a CPU hog.")
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per core)")
    ap.add_argument("--runs", type=int, default=3, help="how many times to run the command (default 3)")
    ap.add_argument("--nice", type=int, default=0,
                    help="the busy processes' niceness (19: they take only CPU time nothing else wants, which "
                         "keeps the cores from idling: how much a measurement pays for waking idle cores)")
    ap.add_argument("--cpu-latency-us", type=int, default=None,
                    help="also hold the cores' wake-up latency at most this (PM QoS; root only; 0: poll, never halt)")
    ap.add_argument("--save", metavar="NAME",
                    help="write the runs, the hog and the idle-state counts to benchmarks/results/NAME.json and .md")
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command or args.runs < 1 or args.procs < 0:
        ap.error("give a command after --, --runs >= 1 and --procs >= 0")

    def stopped(signum, frame):   # SIGTERM: end like Ctrl-C, so the hog is stopped below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    idle_before, t_start = idle_state_entries(), time.monotonic()
    qos = None if args.cpu_latency_us is None else hold_cpu_latency(args.cpu_latency_us)
    hog = start_hog(args.procs, args.nice)
    codes: list[int] = []
    print(f"hog: {args.procs} busy process(es) (nice {args.nice}) on {os.cpu_count()} core(s); running {' '.join(command)!r} "
          f"{args.runs} time(s)", flush=True)
    try:
        for run in range(1, args.runs + 1):
            t0 = time.monotonic()
            code = subprocess.call(command)
            codes.append(code)
            print(f"hog: run {run}/{args.runs}: exit status {code} after {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("hog: interrupted", flush=True)
        codes.append(130)
    finally:
        stop_hog(hog)
        if qos is not None:
            qos.close()
    passed = sum(c == 0 for c in codes)
    idle = {k: v - idle_before.get(k, 0) for k, v in idle_state_entries().items()}
    seconds = time.monotonic() - t_start
    print(f"hog: {passed} of {args.runs} run(s) passed under the hog; idle-state entries over {seconds:.0f} s: "
          + (", ".join(f"{k} {v}" for k, v in idle.items()) or "not counted here"), flush=True)
    if args.save:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _report import save

        record = {"command": command, "procs": args.procs, "nice": args.nice, "cpu_latency_us": args.cpu_latency_us,
                  "exit_codes": codes, "seconds": seconds, "idle_state_entries": idle}
        save(args.save, record, "\n".join(f"- {k}: {v}" for k, v in record.items()))
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
