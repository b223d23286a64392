"""Client: a deployment's latency objective — the profiles it plans from, the resources the
cluster offers, and the plan (``planner.plan_slo``) it deploys. Used by ``Deployment.__init__``
when ``fk.deploy`` is given ``slo_ms`` and ``rate``; nothing here touches a worker except the
profiling run that ``sample=`` asks for.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FlowError
from ..flow import Flow
from ..planner import Overheads, Resources, SLOPlan, plan_slo, require_positive
from ..profiling import Profile, cached_profile, profile as measure
from .compat import address_host

__all__ = ["check_request", "resources_of", "plan_deployment"]

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_request(slo_ms, rate, optimize, profile, sample) -> bool:
    """Whether an objective was asked for (``slo_ms`` and ``rate`` both, or neither), checked
    before anything starts."""
    if slo_ms is None and rate is None:
        if profile is not None or sample is not None:
            raise FlowError("profile= and sample= are for planning a latency objective: pass slo_ms= and rate= too")
        return False
    if slo_ms is None or rate is None:
        raise FlowError("a latency objective needs both slo_ms (the end-to-end p99, ms) and rate (requests/s)")
    require_positive("slo_ms", slo_ms, "of milliseconds ")
    require_positive("rate", rate, "of requests per second ")
    if optimize is not True:
        raise FlowError("with slo_ms the planner chooses the optimizer's rules (fusion, batching, racing); "
                        "leave optimize at its default")
    if profile is not None and not isinstance(profile, Profile):
        raise FlowError(f"profile must be what fk.profile returns, not {type(profile).__name__}")
    return True


def resources_of(client, owned: bool, max_workers: int | None) -> Resources:
    """What the planner may use: up to ``max_workers`` workers (default: one per core for the
    embedded cluster, which flowkit scales; the workers there now for a cluster it was given),
    their threads, and the cores they share when they all run on this machine."""
    workers = client.scheduler_info().get("workers", {})
    threads = max([w.get("nthreads", 1) for w in workers.values()] or [1])
    cpus = os.cpu_count() or 1
    if max_workers is None:
        max_workers = cpus if owned else max(1, len(workers))
    if not (isinstance(max_workers, int) and max_workers >= 1):
        raise FlowError(f"max_workers must be a whole number >= 1, not {max_workers!r}")
    local = owned or (workers and all(address_host(a) in _LOCAL_HOSTS for a in workers))
    return Resources(max_workers=max_workers, threads_per_worker=threads, cores=cpus if local else None)


def plan_deployment(flow: Flow, client, owned: bool, slo_ms: float, rate: float, profile: Profile | None,
                    sample: Any, max_workers: int | None, overheads: Overheads | None = None) -> SLOPlan:
    """The plan to deploy: from ``profile``, else one measured now from ``sample`` on this
    cluster, else the profile ``fk.profile`` measured for this flow version in this process.
    Raises ``SLOUnreachable`` (an ``fk.FlowError``) when no plan meets the objective."""
    if profile is None and sample is not None:
        profile = measure(flow, sample, cluster=client)
    if profile is None:
        profile = cached_profile(flow.original)
    if profile is None:
        raise FlowError(f"a latency objective is planned from stage profiles, and flow {flow.name!r} has none: "
                        f"pass sample= (inputs to measure with), or profile=fk.profile(flow, sample)")
    return plan_slo(flow, profile, slo_ms, rate, resources_of(client, owned, max_workers), overheads)
