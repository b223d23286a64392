"""The HTTP front door with real clients on loopback: every status code, auth, load, faults,
graceful shutdown, the command line, and a deployment on a TLS-secured dask cluster."""

from __future__ import annotations

import base64
import http.client
import json
import re
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import flowkit as fk
from flowkit.runtime.http import HTTPServer
from flowkit.runtime.http_codec import decode_rows, error_answer

from .operators import ended, held, open_gate, patient
from .waiting import wait_until


def work(row) -> int:
    if row["x"] == 13:
        raise ValueError("unlucky")
    if row["x"] < 0:
        time.sleep(-row["x"] / 1000)
    return row["x"] * 2


def build() -> fk.Flow:
    flow = fk.Flow("double", {"x": int, "tag": bytes})
    flow.map(work, names=["y"])
    return flow


@pytest.fixture(scope="module")
def served(client):
    with fk.deploy(build(), cluster=client, max_inflight=50) as dep:
        server = dep.serve(max_body_bytes=20_000)
        yield dep, server


def call(server, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    try:
        return r.status, json.loads(payload), dict(r.getheaders())
    except ValueError:
        return r.status, payload.decode(), dict(r.getheaders())


PREDICT = "/v1/flows/double/predict"


def test_rows_and_columns_come_back_with_their_qids(served):
    _, server = served
    status, body, _ = call(server, "POST", PREDICT, {"rows": [{"x": 1, "tag": base64.b64encode(b"a").decode()}, {"x": 2}]})
    assert status == 200 and body == {"rows": [{"qid": 0, "y": 2}, {"qid": 1, "y": 4}]}
    status, body, _ = call(server, "POST", PREDICT, {"columns": {"x": [5, 6]}})
    assert status == 200 and [r["y"] for r in body["rows"]] == [10, 12]
    assert call(server, "POST", PREDICT, [{"x": 7}])[1]["rows"][0]["y"] == 14


@pytest.mark.parametrize("raw, status, kind, column", [
    (b"{not json", 400, "MalformedJSON", None),
    (b"[" * 9000 + b"]" * 9000, 400, "MalformedJSON", None),   # deeper than Python's JSON parser goes
    (json.dumps({"rows": [{"x": "one"}]}).encode(), 422, "SchemaError", "x"),
    (json.dumps({"rows": [{"z": 1}]}).encode(), 422, "SchemaError", "z"),
    (json.dumps({"rows": [{"x": 1, "tag": "%%%"}]}).encode(), 422, "SchemaError", "tag"),
    (json.dumps({"rows": [{"x": 1}] * 3000}).encode(), 413, "BodyTooLarge", None),
])
def test_bad_input_gets_a_clear_status(served, raw, status, kind, column):
    _, server = served
    got, body, _ = call(server, "POST", PREDICT, raw=raw)
    assert (got, body["type"], body.get("column")) == (status, kind, column)
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200   # nothing disturbed


def test_400_kb_of_nested_arrays_is_a_400(served):
    dep, _ = served
    with dep.serve() as roomy:   # the default body limit (10 MiB)
        status, body, _ = call(roomy, "POST", PREDICT, raw=b"[" * 200_000 + b"]" * 200_000)
    assert (status, body["type"]) == (400, "MalformedJSON")


def test_a_body_over_the_limit_sent_whole_before_reading_gets_its_413(served):
    """urllib sends all of its body before it reads the answer: the server reads and drops the
    rest rather than closing on it (which resets the connection, and the client never sees 413)."""
    _, server = served
    request = urllib.request.Request(server.url + PREDICT, data=b"[" + b" " * 2_000_000 + b"]",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and json.loads(refused.value.read())["type"] == "BodyTooLarge"
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def raw_exchange(server, head: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` on a fresh connection and read until the server closes it: (status line and
    headers, body)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(60)   # a hang fails the test instead of stalling the suite
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return head, payload


def test_a_client_waiting_for_100_continue_with_a_body_over_the_limit_is_answered_at_once(served):
    _, server = served
    head, payload = raw_exchange(server, b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                 b"Expect: 100-continue\r\nContent-Length: 40000\r\n\r\n")   # and no body
    assert head.startswith(b"HTTP/1.1 413") and json.loads(payload)["type"] == "BodyTooLarge"


def test_a_client_that_stops_mid_body_is_answered_408_and_disconnected(served):
    dep, _ = served
    with dep.serve(body_timeout=0.5) as server:
        head, payload = raw_exchange(server, b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 100\r\n\r\n{\"rows\": [")   # 90 bytes short, no more coming
        assert head.startswith(b"HTTP/1.1 408") and json.loads(payload)["type"] == "BodyTimeout"
        assert server.counts[("double", 408)] == 1


def test_a_port_in_use_is_said_plainly(served):
    dep, server = served
    with pytest.raises(fk.FlowError, match=f"cannot serve on 127.0.0.1:{server.port}: .*pass port=0 for a free port"):
        dep.serve(port=server.port)
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def test_array_columns_take_nested_lists_of_numbers_and_nothing_else():
    from flowkit.schema import Schema

    schema = Schema({"a": np.ndarray})
    (row,) = decode_rows({"rows": [{"a": [[1.5, 2.0], [3.0, 4.0]]}]}, schema)
    assert row["a"].shape == (2, 2) and row["a"].dtype == np.float32
    for bad in ("a string", [[1, 2], [3]], [{"x": 1}]):
        with pytest.raises(fk.SchemaError, match="column 'a' expects an array as nested lists of numbers"):
            decode_rows({"rows": [{"a": bad}]}, schema)


def test_bytes_columns_take_strict_base64_and_nothing_else():
    from flowkit.schema import Schema

    schema = Schema({"b": bytes})
    blob = bytes(range(256)) * 3
    (row,) = decode_rows({"rows": [{"b": base64.b64encode(blob).decode()}]}, schema)
    assert row["b"] == blob
    # unpadded, data after the padding, a character outside the alphabet, a line break, non-ASCII
    for bad in ("aGk", "aGk=aGk=", "a$Gk", "aGk=\n", "aGé="):
        with pytest.raises(fk.SchemaError, match="column 'b' expects bytes as a base64 string; it is not valid"):
            decode_rows({"rows": [{"b": bad}]}, schema)


def test_422_names_the_column_and_404_names_the_flows(served):
    _, server = served
    status, body, _ = call(server, "POST", PREDICT, {"rows": [{"x": 1.5}]})
    assert status == 422 and body["column"] == "x"
    status, body, _ = call(server, "POST", "/v1/flows/nope/predict", {"rows": []})
    assert status == 404 and "double" in body["error"]


def test_operator_errors_are_500_naming_the_operator_without_a_traceback(served):
    _, server = served
    status, body, _ = call(server, "POST", PREDICT, {"rows": [{"x": 13}]})
    assert status == 500 and body["operator"] == "work" and body["qid"] == 0
    assert "unlucky" in body["error"] and "Traceback" not in json.dumps(body)


def test_a_client_that_leaves_mid_body_is_counted_not_logged_as_a_server_error(served):
    _, server = served
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"rows\": [")
    sock.close()   # 90 bytes short
    wait_until(lambda: server.counts.get(("double", 499)), "the hang-up to be counted as a 499")
    assert server.counts[("double", 499)] == 1
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def test_the_workers_time_each_request_that_reached_the_plan_from_its_arrival_to_its_answer(client):
    """Served by the workers, each request that reached the plan is timed by its worker (an
    error for a 500), and a request refused before it (422) is not; the times cover the
    operator's and reach the client's re-planner (``dep.recent``)."""
    with fk.deploy(build(), cluster=client) as dep, dep.serve(where="workers") as server:
        bodies = ({"rows": [{"x": 1}]}, {"rows": [{"x": -30}]}, {"rows": [{"x": 13}]}, {"rows": [{"x": 1.5}]})
        assert [call(server, "POST", PREDICT, b)[0] for b in bodies] == [200, 200, 500, 422]
        e2e = dep.stats().loc["(end to end)"]
        assert (e2e["requests"], e2e["errors"]) == (3, 1)
        wait_until(lambda: len(dep.recent(600)) == 3, "the workers to report the 3 requests")
        assert max(s for _, s in dep.recent(600)) >= 0.030   # the one whose operator slept 30 ms


@pytest.mark.parametrize("where", ["client", "workers"])
def test_overload_is_503_with_retry_after(client, make_cluster, where):
    """Served by the client, ``max_inflight`` bounds the deployment's requests; served by the
    workers, each worker's (one worker here: connections to a shared port go to any of them)."""
    cluster = client if where == "client" else make_cluster(n_workers=1)
    with fk.deploy(build(), cluster=cluster, max_inflight=2) as dep, dep.serve(where=where) as server:
        results = []

        def slow():
            results.append(call(server, "POST", PREDICT, {"rows": [{"x": -400}]})[0])

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: server.inflight == 2, "both slow requests to be in flight")
        status, body, headers = call(server, "POST", PREDICT, {"rows": [{"x": 1}]})
        for t in threads:
            t.join()
    assert status == 503 and headers.get("retry-after") == "1" and body["type"] == "Overloaded"
    assert results == [200, 200]


def test_a_new_max_inflight_holds_on_the_workers_own_endpoints_at_once(make_cluster, tmp_path):
    """Lowering ``dep.max_inflight`` (as a live re-plan sheds earlier) while the workers serve
    HTTP: their endpoints shed beyond the new limit, not the one they started with."""
    gate, path = tmp_path / "gate", "/v1/flows/held/predict"
    flow = fk.Flow("held", {"x": int, "s": str})
    flow.map(held, names=["y"])
    with fk.deploy(flow, cluster=make_cluster(n_workers=1), max_inflight=10) as dep, \
            dep.serve(where="workers") as server:
        assert server.max_inflight == [10]
        dep.max_inflight = 1
        wait_until(lambda: server.max_inflight == [1], "the worker to take the new limit")
        results = []
        first = threading.Thread(target=lambda: results.append(call(server, "POST", path, {"rows": [{"x": 2, "s": str(gate)}]})))
        first.start()
        try:
            wait_until(lambda: server.inflight == 1, "the held request to be in flight")
            status, body, _ = call(server, "POST", path, {"rows": [{"x": 3, "s": str(gate)}]})
        finally:
            open_gate(gate)
            first.join()
    assert status == 503 and body["type"] == "Overloaded" and "max_inflight=1" in body["error"]
    assert results[0][0] == 200 and results[0][1]["rows"][0]["y"] == 4
    with pytest.raises(fk.FlowError, match="max_inflight must be a whole number"):
        dep.max_inflight = 0


def test_a_request_that_times_out_or_whose_client_hangs_up_is_cancelled_on_its_worker(client, tmp_path):
    flow = fk.Flow("patient", {"x": int, "s": str})
    flow.map(patient, names=["y"])
    with fk.deploy(flow, cluster=client) as dep, dep.serve(timeout=0.3) as server:
        marker = tmp_path / "marker"
        status, body, _ = call(server, "POST", "/v1/flows/patient/predict", {"rows": [{"x": 1, "s": str(marker)}]})
        assert status == 504 and body["type"] == "AnswerTimeout"
        assert ended(marker) == "cancelled"   # the worker stopped it, rather than working on for nobody
        assert dep.stats().loc["(end to end)", "cancelled"] == 1

        marker = tmp_path / "hung-up"   # a client that hangs up while its request runs: the same
        body = json.dumps({"rows": [{"x": 2, "s": str(marker)}]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/flows/patient/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: server.inflight == 1, "the request to be running")
        sock.close()
        assert ended(marker) == "cancelled"
        assert dep.stats().loc["(end to end)", "cancelled"] == 2 and server.counts[("patient", 499)] == 1


class Opaque:
    pass


def circular() -> list:
    loop = []
    loop.append(loop)
    return loop


RESULTS = {"containers": lambda: {"tags": {"b"}, "pair": (1, 2)}, "opaque": Opaque, "inf": lambda: float("inf"),
           "inf in an array": lambda: np.array([1.0, np.inf]), "nan": lambda: float("nan"),
           "numpy nan": lambda: np.float32("nan"), "nan in an array": lambda: np.array([[1.5, np.nan]]),
           "nan in a list": lambda: [0.5, float("nan")], "circular": circular, "exit": lambda: sys.exit(3)}


def result(row):
    return RESULTS[row["kind"]]()


@pytest.fixture(scope="module")
def results(client):
    flow = fk.Flow("results", {"kind": str})
    flow.map(result, names=["v"])
    with fk.deploy(flow, cluster=client) as dep, dep.serve() as server:
        yield server


@pytest.mark.parametrize("kind, value", [("containers", {"tags": ["b"], "pair": [1, 2]}), ("nan", None),
                                         ("numpy nan", None), ("nan in an array", [[1.5, None]]),
                                         ("nan in a list", [0.5, None])])
def test_results_are_written_as_json_with_nan_as_null(results, kind, value):
    status, body, _ = call(results, "POST", "/v1/flows/results/predict", {"rows": [{"kind": kind}]})
    assert (status, body["rows"][0]["v"]) == (200, value)


@pytest.mark.parametrize("kind", ["opaque", "inf", "inf in an array"])
def test_a_result_json_cannot_carry_is_a_500_naming_its_column(results, kind):
    status, body, _ = call(results, "POST", "/v1/flows/results/predict", {"rows": [{"kind": kind}]})
    assert (status, body["type"], body["column"]) == (500, "BadResult", "v")


def test_any_failure_is_a_json_500_never_a_traceback(results):
    status, body, headers = call(results, "POST", "/v1/flows/results/predict", {"rows": [{"kind": "circular"}]})
    assert status == 500 and headers["content-type"] == "application/json" and body["type"] == "RecursionError"
    assert "Traceback" not in body["error"]


def test_an_operator_that_exits_is_a_json_500_naming_it(results):
    status, body, headers = call(results, "POST", "/v1/flows/results/predict", {"rows": [{"kind": "exit"}]})
    assert status == 500 and headers["content-type"] == "application/json"
    assert (body["type"], body["operator"], body["qid"]) == ("OperatorError", "result", 0)
    assert call(results, "POST", "/v1/flows/results/predict", {"rows": [{"kind": "nan"}]})[0] == 200


def quoted(row) -> int:
    return row["x"]


quoted.__name__ = 'say "hi" \\ now'   # an operator is named after its function, whatever that is


def test_metrics_label_values_are_escaped_and_any_flow_name_is_a_route(client):
    flow = fk.Flow("v1.2~odd_name-ok", {"x": int})
    flow.map(quoted, names=["y"])
    with fk.deploy(flow, cluster=client) as dep, dep.serve() as server:
        assert call(server, "POST", "/v1/flows/v1.2~odd_name-ok/predict", {"rows": [{"x": 1}]})[0] == 200
        status, text, _ = call(server, "GET", "/metrics")
    assert 'flowkit_stage_requests_total{flow="v1.2~odd_name-ok",stage="say \\"hi\\" \\\\ now"' in text


@pytest.mark.parametrize("name", ["a/b", 'say"hi', "two words", ".", "..", ".hidden", "-dash", "naïve", "a?b", "a#b",
                                  "%2F", "a\nb"])
def test_a_flow_name_that_cannot_be_a_url_path_segment_is_refused_when_the_flow_is_built(name):
    with pytest.raises(fk.FlowError):
        fk.Flow(name, {"x": int})


@pytest.mark.parametrize("error, status", [(fk.SchemaError("s", "c"), 422), (fk.OperatorError("op", 3, ValueError()), 500),
                                           (fk.Overloaded(), 503), (fk.WorkerLost(), 503), (fk.NoWorkers(), 503),
                                           (fk.DeploymentClosed(), 410), (fk.FlowError(), 500), (KeyError(), 500),
                                           (SystemExit(3), 500)])
def test_errors_are_answered_by_their_type_with_retry_after_where_retrying_helps(error, status):
    got, body, headers = error_answer(error)
    assert (got, body["type"]) == (status, type(error).__name__)
    assert headers.get("Retry-After") == ("1" if status == 503 else None)


def test_a_closed_deployment_is_410_as_json(client):
    with fk.deploy(build(), cluster=client) as dep, HTTPServer({"double": dep}) as server:
        dep.close()   # the server is not the deployment's own (dep.serve), so it stays up
        status, body, _ = call(server, "POST", PREDICT, {"rows": [{"x": 1}]})
        assert (status, body["type"]) == (410, "DeploymentClosed")
        assert call(server, "GET", "/metrics")[0] == 410


def test_health_flows_and_metrics(served):
    _, server = served
    status, body, _ = call(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["workers"]["double"] >= 1
    status, body, _ = call(server, "GET", "/v1/flows")
    assert body["double"]["input"] == {"x": "int", "tag": "bytes"} and body["double"]["output"] == {"y": "int"}
    status, text, _ = call(server, "GET", "/metrics")
    # (served by the workers, each worker's series also carry its address: worker="tcp://...")
    assert status == 200 and re.search(r'^flowkit_http_responses_total\{flow="double",status="200"[,}]', text, re.M)
    assert re.search(r'^flowkit_stage_requests_total\{flow="double",stage="work"[,}]', text, re.M)
    assert re.search(r'^flowkit_stage_latency_ms\{flow="double",stage="work".*quantile="0.99"\}', text, re.M)


def test_a_bearer_token_is_required_checked_and_never_shown(client, caplog):
    secret = "s3cr3t-token-value"
    with caplog.at_level(logging.DEBUG), fk.deploy(build(), cluster=client) as dep, dep.serve(token=secret) as server:
        assert call(server, "POST", PREDICT, {"rows": [{"x": 1}]})[0] == 401
        assert call(server, "POST", PREDICT, {"rows": [{"x": 1}]}, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(server, "GET", "/metrics")[0] == 401
        assert call(server, "POST", PREDICT, {"rows": [{"x": 1}]}, {"Authorization": f"Bearer {secret}"})[0] == 200
        assert secret not in repr(server) and secret not in repr(dep)
    assert secret not in caplog.text


def test_binding_beyond_loopback_needs_a_token_or_a_logged_opt_out(client, caplog):
    with fk.deploy(build(), cluster=client) as dep:
        with pytest.raises(fk.FlowError, match="without authentication"):
            dep.serve(host="0.0.0.0")
        with caplog.at_level(logging.WARNING, logger="flowkit.http"):
            server = dep.serve(host="0.0.0.0", allow_unauthenticated=True)
        server.stop()
    assert "WITHOUT authentication" in caplog.text


def _load(server, n_threads, per_thread, out, resent=None):
    """``n_threads`` clients each sending ``per_thread`` requests on a keep-alive connection;
    ``(status, x, body)`` into ``out``. With ``resent`` (a list), a request whose connection
    broke before its answer is sent again on a new one, and counted there, as an HTTP client
    with retries does."""
    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for i in range(per_thread):
            x = k * 1000 + i
            while True:
                try:
                    conn.request("POST", PREDICT, json.dumps({"rows": [{"x": x if x != 13 else 14}]}).encode(),
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    body = json.loads(r.read())
                    break
                except (ConnectionError, http.client.RemoteDisconnected):
                    if resent is None:
                        raise
                    resent.append(x)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            out.append((r.status, x, body))
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    return threads


def test_a_bounded_load_loses_nothing_and_memory_stays_flat(served):
    _, server = served
    warm = []
    for t in _load(server, 4, 25, warm):
        t.join()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = []
    for t in _load(server, 8, 100, out):
        t.join(120)
    assert len(out) == 800 and all(s == 200 for s, _, _ in out)
    assert all(b["rows"][0]["y"] == 2 * (x if x != 13 else 14) for _, x, b in out)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 50, grown_mb


def test_a_worker_killed_during_load_loses_no_request(client):
    """Served by the client, requests the killed worker held are sent to another worker."""
    with fk.deploy(build(), cluster=client) as dep, dep.serve(where="client") as server:
        pids = list(client.run(os.getpid).values())
        out = []
        threads = _load(server, 6, 60, out)
        wait_until(lambda: len(out) >= 30, "the load to be under way")
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert len(out) == 360
        assert all(s == 200 or (s, b["type"]) == (503, "WorkerLost") for s, _, b in out)
        assert sum(s == 200 for s, _, _ in out) >= 350
    client.wait_for_workers(2, timeout=60)


def test_a_worker_killed_while_serving_http_itself_drops_only_its_connections(client):
    """Served by the workers, the killed worker's connections break (its requests were in that
    process); a client sending again reaches the workers left, and the restarted worker serves
    on the same port again: every request is answered, correctly."""
    with fk.deploy(build(), cluster=client) as dep, dep.serve(where="workers") as server:
        wait_until(lambda: len(server.serving) == 2, "both workers to serve")
        pids = list(client.run(os.getpid).values())
        out, resent = [], []
        threads = _load(server, 6, 60, out, resent)
        wait_until(lambda: len(out) >= 30, "the load to be under way")
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert len(out) == 360 and [(s, b) for s, _, b in out if s != 200] == []
        assert all(b["rows"][0]["y"] == 2 * (x if x != 13 else 14) for _, x, b in out)
        client.wait_for_workers(2, timeout=60)
        wait_until(lambda: len([a for a in server.serving if a in dep.workers]) == 2,
                   "the restarted worker to serve again")
        assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def test_shutdown_finishes_requests_in_flight_then_refuses(client):
    with fk.deploy(build(), cluster=client) as dep:
        server = dep.serve()
        results = []
        threads = [threading.Thread(target=lambda: results.append(call(server, "POST", PREDICT, {"rows": [{"x": -500}]})[0]))
                   for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: server.inflight == 3, "three requests to be in flight")
        server.stop(timeout=60)
        for t in threads:
            t.join()
        assert results == [200, 200, 200]
        with pytest.raises(OSError):
            call(server, "GET", "/healthz")


def flowkit_serve(processes, *args, cwd, env=None) -> tuple[int, str]:
    """Run ``flowkit serve`` to its end: (exit status, stderr). Stopped with the test if it hangs."""
    proc = processes.start([sys.executable, "-m", "flowkit", "serve", *args], stderr=subprocess.PIPE, text=True,
                           cwd=cwd, env=env)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_flowkit_serve_command_serves_a_flow_and_stops_gracefully(tmp_path, processes):
    module = tmp_path / "app.py"
    module.write_text("import flowkit as fk\n\ndef inc(row) -> int:\n    return row['x'] + 1\n\n"
                      "flow = fk.Flow('inc', {'x': int})\nflow.map(inc, names=['y'])\n")
    proc = processes.start([sys.executable, "-m", "flowkit", "serve", f"{module}:flow", "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    line = proc.stdout.readline()
    assert line.startswith("serving 'inc' at http://127.0.0.1:") and line.rstrip().endswith("/v1/flows/inc/predict")
    port = int(line.split("127.0.0.1:")[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/flows/inc/predict", json.dumps({"rows": [{"x": 41}]}).encode())
    assert json.loads(conn.getresponse().read())["rows"][0]["y"] == 42
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.mark.parametrize("target, words", [
    ("nowhere_module:flow", "no module 'nowhere_module' importable from"),
    ("missing.py:flow", "no file 'missing.py'"),
    ("app.py", "give MODULE:FLOW"),
    ("app.py:flw", "app.py has no 'flw'; its flows: flow"),
    ("app.py:inc", "app.py:inc takes arguments (row); give a Flow, or a function of no arguments"),
    ("app.py:answer", "app.py:answer is of type int, not a flowkit Flow; its flows: flow"),
])
def test_flowkit_serve_says_what_is_wrong_with_its_target(tmp_path, monkeypatch, target, words):
    from flowkit.__main__ import load_flow

    (tmp_path / "app.py").write_text("import flowkit as fk\n\ndef inc(row) -> int:\n    return row['x'] + 1\n\n"
                                     "answer = 42\nflow = fk.Flow('inc', {'x': int})\nflow.map(inc, names=['y'])\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_flow(target)
    assert load_flow("app.py:flow").name == "inc"


def test_flowkit_serve_says_in_one_line_when_its_cluster_is_not_there(tmp_path, processes):
    (tmp_path / "app.py").write_text("import flowkit as fk\nflow = fk.Flow('inc', {'x': int})\n"
                                     "flow.map(abs, col='x')\n")
    status, err = flowkit_serve(processes, "app.py:flow", "--cluster", "tcp://127.0.0.1:9", "--timeout", "1",
                                "--port", "0", cwd=tmp_path)
    assert status != 0 and "Traceback" not in err
    assert err.strip().startswith("flowkit serve: no dask scheduler answered at 'tcp://127.0.0.1:9' within 1 s")


@pytest.mark.parametrize("flags, words", [
    (["--host", "0.0.0.0", "--port", "0"], "set $FLOWKIT_TOKEN to a bearer token, or pass --allow-unauthenticated"),
    (["--port", "{taken}"], "pass --port 0 for a free port"),
])
def test_flowkit_serve_refuses_in_its_own_flags_before_it_starts_a_cluster(tmp_path, processes, flags, words):
    """The cluster address answers nothing: had the command tried it first, it would say so instead."""
    (tmp_path / "app.py").write_text("import flowkit as fk\nflow = fk.Flow('inc', {'x': int})\n"
                                     "flow.map(abs, col='x')\n")
    env = {k: v for k, v in os.environ.items() if k != "FLOWKIT_TOKEN"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        flags = [f.format(taken=taken.getsockname()[1]) for f in flags]
        status, err = flowkit_serve(processes, "app.py:flow", "--cluster", "tcp://127.0.0.1:9", "--timeout", "1",
                                    *flags, cwd=tmp_path, env=env)
    assert status != 0 and err.startswith("flowkit serve: ") and "Traceback" not in err
    assert err.strip().endswith(words)


def test_a_deployment_on_a_tls_secured_cluster_works_end_to_end(make_cluster):
    from distributed.security import Security

    c = make_cluster(n_workers=1, security=Security.temporary())
    assert c.cluster.scheduler_address.startswith("tls://")
    with fk.deploy(build(), cluster=c) as dep:
        assert all(w.startswith("tls://") for w in dep.workers)
        assert dep.run({"x": [1, 2]}).column("y") == [2, 4]
        # with TLS, request sessions stay on dask's (encrypted) comm, never the framed plain-TCP one
        assert {type(s.comm).__name__ for s in dep._router.sessions.values()} == {"TLS"}
        with dep.serve() as server:
            assert call(server, "POST", PREDICT, {"rows": [{"x": 4}]})[1]["rows"][0]["y"] == 8
