"""GPU workers: the space-time scheduler, its device backends, and the dask plugin.

    from flowkit.gpu import GPUPlugin
    client.register_plugin(GPUPlugin(policy="spacetime", backend="auto"))

Policies: ``time``, ``batch``, ``space``, ``spacetime`` (see ``scheduler.py``). Backends:
``cuda``, ``cpu``, ``sim:v100``, ``sim:h200`` and ``auto`` (see ``backends.py``).
"""

from .backends import CPUBackend, CUDABackend, SimBackend, make_backend
from .costmodel import Gemm, gflops, policy_seconds
from .model import TorchModel
from .profiles import PROFILES, DeviceProfile
from .policy import POLICIES, plan_launch
from .scheduler import SpaceTimeScheduler

__all__ = ["GPUPlugin", "GPU_TOPIC", "SpaceTimeScheduler", "plan_launch", "POLICIES", "TorchModel", "make_backend",
           "CPUBackend", "CUDABackend", "SimBackend", "PROFILES", "DeviceProfile", "Gemm", "gflops", "policy_seconds"]


def __getattr__(name):
    # The dask plugin loads on first use: the scheduler and backends also run where dask is not
    # installed (a bare GPU machine).
    if name in ("GPUPlugin", "GPU_TOPIC"):
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'flowkit.gpu' has no attribute {name!r}")
