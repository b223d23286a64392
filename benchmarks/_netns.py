"""Benchmarks over a network link of a given rate instead of loopback's memory copy.

On one machine every worker talks over loopback, where moving 4 MB is a ~1 ms memory copy;
Cloudflow's locality experiment moved objects over a datacenter network. ``on_shaped_link``
re-runs the current command inside a fresh network namespace whose loopback a token bucket
(``tc qdisc tbf``) limits to ``rate`` (``10gbit``, ``1gbit``, ...): client, scheduler and workers
then share one link of that rate. Needs root and iproute2; the namespace is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

__all__ = ["on_shaped_link", "LINK_ENV"]

LINK_ENV = "FLOWKIT_BENCH_LINK"
NAMESPACE = "flowkit-bench"


def on_shaped_link(rate: str) -> int:
    """Run ``sys.argv`` again inside a namespace whose loopback carries at most ``rate``;
    returns its exit status. Inside, ``os.environ[LINK_ENV] == rate``."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        raise SystemExit("--link needs root and iproute2 (ip, tc) to shape a network namespace's loopback")

    def ns(*cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", NAMESPACE, *cmd], check=True)

    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    try:
        ns("ip", "link", "set", "lo", "up")
        ns("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms")
        env = {**os.environ, LINK_ENV: rate}
        return subprocess.call(["ip", "netns", "exec", NAMESPACE, sys.executable, *sys.argv], env=env)
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)
