"""Device backends behind one interface; the scheduler's code is the same over all three.

- ``CUDABackend``: real torch on a GPU. Concurrent work runs on separate streams taken from a
  capped pool (torch's own pool aliases beyond 32 streams per priority), ordered with
  ``wait_stream`` and protected with ``record_stream``; device time comes from CUDA events;
  settled super-kernel programs replay from CUDA graphs.
- ``CPUBackend``: real torch on the CPU, for correctness (concurrent work runs in threads).
- ``SimBackend``: real torch on the CPU for the numbers, plus a cost model of a GPU
  (``costmodel``) for the device time, so schedules, utilization and charts behave like a
  GPU's on a machine without one.

Every backend builds *stacked programs* for super-kernels: the weights of R same-architecture
models stacked along a new leading dimension (``torch.func.stack_module_state``) and one
``vmap``-ed ``functional_call`` that runs all R as one batched program.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .costmodel import Gemm, kernel_seconds, policy_seconds
from .profiles import PROFILES, DeviceProfile

__all__ = ["Backend", "CPUBackend", "CUDABackend", "SimBackend", "make_backend", "Stacked", "gemm_layers"]


@dataclass
class Stacked:
    """A cached super-kernel program for a set of tenants of one architecture."""

    tenants: tuple
    params: dict
    buffers: dict
    call: Any
    uses: int = 0
    layers: list = field(default_factory=list)
    graphs: dict = field(default_factory=dict)   # CUDA only: (input shape, dtype) -> captured replay


def gemm_layers(module, example) -> list[Gemm]:
    """The GEMM-shaped work of one forward pass (Linear and im2col'd Conv2d), for the cost model."""
    import torch
    from torch import nn

    shapes: list[Gemm] = []

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.Linear):
            rows = x.numel() // x.shape[-1]
            shapes.append(Gemm(rows, mod.out_features, mod.in_features))
        elif isinstance(mod, nn.Conv2d):
            n, _, h, w = out.shape
            k = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            shapes.append(Gemm(n * h * w, mod.out_channels, k))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


class Backend:
    """The interface: solo, stacked and concurrent forwards, plus device facts for the monitor."""

    name = "base"
    device = "cpu"

    def __init__(self):
        import torch

        self.torch = torch
        self.busy_seconds = 0.0           # device-busy time accumulated (for utilization samples)
        self.lock = threading.Lock()

    # -- models -------------------------------------------------------------------------------
    def place(self, module):
        return module.to(self.device).eval()

    def input(self, x):
        return x.to(self.device, non_blocking=True) if hasattr(x, "to") else self.torch.as_tensor(x, device=self.device)

    def forward(self, module, x):
        with self.torch.inference_mode():
            return module(x)

    def stack(self, tenants: tuple, modules: list) -> Stacked:
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state(modules)
        base = copy.deepcopy(modules[0]).to("meta")

        def one(p, b, x):
            return functional_call(base, (p, b), (x,))

        return Stacked(tenants, params, buffers, self.torch.vmap(one, in_dims=(0, 0, 0)))

    def forward_stacked(self, stacked: Stacked, xs):
        """``xs``: [R, B, ...] → [R, B, ...], one batched program over R tenants."""
        with self.torch.inference_mode():
            stacked.uses += 1
            return stacked.call(stacked.params, stacked.buffers, xs)

    def forward_concurrent(self, pairs: list) -> list:
        return [self.forward(m, x) for m, x in pairs]

    def synchronize(self) -> None:
        pass

    # -- facts for the monitor ------------------------------------------------------------------
    def memory(self) -> tuple[float, float]:
        return 0.0, 0.0

    def account(self, seconds: float) -> None:
        with self.lock:
            self.busy_seconds += seconds

    # -- the GEMM micro-benchmark (paper's Table 1) -----------------------------------------------
    def gemm_seconds(self, policy: str, g: Gemm, tenants: int, iters: int = 20) -> float:
        raise NotImplementedError


class CPUBackend(Backend):
    """Real torch on the CPU. Concurrent forwards run in a thread pool (torch releases the GIL)."""

    name = "cpu"
    device = "cpu"

    def __init__(self, threads: int = 4):
        super().__init__()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flowkit-gpu-cpu")

    def forward_concurrent(self, pairs: list) -> list:
        futs = [self.pool.submit(self.forward, m, x) for m, x in pairs]
        return [f.result() for f in futs]

    def gemm_seconds(self, policy: str, g: Gemm, tenants: int, iters: int = 5) -> float:
        torch = self.torch
        dt = torch.bfloat16 if g.dtype == "bf16" else torch.float32
        a = torch.randn(tenants, g.m, g.k, dtype=dt)
        b = torch.randn(tenants, g.k, g.n, dtype=dt)

        def once():
            if policy == "spacetime":
                torch.bmm(a, b)
            elif policy == "space":
                list(self.pool.map(lambda i: torch.mm(a[i], b[i]), range(tenants)))
            else:
                for i in range(tenants):
                    torch.mm(a[i], b[i])

        once()
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        return (time.perf_counter() - t0) / iters


class SimBackend(CPUBackend):
    """CPU numerics with a simulated GPU's timing (``profile``: v100 or h200)."""

    name = "sim"

    def __init__(self, profile: str | DeviceProfile = "h200"):
        super().__init__()
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.name = f"sim:{self.profile.name.lower()}"
        self._layers: dict = {}
        self._weights = 0.0

    def place(self, module):
        module = super().place(module)
        self._weights += sum(p.numel() * p.element_size() for p in module.parameters())
        return module

    def layers(self, module, x) -> list[Gemm]:
        key = (type(module).__name__, tuple(x.shape[1:]))
        if key not in self._layers:
            self._layers[key] = gemm_layers(module, x[:1])
        batch = x.shape[0]
        return [Gemm(g.m * batch, g.n, g.k) for g in self._layers[key]]

    def modeled(self, policy: str, module, x, tenants: int = 1) -> float:
        """Device seconds the simulated GPU would take for this work."""
        layers = self.layers(module, x)
        if policy == "spacetime":
            return sum(self.profile.launch_us * 1e-6 + kernel_seconds(g, tenants, self.profile) for g in layers)
        return sum(policy_seconds(policy, g, tenants, self.profile) for g in layers)

    def memory(self) -> tuple[float, float]:
        return self._weights, self.profile.memory_gib * 2 ** 30

    def gemm_seconds(self, policy: str, g: Gemm, tenants: int, iters: int = 1) -> float:
        return policy_seconds(policy, g, tenants, self.profile)


class CUDABackend(Backend):
    """Real torch on a CUDA device, with a capped pool of distinct streams and CUDA events."""

    name = "cuda"

    def __init__(self, device: int = 0, streams: int = 32):
        super().__init__()
        torch = self.torch
        self.device = f"cuda:{device}"
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(streams)]
        self.graph_failures = 0

    def forward_stacked(self, stacked: Stacked, xs):
        """A super-kernel's program, replayed from a CUDA graph once it has settled.

        A program's first call runs eagerly; after that, each input shape is captured once into
        a CUDA graph with static input and output buffers (after warm-up on a side stream, as
        capture requires), kept with the program (so it goes when the scheduler evicts it).
        Replays copy the input in, launch one graph instead of one launch per kernel, and return
        a copy of the output. The scheduler pads batches to a few bucket sizes, so shapes recur.
        A program that cannot be captured stays eager."""
        key = (tuple(xs.shape), xs.dtype)
        if stacked.uses < 1 or (key in stacked.graphs and stacked.graphs[key] is None):
            return super().forward_stacked(stacked, xs)
        replay = stacked.graphs.get(key)
        if replay is None:
            replay = stacked.graphs[key] = self._capture(stacked, xs)
            if replay is None:
                return super().forward_stacked(stacked, xs)
        stacked.uses += 1
        with replay.lock, self.torch.inference_mode():
            replay.x.copy_(xs, non_blocking=True)
            replay.graph.replay()
            return replay.out.clone()

    def _capture(self, stacked: Stacked, xs):
        torch = self.torch
        try:
            with torch.cuda.device(self.device), torch.inference_mode():   # replays run in inference mode too
                static_x = xs.clone()
                side = torch.cuda.Stream(device=self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        stacked.call(stacked.params, stacked.buffers, static_x)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = stacked.call(stacked.params, stacked.buffers, static_x)
            return _Replay(graph, static_x, out)
        except Exception as e:   # an op that cannot be captured: this program stays eager
            import logging

            self.graph_failures += 1
            logging.getLogger("flowkit.gpu").warning("CUDA graph capture failed, running eagerly: %r", e)
            return None

    def forward_concurrent(self, pairs: list) -> list:
        torch = self.torch
        main = torch.cuda.current_stream(self.device)
        outs = []
        with torch.inference_mode():
            for i, (m, x) in enumerate(pairs):
                s = self.streams[i % len(self.streams)]
                s.wait_stream(main)            # inputs were copied on the main stream
                with torch.cuda.stream(s):
                    out = m(x)
                x.record_stream(s)             # the allocator must not reuse x while s reads it
                outs.append((out, s))
            for out, s in outs:
                main.wait_stream(s)
                out.record_stream(main)
        return [o for o, _ in outs]

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def memory(self) -> tuple[float, float]:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return float(total - free), float(total)

    def gemm_seconds(self, policy: str, g: Gemm, tenants: int, iters: int = 20) -> float:
        torch = self.torch
        dt = torch.bfloat16 if g.dtype == "bf16" else torch.float32
        a = torch.randn(tenants, g.m, g.k, device=self.device, dtype=dt)
        b = torch.randn(tenants, g.k, g.n, device=self.device, dtype=dt)
        c = torch.empty(tenants, g.m, g.n, device=self.device, dtype=dt)
        main = torch.cuda.current_stream(self.device)

        def once():
            if policy == "spacetime":
                torch.bmm(a, b, out=c)
            elif policy == "space":
                for i in range(tenants):
                    s = self.streams[i % len(self.streams)]
                    s.wait_stream(main)
                    with torch.cuda.stream(s):
                        torch.mm(a[i], b[i], out=c[i])
                for s in self.streams[:min(tenants, len(self.streams))]:
                    main.wait_stream(s)
            else:
                for i in range(tenants):
                    torch.mm(a[i], b[i], out=c[i])

        for _ in range(3):
            once()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for _ in range(iters):
            once()
        end.record(main)
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters


@dataclass
class _Replay:
    """A captured CUDA graph and the static buffers it reads and writes."""

    graph: Any
    x: Any
    out: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_backend(spec: str = "auto") -> Backend:
    """``auto`` (CUDA when available, else the simulated H200), ``cuda``, ``cpu``, ``sim:v100``, ``sim:h200``."""
    if spec == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return CUDABackend()
        except ImportError:
            pass
        return SimBackend("h200")
    if spec == "cuda":
        return CUDABackend()
    if spec == "cpu":
        return CPUBackend()
    if spec.startswith("sim"):
        return SimBackend(spec.split(":", 1)[1] if ":" in spec else "h200")
    raise ValueError(f"unknown backend {spec!r}; choose auto, cuda, cpu, sim:v100 or sim:h200")
