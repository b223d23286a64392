"""The simulated GPU's own clock (``SimBackend``): device time, not host time."""

from __future__ import annotations

import time

__all__ = ["DeviceClock"]


class DeviceClock:
    """A simulated device's own clock, in seconds from its start.

    It runs on the host's clock (``wall``, injectable) only while the device waits for work;
    each launch advances it by the launch's modeled device time (``run``), however long the host
    took to emulate it. So host overhead (the CPU computing the numbers, a loaded machine) never
    shows as the modeled device's idle time, and a device flooded with work is busy all along."""

    def __init__(self, wall=time.monotonic):
        self.wall = wall
        self.elapsed = 0.0                 # busy and idle seconds up to ``idle_since`` (or now, while working)
        self.idle_since: float | None = wall()   # host time the device began waiting; None while it works

    def now(self) -> float:
        idle = 0.0 if self.idle_since is None else max(0.0, self.wall() - self.idle_since)
        return self.elapsed + idle

    @property
    def idle(self) -> bool:
        return self.idle_since is not None

    def wait(self) -> None:
        if self.idle_since is None:
            self.idle_since = self.wall()

    def work(self) -> None:
        if self.idle_since is not None:
            self.elapsed += max(0.0, self.wall() - self.idle_since)
            self.idle_since = None

    def run(self, seconds: float) -> None:
        self.work()
        self.elapsed += seconds
