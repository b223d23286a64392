"""The session protocol: every message between a deployment's client (``router``) and a worker
(``session``), as a small typed record, and its encoding.

A client opens a session to a worker with ``Hello`` (as a dask RPC call, ``flowkit_session``),
the worker answers ``Welcome``; then the client streams ``Call``s and the worker streams back
one ``Answer`` per call, in any order, matched by ``id``. ``Abandon`` asks the worker to stop a
call (it still answers it, ``abandoned``, once the threads the call held are free); ``Close``
ends the session. On the wire each record is a plain dict (what both dask's comm and the
``framed`` transport carry); a ``payload`` is pickled bytes (``wire``), never re-encoded.

>>> decode(encode(Call("run", 7, b"...")))
Call(kind='run', id=7, payload=b'...')
>>> decode(encode(Answer(7, ok=False, abandoned=True)))
Answer(id=7, ok=False, payload=None, stats=None, error=None, leaving=False, abandoned=True)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Hello", "Welcome", "Call", "Abandon", "Close", "Answer", "CANCELLABLE", "encode", "decode"]

CANCELLABLE = ("run", "stage")   # call kinds whose sender may abandon them (the others are quick)


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> worker, opening a session for one deployment."""

    deployment: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """Worker -> client: the session is open (``ok``), or why not (``error``). ``framed`` is
    ``(host, port)`` of the worker's framed listener, which the client may move to."""

    ok: bool
    worker: str = ""
    nthreads: int = 1
    framed: tuple | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Call:
    """Client -> worker: ``run`` a request (payload: its input Table), run one ``stage``
    (payload: ``(stage name, input tables)``), send ``stats``, ``forget`` where a stored key
    lived (payload: the key), ``keep`` a copy of an object put with ``broadcast`` (payload:
    ``(key, object)``), set batch ``window``s and race widths (payload: ``(version, windows,
    widths)``), ``serve`` HTTP on the worker (payload: the
    options; answered with the port) or ``unserve`` it, send its endpoints' ``http`` answer
    counts, or the ``recent`` requests they finished (payload: since when, on the worker's
    monotonic clock; answered with its clock now, those requests and those in flight)."""

    kind: str
    id: int
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Abandon:
    """Client -> worker: stop call ``request``; its sender no longer waits for it."""

    request: int


@dataclass(frozen=True, slots=True)
class Close:
    """Client -> worker: the session ends."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Worker -> client: call ``id``'s result (``payload`` or ``stats``) or its pickled
    ``error``. ``leaving``: the worker is leaving the deployment, send the call elsewhere;
    ``abandoned``: the abandoned call's threads are free."""

    id: int
    ok: bool
    payload: bytes | None = None
    stats: dict | None = None
    error: bytes | str | None = None
    leaving: bool = False
    abandoned: bool = False


_KINDS = {"abandon": Abandon, "close": Close}   # (any other kind is a Call's)


def encode(msg) -> dict:
    """A record as the dict that travels: its set fields (defaults left out), plus its kind."""
    d = {f.name: v for f in fields(msg) if (v := getattr(msg, f.name)) != f.default}
    if isinstance(msg, Abandon):
        d["kind"] = "abandon"
    elif isinstance(msg, Close):
        d["kind"] = "close"
    return d


def decode(d: dict):
    """The record a session message encodes: a call, abandon or close by its ``kind``; else an
    answer. (``Hello`` and ``Welcome`` open a session: ``Hello(**d)``, ``Welcome(**d)``.)"""
    kind = d.get("kind")
    if kind is None:
        return Answer(**d)
    cls = _KINDS.get(kind, Call)   # (a call of an unknown kind is answered with an error)
    return cls(**{k: v for k, v in d.items() if k != "kind" or cls is Call})
