"""Client: dialling a worker for a session (``router`` keeps the sessions).

A session opens over dask's comm (so the cluster's TLS applies): a ``Hello`` naming the
deployment, answered by a ``Welcome``. On a plain-TCP cluster whose worker has a ``framed``
listener, the session then moves to it (lighter per message); a listener that cannot be
reached (a firewall, NAT) within 5 s leaves it on dask's comm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from distributed.comm import connect

from . import framed
from . import protocol as p

__all__ = ["dial"]

logger = logging.getLogger("flowkit.router")


async def dial(address: str, deployment: str, connection_args: dict, timeout: float, use_framed: bool):
    """``(comm, welcome)``: a connection to ``address`` whose worker welcomed a session of
    ``deployment``, or ``(None, a refusal)`` saying why not."""
    try:
        comm = await connect(address, timeout=timeout, **connection_args)
        await comm.write({"op": "flowkit_session", "reply": False, **p.encode(p.Hello(deployment))})
        welcome = p.Welcome(**await comm.read())
    except Exception as e:
        logger.debug("connect to %s failed: %s", address, e)
        return None, p.Welcome(False, error=str(e))
    if not welcome.ok:
        comm.abort()
        return None, welcome
    plain = address.startswith("tcp://") and not connection_args.get("ssl_context")
    if welcome.framed and use_framed and plain:
        comm = await _framed(address, deployment, welcome.framed, comm)
    return comm, welcome


async def _framed(address: str, deployment: str, where, comm):
    """The session moved to the worker's framed listener at ``where``, else left on ``comm``."""

    async def handshake():
        fast = await framed.connect(*where)
        try:
            await fast.write(p.encode(p.Hello(deployment)))
            if p.Welcome(**await fast.read()).ok:
                return fast
        except OSError:
            pass
        fast.abort()
        return None

    try:
        fast = await asyncio.wait_for(handshake(), 5)   # a filtered port must not stall the session
        if fast is None:
            return comm
    except OSError as e:
        logger.debug("framed session to %s at %s failed: %s", address, where, e)
        return comm
    with contextlib.suppress(Exception):
        await comm.write(p.encode(p.Close()))
        await comm.close()
    return fast
