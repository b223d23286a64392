"""Device profiles for the simulated GPU backend (numbers a cost model needs, nothing more).

The V100 constants are calibrated so that the simulated SGEMM benchmark reproduces the paper's
ordering and rough ratios (arXiv:1901.00041, Table 1 / Fig. 7: time-only ≈ 480 GFLOP/s,
space-only plateau ≈ 1300, space-time up to ≈ 5600 with a sawtooth every 20 problems for the
conv2_2 GEMM). Fitted by a grid search: the model gives 3.15x space-only and 8.2x time-only
(paper: 3.23x and 7.73x) for the conv GEMM and 4.67x space-only for 256^3 (paper: 4.93x); the
mat-vec constants (``gemv_us``, ``gemv_bandwidth``) then give the RNN mat-vec 2.2x time-only
with time-only the next best (paper: 2.48x, time-only next best). The H200 constants scale the
same model by its published peaks (132 SMs,
66.9 TFLOP/s FP32, 989 TFLOP/s dense BF16, 4.8 TB/s); recalibrate them from a device run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceProfile", "PROFILES"]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    sms: int
    blocks_per_sm: int          # resident CTAs per SM for a 64x64 SGEMM tile
    fp32_tflops: float
    bf16_tflops: float
    mem_gbs: float
    memory_gib: float
    launch_us: float            # host-side cost of one kernel launch
    switch_us: float            # time multiplexing: cost of switching tenants (contexts)
    fixed_us: float             # per-kernel device-side setup (prologue, tail effects)
    efficiency: float           # fraction of peak a full wave of SGEMM tiles reaches
    max_concurrent: int         # kernels that can run at once (hardware queues)
    stream_penalty: float       # space multiplexing: slowdown of concurrent small kernels (scheduling, interference)
    gemv_us: float = 10.0       # device time of a mat-vec kernel besides reading its operands
    gemv_bandwidth: float = 0.5 # fraction of memory bandwidth a mat-vec kernel reaches
    tile: int = 64

    def peak(self, dtype: str) -> float:
        return (self.bf16_tflops if dtype == "bf16" else self.fp32_tflops) * 1e12


PROFILES = {
    "v100": DeviceProfile("V100", sms=80, blocks_per_sm=2, fp32_tflops=14.0, bf16_tflops=112.0, mem_gbs=900.0,
                          memory_gib=16, launch_us=4.0, switch_us=20.0, fixed_us=80.0, efficiency=0.42,
                          max_concurrent=32, stream_penalty=4.5),
    "h200": DeviceProfile("H200", sms=132, blocks_per_sm=2, fp32_tflops=66.9, bf16_tflops=989.0, mem_gbs=4800.0,
                          memory_gib=141, launch_us=3.0, switch_us=15.0, fixed_us=30.0, efficiency=0.5,
                          max_concurrent=128, stream_penalty=4.0, gemv_us=5.0),
}
