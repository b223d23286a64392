"""A load generator that runs in its own process (so it never shares an interpreter with the
system it measures). It prints one JSON object on stdout.

Closed loop: one keep-alive connection, ``--closed N`` requests one after another (after
``--warmup``); every latency is reported. Open loop: Poisson arrivals at ``--rate`` per second
for ``--seconds``, sent by ``--connections`` keep-alive connections; each latency counts from
the request's *scheduled* time (a backlog is not hidden), and a request that fails (any status
but 200, a broken connection, no answer within ``--timeout``) is a miss, never a success.

Every answer is kept too, the distinct ones per request body (``answers``: body index -> up to
``ANSWERS_KEPT`` distinct answers), so the harness can check that a system under load still
answers each request correctly, not only quickly.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/predict --body body.json --closed 2000
    python benchmarks/loadgen.py --url ... --body body.json --rate 200 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import select
import socket
import sys
import threading
import time
from urllib.parse import urlsplit


class Connection(http.client.HTTPConnection):
    """A keep-alive connection with TCP_NODELAY, as production HTTP clients (urllib3) set it:
    Python's http.client sends a request's headers and body in two writes, and with Nagle's
    algorithm the body waits for the server's delayed ACK of the headers (~40 ms)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used_at = time.monotonic()   # when its last answer arrived

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


IDLE_LIMIT_S = 4.0   # a connection idle longer is replaced before a request: below every server's keep-alive
                     # timeout here (uvicorn's default is 5 s), so none closes one as a request arrives on it


ANSWERS_KEPT = 4   # distinct answers kept per request body (a batched model's last digits may differ)


class Endpoint:
    """Where to send, and what: one body (``next_body`` gives it, index 0, every time)."""

    def __init__(self, url: str, body: bytes, timeout: float):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.body, self.timeout = body, timeout
        self.answers: dict[int, set[bytes]] = {}
        self._answers_lock = threading.Lock()

    def next_body(self) -> tuple[int, bytes]:
        return 0, self.body

    def connect(self) -> http.client.HTTPConnection:
        return Connection(self.host, self.port, timeout=self.timeout)

    def _answered(self, index: int, data: bytes) -> None:
        with self._answers_lock:
            seen = self.answers.setdefault(index, set())
            if len(seen) < ANSWERS_KEPT:
                seen.add(data)

    def send(self, conn) -> tuple[bool, http.client.HTTPConnection]:
        """One request on ``conn``: whether it got a 200, and the connection to use next.

        A keep-alive connection the server closed while it sat idle (uvicorn closes one after 5 s,
        which at a low open-loop rate over many connections is most of them) is replaced before
        the request, as urllib3's pool does (``is_connection_dropped``): that is not the
        request's failure. So is one idle longer than ``IDLE_LIMIT_S``, which the server may be
        closing just then (found open, closed before the request arrives: a lost request that
        is the client's race, not the system's fault), as clients with an idle limit below the
        server's keep-alive timeout avoid it."""
        if conn.sock is not None and (_readable(conn.sock)   # readable while idle: closed
                                      or time.monotonic() - conn.used_at > IDLE_LIMIT_S):
            conn.close()
            conn = self.connect()
        index, body = self.next_body()
        try:
            conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            conn.used_at = time.monotonic()
            if r.status == 200:
                self._answered(index, data)
            return r.status == 200, conn
        except (OSError, http.client.HTTPException):
            conn.close()
            return False, self.connect()


def _readable(sock) -> bool:
    """Whether ``sock`` has something to read now (``poll``: any descriptor number, unlike select)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def closed_loop(ep: Endpoint, n: int, warmup: int) -> dict:
    conn = ep.connect()
    latencies, failures = [], 0
    for i in range(warmup + n):
        t0 = time.perf_counter()
        ok, conn = ep.send(conn)
        if i >= warmup:
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1
    return {"latencies_ms": [x * 1000 for x in latencies], "failures": failures}


def open_loop(ep: Endpoint, rate: float, seconds: float, connections: int, seed: int,
              start_at: float | None = None) -> dict:
    """``start_at``: the wall-clock time (``time.time()``) of the schedule's start (default: now),
    so that processes sending consecutive phases of one load follow each other without a gap."""
    rng = random.Random(seed)
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        schedule.append(t)
    latencies = [None] * len(schedule)   # None: failed or unanswered
    late = [None] * len(schedule)   # how late each was sent (a sender's wake-up, or none free): None: unsent
    turns, turns_lock, go = iter(range(len(schedule))), threading.Lock(), threading.Event()
    clock = {}   # the schedule's start and end on this process's perf_counter, set once the senders run

    def sender():
        """Takes the next request of the schedule, sleeps until it is due and sends it itself:
        one thread wakes per request (a dispatcher handing requests to senders through a queue
        woke two, and its hand-off's delay counted as the system's). A request still unsent at
        the deadline is a miss, not sent into the next phase's measurement."""
        conn = ep.connect()
        go.wait()
        while True:
            with turns_lock:
                i = next(turns, None)
            if i is None:
                return
            at = clock["start"] + schedule[i]
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            if sent > clock["deadline"]:
                return
            late[i] = max(0.0, sent - at)
            ok, conn = ep.send(conn)
            if ok:
                latencies[i] = time.perf_counter() - at

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(connections)]
    for th in threads:
        th.start()
    # (a process started after start_at sends what is due at once; latency counts from the schedule)
    clock["start"] = time.perf_counter() + (0.05 if start_at is None else start_at - time.time())
    clock["deadline"] = clock["start"] + seconds + ep.timeout
    go.set()
    for th in threads:
        th.join(max(0.0, clock["deadline"] - time.perf_counter()))
    return {"rate": rate, "sent": len(schedule), "schedule_s": schedule,
            "latencies_ms": [None if x is None else x * 1000 for x in latencies],
            "late_ms": [None if x is None else x * 1000 for x in late]}


def main(body_option: str = "--body", endpoint=None, timeout: float = 30) -> None:
    """The command line: ``body_option`` names the file holding what to send, ``endpoint(url,
    file, timeout)`` makes the ``Endpoint`` from it (default: one body, sent every time)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument(body_option, required=True, dest="body_file", help="the file holding the request body(ies)")
    ap.add_argument("--closed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-at", type=float, default=None, help="open loop: the wall-clock time to start at")
    a = ap.parse_args()
    if endpoint is None:
        with open(a.body_file, "rb") as f:
            ep = Endpoint(a.url, f.read(), a.timeout)
    else:
        ep = endpoint(a.url, a.body_file, a.timeout)
    out = closed_loop(ep, a.closed, a.warmup) if a.closed else \
        open_loop(ep, a.rate, a.seconds, a.connections, a.seed, a.start_at)
    out["answers"] = {str(i): sorted(x.decode(errors="replace") for x in seen) for i, seen in ep.answers.items()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
