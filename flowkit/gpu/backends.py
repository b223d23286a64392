"""Device backends behind one interface; the scheduler's code is the same over all three.

- ``CUDABackend``: real torch on a GPU. Concurrent work runs on separate streams taken from a
  capped pool (torch's own pool aliases beyond 32 streams per priority), ordered with
  ``wait_stream`` and protected with ``record_stream``; device time comes from CUDA events;
  settled super-kernel programs replay from CUDA graphs.
- ``CPUBackend``: real torch on the CPU, for correctness (concurrent work runs in threads).
- ``SimBackend``: real torch on the CPU for the numbers, plus a cost model of a GPU
  (``costmodel``) for the device time, so schedules, utilization and charts behave like a
  GPU's on a machine without one.

Every backend builds *stacked programs* for super-kernels (``stacking``): the weights of R
same-architecture models stacked once, when the program is built, along a new leading dimension,
and one batched program over all R (``vmap`` over ``functional_call``; explicit batched GEMMs
per timestep for recurrent models). A launch runs every slot of its program; the scheduler gives
the slots of tenants with nothing queued zero rows and keeps few programs per group.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .clock import DeviceClock
from .costmodel import Gemm, LayerCosts, kernel_seconds, policy_seconds, sm_seconds
from .profiles import PROFILES, DeviceProfile

__all__ = ["Backend", "CPUBackend", "CUDABackend", "SimBackend", "DeviceClock", "make_backend", "check_backend",
           "BACKENDS", "Stacked", "power_of_two", "tensors_map"]


def tensors_map(fn, out):
    """``fn`` applied to every tensor of a model's output (a tensor, or tuples, lists and dicts of
    them, as recurrent and attention modules return), in the same structure; None and other
    values are kept.

    >>> import torch
    >>> tensors_map(lambda t: t * 2, (torch.ones(1), [torch.zeros(1), None], {"k": torch.ones(1)}))
    (tensor([2.]), [tensor([0.]), None], {'k': tensor([2.])})
    """
    import torch

    if isinstance(out, tuple) and hasattr(out, "_fields"):   # a named tuple
        return type(out)(*(tensors_map(fn, o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(tensors_map(fn, o) for o in out)
    if isinstance(out, dict):
        return {k: tensors_map(fn, v) for k, v in out.items()}
    return fn(out) if isinstance(out, torch.Tensor) else out


def power_of_two(n: int) -> int:
    """The bucket ``n`` is padded to where shapes must recur (CUDA graphs): the next power of two.

    >>> [power_of_two(n) for n in (1, 2, 3, 5, 32, 33)]
    [1, 2, 4, 8, 32, 64]
    """
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Stacked:
    """A cached super-kernel program over some tenants of one architecture group (in slot order),
    with its own stacked copy of their weights, built once.

    ``call(params, buffers, xs)`` runs slot ``i``'s weights on ``xs[i]`` for every slot."""

    tenants: tuple
    params: dict
    buffers: dict
    call: Any
    uses: int = 0
    graphs: dict = field(default_factory=dict)   # CUDA only: (input shape, dtype) -> captured replay

    @property
    def width(self) -> int:
        """Its number of slots: the copies of weights it holds (one per tenant)."""
        return len(self.tenants)


class Backend:
    """The interface: solo, stacked and concurrent forwards, plus device facts for the monitor."""

    name = "base"
    device = "cpu"

    def __init__(self):
        import torch

        self.torch = torch
        self.busy_seconds = 0.0           # device-busy time accumulated (for utilization samples)
        self.sm_busy_seconds = None       # SM-seconds of work, where the backend knows it (simulated)
        self.lock = threading.RLock()   # reentrant: a simulated device advances its clock inside account()

    # -- models -------------------------------------------------------------------------------
    def place(self, module):
        return module.to(self.device).eval()

    def input(self, x):
        return x.to(self.device, non_blocking=True) if hasattr(x, "to") else self.torch.as_tensor(x, device=self.device)

    def forward(self, module, x):
        with self.torch.inference_mode():
            return module(x)

    def bucket(self, n: int) -> int:
        """How many rows (or tenant slots) a stacked launch of ``n`` is padded to: none here."""
        return n

    def stack(self, tenants: tuple, modules: list) -> Stacked:
        """A super-kernel program over ``modules`` (placed on this device), its weights stacked now."""
        from .stacking import stack_modules

        params, buffers, call = stack_modules(modules)
        return Stacked(tenants, params, buffers, call)

    def forward_stacked(self, stacked: Stacked, xs):
        """``xs``: [S, B, ...] → [S, B, ...] (each tensor of a tuple output so), one batched
        program: ``xs[i]`` through slot ``i``'s weights, for each of the program's S slots."""
        with self.torch.inference_mode():
            stacked.uses += 1
            return stacked.call(stacked.params, stacked.buffers, xs)

    def forward_concurrent(self, pairs: list) -> list:
        """Forwards of different models at once; their outputs are ready once ``synchronize()``d."""
        return [self.forward(m, x) for m, x in pairs]

    def synchronize(self) -> None:
        pass

    # -- facts for the monitor ------------------------------------------------------------------
    def memory(self) -> tuple[float, float]:
        return 0.0, 0.0

    def account(self, seconds: float, sm_seconds: float | None = None) -> None:
        with self.lock:
            self.busy_seconds += seconds
            if sm_seconds is not None:
                self.sm_busy_seconds = (self.sm_busy_seconds or 0.0) + sm_seconds

    def now(self) -> float:
        """The clock the monitor's samples are on: the host's, for a real device."""
        return time.monotonic()

    def reading(self) -> tuple[float, float, float | None]:
        """``(now(), busy_seconds, sm_busy_seconds)`` read together."""
        with self.lock:
            return self.now(), self.busy_seconds, self.sm_busy_seconds

    def waiting(self) -> None:
        """The scheduler has nothing to launch from now on (a simulated device's clock idles)."""

    def working(self) -> None:
        """The scheduler has work for the device again."""

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
    """CPU numerics with a simulated GPU's timing (``profile``: v100 or h200), on the simulated
    device's own clock (``DeviceClock``; ``wall``: the host clock it idles on, injectable)."""

    name = "sim"

    def __init__(self, profile: str | DeviceProfile = "h200", wall=time.monotonic):
        super().__init__()
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.name = f"sim:{self.profile.name.lower()}"
        self._layers = LayerCosts()   # (keyed by the module's structure and the whole input's shape)
        self._weights = 0.0
        self.clock = DeviceClock(wall)

    def account(self, seconds: float, sm_seconds: float | None = None) -> None:
        with self.lock:   # one step: a sample never sees the busy time without the clock's advance
            self.clock.run(seconds)
            super().account(seconds, sm_seconds)

    def now(self) -> float:
        with self.lock:
            return self.clock.now()

    def waiting(self) -> None:
        with self.lock:
            self.clock.wait()

    def working(self) -> None:
        with self.lock:
            self.clock.work()

    def place(self, module):
        module = super().place(module)
        self._weights += sum(p.numel() * p.element_size() for p in module.parameters())
        return module

    def layers(self, module, x) -> list[Gemm]:
        """The GEMM-shaped work of ``module`` over ``x`` (traced once per architecture and shape)."""
        return self._layers(module, x)

    def modeled(self, policy: str, module, x, tenants: int = 1) -> tuple[float, float]:
        """Device seconds the simulated GPU would take for this work, and its SM-seconds."""
        layers, p = self.layers(module, x), self.profile
        if policy == "spacetime":
            secs = sum(p.launch_us * 1e-6 + kernel_seconds(g, tenants, p) for g in layers)
        else:
            secs = sum(policy_seconds(policy, g, tenants, p) for g in layers)
        return secs, sum(sm_seconds(g, tenants, p) for g in layers)

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
        self.index = device
        self.device = f"cuda:{device}"
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(streams)]
        self.graph_failures = 0
        # One memory pool for every captured graph (torch's "sharing memory across captures"),
        # not a private pool per capture. Safe here: a graph's static output stays alive with it
        # (so no later capture reuses that memory), replays are copied out at once, and every
        # replay runs from the one dispatcher thread on the current stream, never two at once.
        # Captures also share one stream: torch's docs ask, for effective sharing of a pool, that a
        # capture pass the same ``stream`` as the previous capture into that pool did.
        with torch.cuda.device(self.device):
            self.graph_pool = torch.cuda.graph_pool_handle()
            self.capture_stream = torch.cuda.Stream(device=self.device)

    bucket = staticmethod(power_of_two)   # stacked launches recur in few shapes, so their graphs do

    def forward_stacked(self, stacked: Stacked, xs):
        """A super-kernel's program, replayed from a CUDA graph once it has settled.

        A program's first call runs eagerly; after that, each input shape is captured once into a
        CUDA graph with static input and output buffers (after warm-up on a side stream, as
        capture requires), in the backend's one graph memory pool, kept with the program (so it
        goes when the scheduler evicts it). Replays copy the inputs in, launch one graph instead
        of one launch per kernel, and return a copy of the output (each tensor of a tuple). The
        scheduler pads rows and slots to powers of two (``bucket``), so shapes recur. A program
        that cannot be captured stays eager."""
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
            return tensors_map(lambda t: t.clone(), replay.out)

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
                # thread_local: other threads (callers reading their outputs, the monitor) keep
                # using the device during a capture; in torch's default mode their calls would
                # fail and invalidate the capture.
                with torch.cuda.graph(graph, pool=self.graph_pool, stream=self.capture_stream,
                                      capture_error_mode="thread_local"):
                    out = stacked.call(stacked.params, stacked.buffers, static_x)
            return _Replay(graph, static_x, out)
        except Exception as e:   # an op that cannot be captured: this program stays eager
            import logging

            self.graph_failures += 1
            logging.getLogger("flowkit.gpu").warning("CUDA graph capture failed, running eagerly: %r", e)
            return None

    def forward_concurrent(self, pairs: list) -> list:
        """Each forward on its own stream of the pool; returns at once (launches are asynchronous),
        so work queued next on the main stream (a super-kernel) runs beside them until
        ``synchronize()``."""
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
                # nor out's memory (each tensor of a tuple output) while the main stream reads it later
                tensors_map(lambda t: t.record_stream(main), out)
                outs.append(out)
        return outs

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def nvml_device(self):
        """This device for NVML: its UUID where torch tells it (NVML's indices ignore
        ``CUDA_VISIBLE_DEVICES``, torch's do not), else its index."""
        try:
            uuid = str(self.torch.cuda.get_device_properties(self.index).uuid)
            return ("uuid", uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            return self.index

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
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record(main)
        for e in events[1:]:
            once()
            e.record(main)
        events[-1].synchronize()
        rounds = sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))
        return rounds[len(rounds) // 2] / 1000   # the median round, in seconds


@dataclass
class _Replay:
    """A captured CUDA graph and the static buffers it reads and writes."""

    graph: Any
    x: Any
    out: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


BACKENDS = ("auto", "cuda", "cpu") + tuple(f"sim:{name}" for name in PROFILES)


def check_backend(spec: str) -> None:
    """A ValueError unless ``spec`` names a backend (``sim`` alone is the simulated H200)."""
    if spec not in BACKENDS + ("sim",):
        raise ValueError(f"unknown backend {spec!r}; choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")


def make_backend(spec: str = "auto") -> Backend:
    """``auto`` (CUDA when available, else the simulated H200), ``cuda``, ``cpu``, ``sim:v100``, ``sim:h200``."""
    check_backend(spec)
    if spec == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return CUDABackend()
        except ImportError:
            pass
        return SimBackend("h200")
    if spec == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"backend 'cuda' needs a CUDA device and torch {torch.__version__} sees none; "
                               "use 'auto' (simulated H200 without one), 'sim:h200' or 'cpu'")
        return CUDABackend()
    if spec == "cpu":
        return CPUBackend()
    return SimBackend(spec.split(":", 1)[1] if ":" in spec else "h200")
