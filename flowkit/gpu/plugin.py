"""``GPUPlugin``: gives each dask worker a space-time scheduler and publishes its samples.

    client.register_plugin(GPUPlugin(policy="spacetime", backend="auto"))

``backend="auto"`` uses CUDA when the worker has a GPU and the simulated H200 otherwise, so no
GPU never means a crash. The plugin declares the worker's ``GPU`` resource (1 while it runs, 0
after it is removed): the runtime places ``gpu=True`` maps on workers that have one. A monitor samples the device a few times a second (NVML on a GPU, the
simulated backend's own figures otherwise) and publishes each sample as a worker event on the
topic ``flowkit-gpu``, which the notebook's live chart subscribes to.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from .backends import check_backend, make_backend
from .policy import POLICIES
from .scheduler import SpaceTimeScheduler, install

__all__ = ["GPUPlugin", "GPU_TOPIC"]

GPU_TOPIC = "flowkit-gpu"


class GPUPlugin(WorkerPlugin):
    """Registering it again (another policy, a fixed typo) replaces each worker's scheduler: dask
    tears the old one down (its queued requests fail) and sets the new one up."""

    idempotent = False
    name = "flowkit-gpu"

    def __init__(self, policy: str = "spacetime", backend: str = "auto", max_batch: int = 32,
                 max_wait_ms: float = 2.0, sample_hz: float = 4.0):
        if policy not in POLICIES:   # checked here, in the notebook, not later on each worker
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        check_backend(backend)
        if max_batch < 1 or max_wait_ms < 0 or sample_hz <= 0:
            raise ValueError(f"GPUPlugin needs max_batch >= 1, max_wait_ms >= 0 and sample_hz > 0; "
                             f"got {max_batch}, {max_wait_ms}, {sample_hz}")
        self.policy = policy
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.sample_hz = sample_hz

    async def setup(self, worker) -> None:
        from tornado.ioloop import PeriodicCallback

        from ..runtime.compat import set_worker_resources

        sched = SpaceTimeScheduler(make_backend(self.backend), self.policy, self.max_batch, self.max_wait_ms)
        install(sched)
        worker._flowkit_gpu = sched
        # The worker now serves gpu=True maps: declare its GPU resource, which is how the runtime
        # sends GPU stages to it (and keeps them off workers without the plugin).
        await set_worker_resources(worker, GPU=1)

        def publish():
            try:
                worker.log_event(GPU_TOPIC, {"worker": worker.address, **sched.sample()})
            except Exception:
                pass

        self._callback = PeriodicCallback(publish, 1000.0 / self.sample_hz)
        self._callback.start()

    async def teardown(self, worker) -> None:
        from ..runtime.compat import set_worker_resources

        cb = getattr(self, "_callback", None)
        if cb is not None:
            cb.stop()
        sched = getattr(worker, "_flowkit_gpu", None)
        if sched is not None:
            worker._flowkit_gpu = None
            sched.close()
            install(None)
        try:   # no scheduler here any more: no GPU stages either
            await set_worker_resources(worker, GPU=0)
        except Exception:   # the worker is closing, its scheduler gone: nothing left to tell
            pass
