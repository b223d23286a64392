"""The worker side of a session: one client connection, its calls run, its answers sent.

A client (``router``) opens one session per worker and streams ``Call``s over it; each runs as
its own task in the deployment's executor and its ``Answer`` goes back as soon as it is ready.
An ``Abandon`` cancels a call's token and task; the call is still answered (``abandoned``), but
only once the threads it occupied are free, so its client counts the worker busy until then.
"""

from __future__ import annotations

import asyncio
import threading

from . import protocol as p
from .cancel import Token
from .compat import DONT_REPLY, worker_threads
from .executor import request_threads

__all__ = ["serve_session"]


async def serve_session(worker, comm, deployment: str):
    """Serve one client connection: answer its ``Hello``, then its calls, until it closes."""
    dep = worker._flowkit.get(deployment)
    if dep is None:
        await comm.write(p.encode(p.Welcome(False, error=f"deployment {deployment!r} is not set up on {worker.address}")))
        return DONT_REPLY
    listener = getattr(worker, "_flowkit_framed", None)
    await comm.write(p.encode(p.Welcome(True, worker.address, worker_threads(worker),
                                        (listener.host, listener.port) if listener else None)))
    lock = asyncio.Lock()
    tasks: set = set()
    running: dict = {}   # call id -> (token, task, [started]) of work its sender may abandon

    write_now = getattr(comm, "write_now", None)

    async def answer(call: p.Call, token: Token | None, started: list) -> None:
        """Run ``call`` in this task and send its answer. An ``Abandon`` sets ``token`` and, once
        the task has started (``started``), cancels it; one that came before it started is
        answered ``abandoned`` at once."""
        started[0] = True
        threads: set = set()
        request_threads.set(threads)   # the pool threads its work occupies (see executor)
        try:
            if token is not None and token.is_cancelled:
                raise asyncio.CancelledError
            reply = await dep.handle(call, token)
        except asyncio.CancelledError:   # abandoned: answered once the threads it held are free
            if token is None or not token.is_cancelled:
                raise
            when_free(list(threads), lambda: spawn(send(p.Answer(call.id, ok=False, abandoned=True))))
            return
        finally:
            running.pop(call.id, None)
        await send(reply)

    def spawn(coro) -> asyncio.Task:   # a task held until it ends (asyncio holds tasks only weakly)
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    async def send(reply: p.Answer) -> None:
        msg = p.encode(reply)
        try:
            if write_now is not None and not lock.locked() and write_now(msg):
                return
            async with lock:
                await comm.write(msg)
        except OSError:   # the client went away (its connection closed): no one to answer
            pass

    try:
        while not comm.closed():
            msg = p.decode(await comm.read())
            if isinstance(msg, p.Close):
                break
            if isinstance(msg, p.Abandon):   # the client cancelled a call: stop its work
                token, task, started = running.pop(msg.request, (None, None, None))
                if token is not None:
                    token.cancel("the client cancelled this request")
                    if started[0]:   # (a task cancelled before it starts never runs: no answer)
                        task.cancel()
                continue
            token, started = (Token() if msg.kind in p.CANCELLABLE else None), [False]
            task = spawn(answer(msg, token, started))
            if token is not None:
                running[msg.id] = (token, task, started)
    except (OSError, asyncio.CancelledError):
        pass  # the client went away; in-flight answers are dropped with the connection
    finally:
        for t in tasks:
            t.cancel()
    return DONT_REPLY


def when_free(work: list, then) -> None:
    """Call ``then()`` on the running event loop once every future in ``work`` (pool work) is
    done. Callbacks, not a task awaiting them: nothing that happens to the abandoned call's task
    afterwards can lose its answer."""
    loop = asyncio.get_running_loop()
    left = [f for f in work if not f.done()]
    if not left:
        then()
        return
    count = [len(left)]
    lock = threading.Lock()

    def one_done(_) -> None:
        with lock:
            count[0] -= 1
            last = count[0] == 0
        if last:
            try:
                loop.call_soon_threadsafe(then)
            except RuntimeError:   # the worker's loop is closed: it is going away
                pass

    for f in left:
        f.add_done_callback(one_done)
