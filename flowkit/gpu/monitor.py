"""Device samples for the live chart: NVML on a real GPU (nvidia-ml-py, imported as ``pynvml``),
the backend's own accounting otherwise. No GPU never means a crash: NVML errors give no sample."""

from __future__ import annotations

__all__ = ["device_sample", "nvml_available"]

_nvml = None
_nvml_failed = False


def _handle():
    global _nvml, _nvml_failed
    if _nvml is not None or _nvml_failed:
        return _nvml
    try:
        import pynvml

        pynvml.nvmlInit()
        _nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:  # no library, no driver, no permission: fall back to the backend's figures
        _nvml_failed = True
    return _nvml


def nvml_available() -> bool:
    return _handle() is not None


def device_sample(backend) -> dict | None:
    """NVML utilization and memory of device 0 when the backend is a real GPU; else None."""
    if not backend.name.startswith("cuda"):
        return None
    h = _handle()
    if h is None:
        return None
    pynvml, dev = h
    try:
        util = pynvml.nvmlDeviceGetUtilizationRates(dev)
        mem = pynvml.nvmlDeviceGetMemoryInfo(dev)
        return {"nvml_utilization": float(util.gpu), "memory_used": float(mem.used), "memory_total": float(mem.total)}
    except Exception:
        return None
