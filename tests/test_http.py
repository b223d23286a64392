"""The HTTP front door with real clients on loopback: every status code, auth, load, faults,
graceful shutdown, the command line, and a deployment on a TLS-secured dask cluster."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
from distributed import Client, LocalCluster

import flowkit as fk


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
def client():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


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


@pytest.mark.parametrize("raw, status, words", [
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"rows": [{"x": "one"}]}).encode(), 422, "column 'x' expects int, found str"),
    (json.dumps({"rows": [{"z": 1}]}).encode(), 422, "unexpected column 'z'"),
    (json.dumps({"rows": [{"x": 1, "tag": "%%%"}]}).encode(), 422, "column 'tag' expects bytes as a base64 string"),
    (json.dumps({"rows": [{"x": 1}] * 3000}).encode(), 413, "over the limit"),
])
def test_bad_input_gets_a_clear_status(served, raw, status, words):
    _, server = served
    got, body, _ = call(server, "POST", PREDICT, raw=raw)
    assert got == status and words in body["error"]
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200   # nothing disturbed


def test_a_port_in_use_is_said_plainly(served):
    dep, server = served
    with pytest.raises(fk.FlowError, match=f"cannot serve on 127.0.0.1:{server.port}: .*pass port=0 for a free port"):
        dep.serve(port=server.port)
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def test_array_columns_take_nested_lists_of_numbers_and_nothing_else():
    import numpy as np

    from flowkit.runtime.http import decode_rows
    from flowkit.schema import Schema

    schema = Schema({"a": np.ndarray})
    (row,) = decode_rows({"rows": [{"a": [[1.5, 2.0], [3.0, 4.0]]}]}, schema)
    assert row["a"].shape == (2, 2) and row["a"].dtype == np.float32
    for bad in ("a string", [[1, 2], [3]], [{"x": 1}]):
        with pytest.raises(fk.SchemaError, match="column 'a' expects an array as nested lists of numbers"):
            decode_rows({"rows": [{"a": bad}]}, schema)


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
    import socket

    _, server = served
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"rows\": [")
    time.sleep(0.2)
    sock.close()   # 90 bytes short
    deadline = time.monotonic() + 10
    while server.counts.get(("double", 499), 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.counts.get(("double", 499)) == 1
    assert call(server, "POST", PREDICT, {"rows": [{"x": 3}]})[0] == 200


def test_overload_is_503_with_retry_after(client):
    with fk.deploy(build(), cluster=client, max_inflight=2) as dep, dep.serve() as server:
        results = []

        def slow():
            results.append(call(server, "POST", PREDICT, {"rows": [{"x": -400}]})[0])

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.15)
        status, body, headers = call(server, "POST", PREDICT, {"rows": [{"x": 1}]})
        for t in threads:
            t.join()
    assert status == 503 and headers.get("retry-after") == "1" and "max_inflight=2" in body["error"]
    assert results == [200, 200]


def test_a_request_that_times_out_or_whose_client_hangs_up_is_cancelled_on_its_worker(client, tmp_path):
    from .test_deploy import ended, patient

    flow = fk.Flow("patient", {"x": int, "s": str})
    flow.map(patient, names=["y"])
    with fk.deploy(flow, cluster=client) as dep, dep.serve(timeout=0.3) as server:
        marker = tmp_path / "marker"
        status, body, _ = call(server, "POST", "/v1/flows/patient/predict", {"rows": [{"x": 1, "s": str(marker)}]})
        assert status == 504 and "no answer within 0.3 s" in body["error"]
        assert ended(marker) == "cancelled"   # the worker stopped it, rather than working on for nobody
        assert dep.stats().loc["(end to end)", "cancelled"] == 1

        import socket   # a client that hangs up while its request runs: the same

        marker = tmp_path / "hung-up"
        body = json.dumps({"rows": [{"x": 2, "s": str(marker)}]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/flows/patient/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.1)
        sock.close()
        assert ended(marker) == "cancelled"
        assert dep.stats().loc["(end to end)", "cancelled"] == 2 and server.counts[("patient", 499)] == 1


class Opaque:
    pass


def containers_and_opaque(row):
    return {"tags": {"b"}, "pair": (1, 2)} if row["x"] else Opaque()


def test_results_are_written_as_json_or_the_column_that_cannot_be_is_named(client):
    flow = fk.Flow("shapes", {"x": int})
    flow.map(containers_and_opaque, names=["v"])
    with fk.deploy(flow, cluster=client) as dep, dep.serve() as server:
        status, body, _ = call(server, "POST", "/v1/flows/shapes/predict", {"rows": [{"x": 1}]})
        assert status == 200 and body["rows"][0]["v"] == {"tags": ["b"], "pair": [1, 2]}
        status, body, _ = call(server, "POST", "/v1/flows/shapes/predict", {"rows": [{"x": 0}]})
        assert status == 500 and body["error"] == "column 'v' of the result holds a Opaque that JSON cannot carry"


def test_health_flows_and_metrics(served):
    _, server = served
    status, body, _ = call(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["workers"]["double"] >= 1
    status, body, _ = call(server, "GET", "/v1/flows")
    assert body["double"]["input"] == {"x": "int", "tag": "bytes"} and body["double"]["output"] == {"y": "int"}
    status, text, _ = call(server, "GET", "/metrics")
    assert status == 200 and 'flowkit_http_responses_total{flow="double",status="200"}' in text
    assert 'flowkit_stage_requests_total{flow="double",stage="work"}' in text
    assert 'flowkit_stage_latency_ms{flow="double",stage="work",quantile="0.99"}' in text


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


def _load(server, n_threads, per_thread, out):
    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for i in range(per_thread):
            x = k * 1000 + i
            conn.request("POST", PREDICT, json.dumps({"rows": [{"x": x if x != 13 else 14}]}).encode(),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
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
    with fk.deploy(build(), cluster=client) as dep, dep.serve() as server:
        pids = list(client.run(os.getpid).values())
        out = []
        threads = _load(server, 6, 60, out)
        time.sleep(0.3)
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert len(out) == 360
        assert all(s == 200 or (s == 503 and "lost" in b["error"]) for s, _, b in out)
        assert sum(s == 200 for s, _, _ in out) >= 350
    client.wait_for_workers(2, timeout=60)


def test_shutdown_finishes_requests_in_flight_then_refuses(client):
    with fk.deploy(build(), cluster=client) as dep:
        server = dep.serve()
        results = []
        threads = [threading.Thread(target=lambda: results.append(call(server, "POST", PREDICT, {"rows": [{"x": -500}]})[0]))
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        t0 = time.time()
        server.stop(timeout=10)
        for t in threads:
            t.join()
        assert results == [200, 200, 200] and time.time() - t0 < 10
        with pytest.raises(OSError):
            call(server, "GET", "/healthz")


def test_flowkit_serve_command_serves_a_flow_and_stops_gracefully(tmp_path):
    module = tmp_path / "app.py"
    module.write_text("import flowkit as fk\n\ndef inc(row) -> int:\n    return row['x'] + 1\n\n"
                      "flow = fk.Flow('inc', {'x': int})\nflow.map(inc, names=['y'])\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flowkit", "serve", f"{module}:flow", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert f"127.0.0.1:{port}/v1/flows/inc/predict" in line, line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/flows/inc/predict", json.dumps({"rows": [{"x": 41}]}).encode())
        assert json.loads(conn.getresponse().read())["rows"][0]["y"] == 42
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


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


def test_flowkit_serve_says_in_one_line_when_its_cluster_is_not_there(tmp_path):
    (tmp_path / "app.py").write_text("import flowkit as fk\nflow = fk.Flow('inc', {'x': int})\n"
                                     "flow.map(abs, col='x')\n")
    done = subprocess.run([sys.executable, "-m", "flowkit", "serve", "app.py:flow", "--cluster", "tcp://127.0.0.1:9",
                           "--timeout", "1"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("flowkit serve: no dask scheduler answered at 'tcp://127.0.0.1:9' within 1 s")


def test_a_deployment_on_a_tls_secured_cluster_works_end_to_end():
    from distributed.security import Security

    security = Security.temporary()
    flow = build()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      security=security) as cluster, Client(cluster, security=security) as c:
        assert cluster.scheduler_address.startswith("tls://")
        with fk.deploy(flow, cluster=c) as dep:
            assert all(w.startswith("tls://") for w in dep.workers)
            assert dep.run({"x": [1, 2]}).column("y") == [2, 4]
            # with TLS, request sessions stay on dask's (encrypted) comm, never the framed plain-TCP one
            assert {type(s.comm).__name__ for s in dep._router.sessions.values()} == {"TLS"}
            with dep.serve() as server:
                assert call(server, "POST", PREDICT, {"rows": [{"x": 4}]})[1]["rows"][0]["y"] == 8
