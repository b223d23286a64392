"""What the space-time scheduler runs next, as pure functions of its queues (no device, no
threads): the request and tenant records, ``plan_launch`` (each policy's choice), straggler
detection, and what must match for tenants to stack (``architecture``). The dispatcher
(``scheduler.SpaceTimeScheduler``) asks these and runs the answer on a backend.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from statistics import median
from typing import Any

__all__ = ["POLICIES", "Request", "Tenant", "Launch", "plan_launch", "find_stragglers", "slow_stragglers",
           "architecture", "vmap_failure"]

POLICIES = ("time", "batch", "space", "spacetime")


@dataclass(eq=False)
class Request:
    tenant: str
    x: Any
    rows: int
    arrival: float
    deadline: float
    future: Future = field(default_factory=Future)
    shape: tuple = ()                            # a row's shape: only requests of one shape batch together


@dataclass(eq=False)
class Tenant:
    name: str
    module: Any
    arch: tuple
    slo: float
    queue: deque = field(default_factory=deque)
    requests: int = 0
    attained: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2048))
    served_rows: int = 0

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.queue)


@dataclass(frozen=True)
class Launch:
    """What to run next: tenants' requests, as one stacked program and/or separate launches."""

    kind: str                                    # solo | batch | concurrent | stacked
    stacked: tuple = ()                          # ((tenant, (requests...)), ...) run as one super-kernel
    separate: tuple = ()                         # ((tenant, (requests...)), ...) run as their own launches
    stragglers: tuple = ()

    @property
    def tenants(self) -> tuple:
        return tuple(t for t, _ in self.stacked + self.separate)


def _take(queue, max_rows: int) -> tuple:
    """Queued requests from the head with the head's row shape, up to ``max_rows`` rows (always at
    least one request)."""
    out, rows = [], 0
    for r in queue:
        if out and (rows + r.rows > max_rows or r.shape != out[0].shape):
            break
        out.append(r)
        rows += r.rows
    return tuple(out)


def find_stragglers(backlog: dict[str, int], factor: float = 4.0, floor: int = 8) -> set:
    """Tenants whose queued rows are ``factor`` times their group's median (and at least ``floor``).

    >>> sorted(find_stragglers({"a": 1, "b": 2, "c": 40}))
    ['c']
    >>> find_stragglers({"a": 3, "b": 4})
    set()
    """
    if len(backlog) < 3:
        return set()
    mid = median(backlog.values())
    return {t for t, n in backlog.items() if n >= floor and n > factor * max(1, mid)}


def slow_stragglers(group: list, max_batch: int, cost, now: float) -> set:
    """Tenants whose rows would stretch a stacked launch, by its measured latency, past a peer's
    deadline that the launch would meet without them (largest first; at least two stay stacked).

    ``cost(rows)``: the measured seconds of this group's stacked launch at ``rows`` rows per
    tenant, or None where not measured yet (then nobody is judged by it). A tenant whose own
    deadline is the earliest is never evicted: it is the one the launch is for."""
    rows = {t.name: sum(r.rows for r in _take(t.queue, max_batch)) for t in group}
    stack = sorted(group, key=lambda t: -rows[t.name])
    evicted = set()
    while len(stack) > 2:
        big, rest = stack[0], stack[1:]
        with_big, without = rows[big.name], max(rows[t.name] for t in rest)
        deadline = min(t.queue[0].deadline for t in rest)
        slow, fast = cost(with_big), cost(without)
        if with_big <= without or slow is None or fast is None or big.queue[0].deadline <= deadline:
            break
        if not now + fast <= deadline < now + slow:
            break
        evicted.add(big.name)
        stack = rest
    return evicted


def plan_launch(policy: str, tenants: dict[str, Tenant], max_batch: int, now: float = 0.0,
                cost=None, unstackable=frozenset()) -> Launch | None:
    """The next launch under ``policy`` (a pure function of the queues and, for ``spacetime``, of
    ``cost(arch, rows)``, the measured latency of stacked launches; see the module docstring).
    Tenants of an architecture in ``unstackable`` are each a group of one."""
    waiting = [t for t in tenants.values() if t.queue]
    if not waiting:
        return None
    waiting.sort(key=lambda t: t.queue[0].deadline)
    if policy == "time":
        first = waiting[0]
        return Launch("solo", separate=((first.name, (first.queue[0],)),))
    if policy == "batch":
        first = waiting[0]
        return Launch("batch", separate=((first.name, _take(first.queue, max_batch)),))
    if policy == "space":
        return Launch("concurrent", separate=tuple((t.name, _take(t.queue, max_batch)) for t in waiting))
    if policy != "spacetime":
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    def group(t):
        return ("alone", t.name) if t.arch in unstackable else t.arch, t.queue[0].shape

    groups: dict = {}                             # (architecture, row shape) -> its waiting tenants, in EDF order
    for t in waiting:
        groups.setdefault(group(t), []).append(t)
    first = groups.pop(group(waiting[0]))         # EDF across groups
    stragglers = find_stragglers({t.name: t.rows for t in first})
    if cost is not None:
        arch = first[0].arch
        stragglers |= slow_stragglers([t for t in first if t.name not in stragglers], max_batch,
                                      lambda rows: cost(arch, rows), now)
    stack = [t for t in first if t.name not in stragglers]
    if len(stack) < 2:                            # no peer waiting: nothing to stack
        stack = []
    alone = [ts[0] for ts in groups.values() if len(ts) == 1]   # tenants with no peer run beside the stack
    separate = [t for t in first if t not in stack] + alone
    kind = "stacked" if stack else ("batch" if len(separate) == 1 else "concurrent")
    return Launch(kind, stacked=tuple((t.name, _take(t.queue, max_batch)) for t in stack),
                  separate=tuple((t.name, _take(t.queue, max_batch)) for t in separate),
                  stragglers=tuple(sorted(stragglers)))


def architecture(module) -> tuple:
    """What must be equal for tenants to stack: a stacked program runs the first tenant's code
    with every tenant's parameters and buffers, so the classes, the tensors' shapes and dtypes and
    every plain setting of every submodule (a stride, a flag, train or eval) must match; any other
    attribute must be the very same object.

    >>> from torch import nn
    >>> architecture(nn.Linear(4, 2)) == architecture(nn.Linear(4, 2))
    True
    >>> architecture(nn.Conv2d(3, 8, 3)) == architecture(nn.Conv2d(3, 8, 3, stride=2))
    False
    """
    def setting(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (tuple, list)):
            return tuple(setting(x) for x in v)
        return (type(v).__qualname__, id(v))

    parts = [(name, type(m).__qualname__,
              tuple(sorted((k, setting(v)) for k, v in vars(m).items() if not k.startswith("_"))))
             for name, m in module.named_modules()]
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in (*module.named_parameters(), *module.named_buffers())]
    return (type(module).__qualname__, *parts, *tensors)


def vmap_failure(error: BaseException) -> bool:
    """Whether a stacked launch failed because ``vmap`` cannot batch the model (no batching rule,
    data-dependent control flow), as opposed to a failure that may not recur.

    >>> vmap_failure(RuntimeError("Batching rule not implemented for aten::lstm.input."))
    True
    >>> vmap_failure(RuntimeError("vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow."))
    True
    >>> vmap_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    False
    """
    text = f"{error}".lower()
    return any(w in text for w in ("vmap", "batching rule", "batchedtensor", "functorch"))


