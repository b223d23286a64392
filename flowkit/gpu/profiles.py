"""Device profiles for the simulated GPU backend: a few named measurements per device, each cited.

Nothing here is fitted to the paper being checked (arXiv:1901.00041, Table 1). Every constant is
a published specification or a published microbenchmark figure, or is marked *assumed* where no
figure was at hand; ``costmodel.predict_table1`` then *predicts* Table 1 from them and
``costmodel.TABLE1`` holds the paper's figures for the held-out comparison. The constants, what
each means in the model, and where it comes from:

==================  ==============================================================================
``sms``             streaming multiprocessors (spec)
``fp32_tflops``     peak FP32 (non-tensor) rate (spec)
``bf16_tflops``     peak dense 16-bit tensor-core rate (spec; the V100 has FP16, not BF16, tensor
                    cores: its FP16 figure stands in)
``mem_gbs``         achievable DRAM bandwidth (a measured figure where one is cited)
``launch_us``       host cost of one kernel launch issued back to back on a stream (microbenchmark)
``connections``     hardware work queues streams are mapped onto by default; kernels of more
                    streams than this serialize behind each other (CUDA's documented default)
``max_concurrent``  most kernels resident at once (CUDA's documented limit per compute capability)
``sgemm_eff``       fraction of an SM's peak that an SGEMM thread block keeps busy (microbenchmark)
``tile_m/tile_n``   output tile of one thread block of the library's GEMM kernel (profiled kernel
                    names); one block per SM at a time (``ctas_per_sm``)
==================  ==============================================================================

Sources (by title; figures recalled from them are marked so, to re-check against the text):

- [V100-WP] NVIDIA, *NVIDIA Tesla V100 GPU Architecture* (whitepaper WP-08608-001, 2017): GV100 in
  the Tesla V100 SXM2: 80 SMs, 15.7 TFLOP/s FP32, 125 TFLOP/s FP16 tensor, 900 GB/s HBM2, 16 GB.
  (The paper's own text quotes "up to 14 TFLOP/s", the PCIe card's figure; its AWS p3 machines
  carry SXM2 cards.)
- [JIA18] Jia, Maggioni, Staiger, Scarpazza, *Dissecting the NVIDIA Volta GPU Architecture via
  Microbenchmarking* (Citadel technical report, arXiv:1804.06826, 2018): global-memory bandwidth
  measured at about 750 GB/s on a V100 of 900 GB/s nominal (recalled).
- [MARTINEAU18] Martineau, Atkinson, McIntosh-Smith, *Benchmarking the NVIDIA V100 GPU and Tensor
  Cores* (Euro-Par 2018 workshops): cuBLAS SGEMM on large matrices near 14 TFLOP/s of 15.7, about
  0.85-0.9 of peak (recalled; 0.85 used).
- [GRAY19] A. Gray, *Getting Started with CUDA Graphs* (NVIDIA Technical Blog, 2019), on a V100:
  short kernels issued back to back on one stream take about 3.8 µs each including launch overhead
  (9.6 µs with a synchronization after each, 3.4 µs from a graph) (recalled).
- [CUDA-PG] NVIDIA, *CUDA C++ Programming Guide*: environment variable ``CUDA_DEVICE_MAX_CONNECTIONS``
  (default 8 hardware connections, up to 32) and the table of technical specifications per compute
  capability (128 resident grids per device for 7.0 and 9.0).
- [CUBLAS-KERNELS] the names of the kernels cuBLAS launches for FP32 GEMMs on Volta, as recorded in
  public nvprof / Nsight profiles (``volta_sgemm_128x64_nn``, ``_nt``, ``_tn``): a 128x64 output tile
  per thread block.
- [H200-DS] NVIDIA, *NVIDIA H200 Tensor Core GPU* datasheet (2024): 67 TFLOP/s FP32,
  989 TFLOP/s dense BF16 (1,979 with sparsity), 4.8 TB/s HBM3e, 141 GB; [H100-WP] NVIDIA,
  *NVIDIA H100 Tensor Core GPU Architecture* whitepaper (2022): 132 SMs on the SXM5 part, the
  GH100 die the H200 shares.

The H200's launch cost, achievable bandwidth, SGEMM efficiency and tile have no measured figure
here: they are *assumed* equal to the V100's (bandwidth: the V100's measured fraction of nominal),
until the device check in ``benchmarks/gpu_check.sh`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DeviceProfile", "PROFILES"]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    sms: int
    fp32_tflops: float
    bf16_tflops: float
    mem_gbs: float
    memory_gib: float
    launch_us: float
    connections: int = 8
    max_concurrent: int = 128
    sgemm_eff: float = 0.85
    tile_m: int = 128
    tile_n: int = 64
    ctas_per_sm: int = 1
    sources: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def peak(self, dtype: str) -> float:
        return (self.bf16_tflops if dtype == "bf16" else self.fp32_tflops) * 1e12


PROFILES = {
    "v100": DeviceProfile(
        "V100", sms=80, fp32_tflops=15.7, bf16_tflops=125.0, mem_gbs=750.0, memory_gib=16, launch_us=3.8,
        connections=8, max_concurrent=128, sgemm_eff=0.85, tile_m=128, tile_n=64, ctas_per_sm=1,
        sources={"sms": "V100-WP", "fp32_tflops": "V100-WP", "bf16_tflops": "V100-WP (FP16 tensor)",
                 "mem_gbs": "JIA18 (measured)", "memory_gib": "V100-WP", "launch_us": "GRAY19 (measured)",
                 "connections": "CUDA-PG", "max_concurrent": "CUDA-PG", "sgemm_eff": "MARTINEAU18 (measured)",
                 "tile_m": "CUBLAS-KERNELS", "tile_n": "CUBLAS-KERNELS", "ctas_per_sm": "assumed"}),
    "h200": DeviceProfile(
        "H200", sms=132, fp32_tflops=67.0, bf16_tflops=989.0, mem_gbs=4800.0 * 750.0 / 900.0, memory_gib=141,
        launch_us=3.8, connections=8, max_concurrent=128, sgemm_eff=0.85, tile_m=128, tile_n=64, ctas_per_sm=1,
        sources={"sms": "H100-WP", "fp32_tflops": "H200-DS", "bf16_tflops": "H200-DS (dense)",
                 "mem_gbs": "H200-DS x the V100's measured fraction (assumed)", "memory_gib": "H200-DS",
                 "launch_us": "assumed (V100's)", "connections": "CUDA-PG", "max_concurrent": "CUDA-PG",
                 "sgemm_eff": "assumed (V100's)", "tile_m": "assumed (V100's)", "tile_n": "assumed (V100's)",
                 "ctas_per_sm": "assumed"}),
}
