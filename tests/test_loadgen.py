"""The benchmarks' load generator counts a system's failures, not its own."""

import contextlib
import http.server
import select
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .waiting import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loadgen  # noqa: E402
import request_split  # noqa: E402
import slo  # noqa: E402
from peers.cycling_loadgen import CyclingEndpoint  # noqa: E402

sys.path.pop(0)


@contextlib.contextmanager
def _serving(handler, **attrs):
    """A local HTTP server answering with ``handler`` in threads of its own; yields its URL and
    the server (``attrs`` set on it)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict", server
    finally:
        server.shutdown()
        server.server_close()


class _AnswersThenCloses(http.server.BaseHTTPRequestHandler):
    """Keep-alive (HTTP/1.1, no ``Connection: close``), but the connection is closed after each
    answer, as a server's idle timeout closes it."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_keep_alive_connection_the_server_closed_while_idle_is_replaced_not_counted_as_a_failure():
    with _serving(_AnswersThenCloses) as (url, _):
        ep = loadgen.Endpoint(url, b"{}", timeout=10)
        conn = ep.connect()
        for _ in range(3):
            ok, conn = ep.send(conn)
            assert ok
            wait_until(lambda: select.select([conn.sock], [], [], 0)[0], "the server to close the idle connection")


class _AnswersAndKeepsOpen(_AnswersThenCloses):
    def do_POST(self):
        super().do_POST()
        self.close_connection = False


def test_a_connection_idle_past_the_limit_is_replaced_before_a_server_could_be_closing_it():
    with _serving(_AnswersAndKeepsOpen) as (url, _):
        ep = loadgen.Endpoint(url, b"{}", timeout=10)
        first = ep.connect()
        ok, conn = ep.send(first)
        ok2, again = ep.send(conn)
        assert ok and ok2 and again is first   # used within the limit: kept
        again.used_at -= loadgen.IDLE_LIMIT_S + 1   # (as if idle that long)
        ok, fresh = ep.send(again)
        assert ok and fresh is not first and first.sock is None


class _Echoes(http.server.BaseHTTPRequestHandler):
    """Answers each request with its own body, except request 2's, answered wrongly."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if body == b'{"rows": [{"y": 2}]}':
            body = b'{"rows": [{"y": 3}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_answers_under_load_are_kept_per_request_and_the_wrong_ones_found():
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        from pipelines_vs_peers import wrong_answers
    finally:
        sys.path.remove(bench)
    bodies = [b'{"rows": [{"y": %d}]}' % i for i in range(3)]
    with _serving(_Echoes) as (url, _):
        ep = CyclingEndpoint(url, bodies, timeout=10)
        out = loadgen.closed_loop(ep, 6, 0)
        assert out["failures"] == 0 and len(out["latencies_ms"]) == 6
    assert ep.answers == {0: {bodies[0]}, 1: {bodies[1]}, 2: {b'{"rows": [{"y": 3}]}'}}
    answers = {str(i): sorted(x.decode() for x in seen) for i, seen in ep.answers.items()}
    assert wrong_answers(answers, [{"y": 0}, {"y": 1}, {"y": 2}]) == ['request 2: {"rows": [{"y": 3}]}']


class _NotesArrivals(http.server.BaseHTTPRequestHandler):
    """Answers ``{}`` and notes each request's arrival (``time.time()``) on its server."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.arrivals.append(time.time())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_an_open_loop_given_a_start_waits_for_it_and_counts_latency_from_its_schedule():
    """Phases sent by separate processes line up on one schedule (``--start-at``): nothing is
    sent before the start, and a start already past counts latency from the schedule."""
    with _serving(_NotesArrivals, arrivals=[]) as (url, server):
        ep = loadgen.Endpoint(url, b"{}", timeout=10)
        start_at = time.time() + 0.5
        out = loadgen.open_loop(ep, rate=200, seconds=0.2, connections=4, seed=1, start_at=start_at)
        assert len(server.arrivals) == out["sent"] > 0 and min(server.arrivals) >= start_at + out["schedule_s"][0] - 0.01
        assert out["schedule_s"] == sorted(out["schedule_s"]) and max(out["schedule_s"]) <= 0.2
        late = loadgen.open_loop(ep, rate=200, seconds=0.2, connections=4, seed=1, start_at=time.time() - 5.0)
        assert min(x for x in late["latencies_ms"] if x is not None) >= 5000 - 300   # from its schedule, 5 s ago
        # and the sender's own lateness is reported apart: all of it here, each within its latency
        assert min(x for x in late["late_ms"] if x is not None) >= 5000 - 300
        assert all(s <= x for s, x in zip(out["late_ms"] + late["late_ms"], out["latencies_ms"] + late["latencies_ms"])
                   if x is not None)


def test_an_http_load_in_phases_from_processes_of_its_own_reaches_the_workers_and_misses_nothing(client):
    """benchmarks/slo.py's HTTP load: each phase from a load generator process of its own, the
    second phase's schedule after the first's, every request answered by the workers."""
    import flowkit as fk

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import slo_drive
    finally:
        sys.path.remove(bench)
    f = fk.Flow("doubled", {"x": int})
    f.map(_double, names=["y"])
    with fk.deploy(f, cluster=client) as dep:
        served_before = _served(dep)
        run = slo_drive.drive_http(dep, lambda i: {"x": [i]}, [(1.0, 20.0), (1.0, 40.0)], seed=3)
        served = _served(dep) - served_before
    first, second = run.sched[run.sched < 1.0], run.sched[run.sched >= 1.0]
    assert len(first) > 0 and len(second) > 0 and run.sched.max() < 2.0
    assert len(run.sched) == len(run.lat_ms) and run.failed == 0 and (run.lat_ms > 0).all()
    assert served == len(run.sched)   # every one served by the workers' own endpoints
    assert run.lead_s == slo_drive.LEAD_S
    # and timed by them too, each inside its time at the load generator: then so is every
    # order statistic (the k-th shortest on the workers is no longer than the k-th at the client)
    assert len(run.server_ms) == len(run.sched)
    assert (np.sort(run.server_ms) <= np.sort(run.lat_ms)).all() and (run.server_ms > 0).all()
    # how late each was sent: part of its latency, and summarized beside the workers' times
    assert len(run.late_ms) == len(run.sched) and (run.late_ms >= 0).all() and (run.late_ms <= run.lat_ms).all()
    assert run.server_summary()["sender_late_p99_ms"] <= np.percentile(run.lat_ms, 99)


def _served(dep) -> int:
    """Requests answered end to end (``dep.stats()``): here, none sent from this process, all
    by the workers' own HTTP endpoints."""
    return int(dep.stats().loc["(end to end)", "requests"])


def _double(row) -> int:
    return 2 * row["x"]


def test_the_request_split_attributes_each_phase_and_each_collection_to_its_request():
    rs = request_split
    hop_ids = iter(range(100))

    def request(start, plans_ms, gc_ms=None, lost=False):
        """A request's events: each step 0.1 ms after the one before, but for its plan's stages
        (one hand-off to the thread each); ``lost``: a hand-off whose thread ends after its answer."""
        events, t = [], start

        def step(name, *extra, took=0.1):
            nonlocal t
            events.append((name, t, *extra))
            t += took / 1000
        for name in rs.STEPS[:4]:
            step(name)
        late = []
        for plan_ms in plans_ms:
            hop = next(hop_ids)
            step("to thread", hop)
            step("thread start", hop, took=plan_ms)
            if gc_ms:   # a full collection inside the plan
                events += [("gc start", t - plan_ms / 1000, 2), ("gc stop", t - plan_ms / 1000 + gc_ms / 1000, 2)]
            (late if lost else events).append(("thread end", t, hop))
            t += 0.1 / 1000
            step("back on loop", hop)
        for name in rs.STEPS[4:]:
            step(name)
        return events + [(name, t + 1, hop) for name, _, hop in late]

    trace = [("gc start", 0.0, 0), ("gc stop", 0.001, 0)]   # before any request: nobody's
    trace += request(1.0, [2.0]) + request(2.0, [9.0], gc_ms=6.0) + request(3.0, [2.0])
    trace += request(4.0, [1.0, 3.0])                       # two stages handed over in turn
    trace += request(6.0, [2.0], lost=True)                 # its thread ran on: left out, in its place
    trace += [("entry", 8.0), ("body read", 8.001)]         # unfinished: not there
    reqs = rs.requests_of(trace)
    assert reqs[4] is None and len(reqs) == 5
    phases = [rs.phases_of(r) for r in reqs[:4]]
    assert [round(p["plan"], 6) for p in phases] == [2.0, 9.0, 2.0, 4.0]
    assert [round(p["between stages"], 6) for p in phases] == [0, 0, 0, 0.1]
    for p in phases:   # the phases add up to the handler's time
        assert sum(p[name] for name in rs.PHASES + ["between stages"]) == pytest.approx(p["handler"])
    assert [r["gc_ms"] for r in reqs[:4]] == [{}, {2: pytest.approx(6.0)}, {}, {}]
    rows, summary = rs.split([3.5, 11.0, 3.4, 5.6, 3.0], reqs)
    by = {r["phase"]: r for r in rows}
    assert summary["requests"] == 4 and summary["left_out"] == 1
    assert by["plan"]["slowest 1% mean_ms"] == pytest.approx(9.0)   # the slowest by the client's time is the 2nd
    assert by["outside handler"]["slowest 1% mean_ms"] == pytest.approx(11.0 - (9.0 + 9 * 0.1))   # 9 other phases of 0.1 ms
    assert summary["slowest_with_gc"] == 1 and summary["full_collections"] == 1


def test_the_slo_table_gives_every_row_the_header_s_cells():
    """benchmarks/slo.py's markdown, from a committed result with every kind of row it has
    (planned, defaults, the grid's best and its confirmation, Ray Serve) and from rows refused,
    skipped and held by no configuration: each row has as many cells as the header."""
    import json

    out = json.loads((Path(slo.__file__).parent / "results" / "slo.json").read_text())
    case = out["pipelines"]["cascade"]["cases"][0]
    extra = {**case, "planned": {"refused": "no plan holds it"}, "ray": {"skipped": "no peers"},
             "grid": {**{k: v for k, v in case["grid"].items() if k != "confirmed"}, "best": None}}
    out["pipelines"]["cascade"]["cases"].append(extra)
    rows = [line for line in slo.markdown(out).splitlines() if line.startswith("|")]
    assert len(rows) > 10 and {line.count("|") for line in rows} == {len(slo.COLUMNS) + 1}
    assert any("| planned | refused |" in line for line in rows) and any("skipped: no peers" in line for line in rows)


def test_a_slow_spell_spins_its_hogs_from_its_start_for_its_length_and_leaves_none(monkeypatch):
    """slo.py --spell: the hogs start once the load has (LEAD_S, then FROM), spin for SECONDS,
    and none outlives the case, however it ends."""
    monkeypatch.setattr(slo.slo_drive, "LEAD_S", 0.0)
    started = []
    real_start = slo.hog.start_hog

    def start_hog(procs):
        new = real_start(procs)
        started.extend(new)
        return new

    monkeypatch.setattr(slo.hog, "start_hog", start_hog)
    with slo.slow_spell((0.0, 0.3, 2)) as happened:
        wait_until(lambda: len(happened) == 2, "the spell to start and end")
    assert len(started) == 2 and happened[1] - happened[0] >= 0.3
    assert all(p.poll() is not None for p in started)
    with slo.slow_spell((0.0, 3600.0, 1)) as happened:   # a case that ends during its spell
        wait_until(lambda: len(happened) == 1, "the spell to start")
    assert len(started) == 3 and all(p.poll() is not None for p in started) and len(happened) == 2
    with slo.slow_spell(None) as happened:
        pass
    assert happened == []
    assert slo.parse_spell("15:15:2") == (15.0, 15.0, 2)
    for bad in ("15:15", "a:1:2", "15:15:2.5", "-1:5:2"):
        with pytest.raises(slo.argparse.ArgumentTypeError, match="FROM:SECONDS:PROCS"):
            slo.parse_spell(bad)
