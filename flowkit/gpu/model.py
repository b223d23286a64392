"""``TorchModel``: a class operator whose forward pass goes through the worker's GPU scheduler.

Subclass it, say how to build the module and how to turn rows into a tensor and back, and use it
as a ``gpu=True`` (usually ``batching=True``) map. On a worker with ``GPUPlugin`` its requests are
multiplexed with every other tenant's by the space-time scheduler; elsewhere (``flow.run``, a
cluster without the plugin) a scheduler of this process runs it: on the GPU with the
``spacetime`` policy where torch sees one (``local_choice``), else on the CPU with ``batch``.

    class Classifier(fk.gpu.TorchModel):
        slo_ms = 50
        def build(self):                 return make_resnet(seed=3)
        def inputs(self, table):         return torch.stack([torch.from_numpy(x) for x in table.column("x")])
        def outputs(self, y, table):     return y.argmax(1).tolist()

    flow.map(Classifier, names=["label"], gpu=True, batching=True)
"""

from __future__ import annotations

import threading

from ..runtime.cancel import Cancelled, cancelled
from ..table import Row, Table

__all__ = ["TorchModel"]

_local_lock = threading.Lock()
_local = None
_tenants_lock = threading.Lock()   # one model built per tenant, whatever the threads asking


def local_choice() -> tuple[str, str]:
    """``(backend, policy)`` of this process's own scheduler, used without the plugin: the GPU
    when torch sees one (never a CPU batch scheduler on a GPU machine), else the CPU."""
    import torch

    return ("cuda", "spacetime") if torch.cuda.is_available() else ("cpu", "batch")


def _scheduler():
    from .scheduler import SpaceTimeScheduler, current

    sched = current()
    if sched is not None:
        return sched
    global _local
    with _local_lock:
        if _local is None:
            from .backends import make_backend

            backend, policy = local_choice()
            _local = SpaceTimeScheduler(make_backend(backend), policy=policy,
                                        max_wait_ms=0.0 if policy == "batch" else 2.0)
    return _local


def _wait(fut):
    """The scheduler's answer; if this work is cancelled first (its request abandoned, a race
    lost), the request is withdrawn from the GPU queue if it has not started."""
    while True:
        try:
            return fut.result(timeout=0.05)
        except TimeoutError:
            if cancelled():
                fut.cancel()
                raise Cancelled("cancelled while queued for the GPU") from None


class TorchModel:
    """Base class of GPU-multiplexed model operators (see the module docstring)."""

    slo_ms: float = 100.0

    def build(self):
        raise NotImplementedError("TorchModel subclasses return their torch module from build()")

    def inputs(self, table: Table):
        raise NotImplementedError("TorchModel subclasses turn a table into a tensor in inputs()")

    def outputs(self, y, table: Table) -> list:
        return list(y)

    @property
    def tenant(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def __call__(self, data):
        table = Table._make(data.schema, [data.values], [data.qid]) if isinstance(data, Row) else data
        sched = _scheduler()
        if self.tenant not in sched.tenants:
            with _tenants_lock:   # concurrent first requests build the model once
                if self.tenant not in sched.tenants:
                    sched.add_tenant(self.tenant, self.build(), self.slo_ms)
        y = _wait(sched.submit(self.tenant, self.inputs(table)))
        out = self.outputs(y.cpu() if hasattr(y, "cpu") else y, table)
        return out[0] if isinstance(data, Row) else out
