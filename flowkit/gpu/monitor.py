"""Device samples for the live chart: NVML on a real GPU (nvidia-ml-py, imported as ``pynvml``),
the backend's own accounting otherwise. No GPU never means a crash: NVML errors give no sample.

On GPUs with GPM (Hopper and later) each sample also carries the share of SMs that were busy and
the share of warp slots occupied since the previous sample — what NVML's "utilization" (a kernel
was running) hides when small kernels leave most SMs idle."""

from __future__ import annotations

__all__ = ["device_sample", "nvml_available", "nvml_handle", "GpmSampler"]

_nvml = None            # the pynvml module once initialized
_nvml_failed = False
_handles: dict = {}     # device key -> NVML handle
_gpm: dict = {}         # device key -> GpmSampler, or False where the device has none


def _pynvml():
    global _nvml, _nvml_failed
    if _nvml is not None or _nvml_failed:
        return _nvml
    try:
        import pynvml

        pynvml.nvmlInit()
        _nvml = pynvml
    except Exception:  # no library, no driver, no permission: fall back to the backend's figures
        _nvml_failed = True
    return _nvml


def nvml_handle(device=0):
    """``(pynvml, handle)`` of ``device``, or None where NVML cannot be used. ``device``: an NVML
    index, or ``("uuid", "GPU-...")`` (what ``CUDABackend.nvml_device()`` gives: torch's and
    NVML's indices differ under ``CUDA_VISIBLE_DEVICES``)."""
    nvml = _pynvml()
    if nvml is None:
        return None
    if device not in _handles:
        try:
            if isinstance(device, tuple):
                _handles[device] = nvml.nvmlDeviceGetHandleByUUID(device[1])
            else:
                _handles[device] = nvml.nvmlDeviceGetHandleByIndex(device)
        except Exception:
            return None
    return nvml, _handles[device]


def nvml_available() -> bool:
    return nvml_handle() is not None


class GpmSampler:
    """SM utilization and occupancy between consecutive reads, from NVML's GPU performance metrics.

    Keeps two GPM samples and alternates them: each ``read()`` takes a new one and asks NVML for
    the metrics between it and the previous. Raises ``RuntimeError`` if the device has no GPM."""

    METRICS = {"sm_utilization": "NVML_GPM_METRIC_SM_UTIL", "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY"}

    def __init__(self, nvml, device):
        if not nvml.nvmlGpmQueryDeviceSupport(device).isSupportedDevice:
            raise RuntimeError("this GPU has no GPM metrics")
        self.nvml, self.device = nvml, device
        self.previous, self.spare = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
        nvml.nvmlGpmSampleGet(device, self.previous)

    def read(self) -> dict:
        nvml = self.nvml
        current = nvml.nvmlGpmSampleGet(self.device, self.spare)
        query = nvml.c_nvmlGpmMetricsGet_t()
        query.version = nvml.NVML_GPM_METRICS_GET_VERSION
        query.numMetrics = len(self.METRICS)
        query.sample1, query.sample2 = self.previous, current
        for i, name in enumerate(self.METRICS.values()):
            query.metrics[i].metricId = getattr(nvml, name)
        nvml.nvmlGpmMetricsGet(query)
        self.previous, self.spare = current, self.previous
        return {key: float(query.metrics[i].value) for i, key in enumerate(self.METRICS)
                if query.metrics[i].nvmlReturn == nvml.NVML_SUCCESS}


def _gpm_sampler(device):
    if device not in _gpm:
        pynvml, dev = nvml_handle(device)
        try:
            _gpm[device] = GpmSampler(pynvml, dev)
        except Exception:   # no GPM here (older GPU, a sandbox, an old driver): NVML figures only
            _gpm[device] = False
    return _gpm[device] or None


def device_sample(backend) -> dict | None:
    """NVML utilization and memory of the backend's own device (and GPM's SM figures where the
    GPU has them) when the backend is a real GPU; else None."""
    if not backend.name.startswith("cuda"):
        return None
    device = backend.nvml_device()
    h = nvml_handle(device)
    if h is None:
        return None
    pynvml, dev = h
    try:
        util = pynvml.nvmlDeviceGetUtilizationRates(dev)
        mem = pynvml.nvmlDeviceGetMemoryInfo(dev)
        sample = {"nvml_utilization": float(util.gpu), "memory_used": float(mem.used), "memory_total": float(mem.total)}
    except Exception:
        return None
    gpm = _gpm_sampler(device)
    if gpm is not None:
        try:
            sample.update(gpm.read())
        except Exception:
            pass
    return sample
