"""The HTTP front door: a deployment served over HTTP (Starlette on uvicorn, in a thread).

    server = dep.serve(host="127.0.0.1", port=0)      # server.url
    POST {url}/v1/flows/<name>/predict   {"rows": [{...}, ...]} or {"columns": {"col": [...]}} or [{...}]
    GET  {url}/healthz     GET {url}/v1/flows     GET {url}/metrics (Prometheus text)

Values travel as JSON: ``bytes`` columns as base64 strings, ``numpy.ndarray`` columns as nested
lists; answers are ``{"rows": [{"qid": ..., <columns>}]}``. Errors: malformed JSON 400, a body over
the limit 413, rows that do not fit the schema 422 (naming the column), overload 503 with
``Retry-After``, an operator's exception 500 (naming the operator, no traceback), an unknown flow
404, a missing or wrong bearer token 401.

Security: the server binds to loopback by default. Binding elsewhere needs a bearer token
(compared in constant time) or ``allow_unauthenticated=True``, which is logged. The token never
appears in logs or reprs. Stopping the server stops accepting, lets requests in flight finish
(bounded by ``timeout``), then closes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any

import numpy as np

from ..errors import FlowError, OperatorError, Overloaded, SchemaError
from ..schema import Schema, type_name
from ..table import Table

__all__ = ["HTTPServer", "decode_rows", "encode_table"]

logger = logging.getLogger("flowkit.http")


# -- JSON <-> tables (pure) -------------------------------------------------------------------------
WATCH_AFTER_S = 0.02   # a request still running after this long is watched for its client hanging up


def _decode_value(v: Any, t: Any, column: str) -> Any:
    if v is None:
        return None
    if t is bytes:
        if not isinstance(v, str):
            raise SchemaError(f"column {column!r} expects bytes as a base64 string, found {type(v).__name__}", column)
        try:
            return base64.b64decode(v, validate=True)
        except Exception:
            raise SchemaError(f"column {column!r} expects bytes as a base64 string; it is not valid base64",
                              column) from None
    if t is np.ndarray:
        try:
            a = np.asarray(v, dtype=np.float32 if _is_float_list(v) else None)
        except Exception:
            a = None
        if a is None or a.dtype.kind not in "biuf":
            raise SchemaError(f"column {column!r} expects an array as nested lists of numbers, found "
                              f"{type(v).__name__}", column)
        return a
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _is_float_list(v) -> bool:
    while isinstance(v, list) and v:
        v = v[0]
    return isinstance(v, float)


def decode_rows(payload: Any, schema: Schema) -> list[dict]:
    """The request's rows as dicts of Python values (bytes and arrays decoded), checked for shape.

    >>> from flowkit.schema import Schema
    >>> decode_rows({"rows": [{"img": "aGk="}]}, Schema({"img": bytes}))
    [{'img': b'hi'}]
    >>> decode_rows({"columns": {"x": [1, 2]}}, Schema({"x": int}))
    [{'x': 1}, {'x': 2}]
    """
    if isinstance(payload, dict) and "rows" in payload:
        rows = payload["rows"]
    elif isinstance(payload, dict) and "columns" in payload:
        cols = payload["columns"]
        if not isinstance(cols, dict) or not all(isinstance(v, list) for v in cols.values()):
            raise SchemaError('"columns" must map column names to lists of values')
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise SchemaError(f"columns have different lengths: { {k: len(v) for k, v in cols.items()} }")
        n = lengths.pop() if lengths else 0
        rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    elif isinstance(payload, list):
        rows = payload
    elif isinstance(payload, dict):
        rows = [payload]
    else:
        raise SchemaError('send {"rows": [...]}, {"columns": {...}} or a list of rows')
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SchemaError("each row must be a JSON object of column values")
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k not in schema.index:
                raise SchemaError(f"unexpected column {k!r}; the flow's input has {list(schema.names)}", column=k)
            row[k] = _decode_value(v, schema[k], k)
        out.append(row)
    return out


def _encode_value(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    if hasattr(v, "tolist") and type(v).__name__ == "Tensor":
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _encode_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_encode_value(x) for x in v]
    return v


def _unencodable(table: Table) -> str:
    """Which column of ``table`` holds a value JSON cannot carry, and of what type (slow: for the error)."""
    for name in table.schema.names:
        for value in table.column(name):
            try:
                json.dumps(_encode_value(value))
            except (TypeError, ValueError):
                return f"column {name!r} of the result holds a {type(value).__name__} that JSON cannot carry"
    return "the result cannot be written as JSON"


def encode_table(table: Table) -> dict:
    names = table.schema.names
    return {"rows": [{"qid": _encode_value(q), **{n: _encode_value(v) for n, v in zip(names, r)}}
                     for r, q in zip(table.rows, table.qids)]}


def schema_json(schema: Schema) -> dict:
    return {n: type_name(t) for n, t in schema.items()}


# -- the server ---------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HTTPServer:
    """A running HTTP front door for one or more deployments (``dep.serve()`` makes one)."""

    def __init__(self, deployments: dict, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 allow_unauthenticated: bool = False, max_body_bytes: int = 10 * 2 ** 20, timeout: float = 30.0,
                 loop: asyncio.AbstractEventLoop | None = None):
        if not _is_loopback(host) and not token and not allow_unauthenticated:
            raise FlowError(f"refusing to serve on {host!r} without authentication: pass token=... "
                            f"or allow_unauthenticated=True")
        if not _is_loopback(host) and not token:
            logger.warning("serving on %s WITHOUT authentication (allow_unauthenticated=True)", host)
        self.deployments = deployments
        self.host = host
        self._token = token.encode() if token else None
        self.max_body = max_body_bytes
        self.request_timeout = timeout
        self.counts: dict[tuple[str, int], int] = {}
        self.inflight = 0
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit TCP_NODELAY from the listening socket. Without it a
        # response's header and body segments wait on the client's delayed ACK: 44 ms per request
        # on a keep-alive connection here, instead of 0.3 ms.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise FlowError(f"cannot serve on {host}:{port}: {e.strerror or e}"
                            + ("; pass port=0 for a free port" if port else "")) from e
        self.port = self._sock.getsockname()[1]
        self._server = None
        self._started = threading.Event()
        if loop is not None:
            # Share the deployment router's event loop: a request then never changes threads
            # between the HTTP connection and the worker session.
            self._thread = None
            self._done = asyncio.run_coroutine_threadsafe(self._serve(), loop)
        else:
            self._thread = threading.Thread(target=self._run, daemon=True, name="flowkit-http")
            self._thread.start()
        if not self._started.wait(30):
            raise FlowError("the HTTP server did not start within 30 s")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        auth = "bearer token" if self._token else "no authentication"
        return f"<flowkit HTTP server {self.url} ({', '.join(self.deployments)}; {auth})>"

    # -- lifecycle --------------------------------------------------------------------------------
    async def _serve(self) -> None:
        import uvicorn

        config = uvicorn.Config(self._app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=self.request_timeout, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        try:
            task = asyncio.ensure_future(self._server.serve(sockets=[self._sock]))
            while not self._server.started and not task.done():
                await asyncio.sleep(0.005)
            self._started.set()
            await task
        finally:
            self._started.set()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (at most ``timeout`` s), then close."""
        if self._server is None:
            return
        if timeout is not None:
            self._server.config.timeout_graceful_shutdown = timeout
        self._server.should_exit = True
        wait = (timeout or self.request_timeout) + 10
        if self._thread is not None:
            self._thread.join(wait)
        else:
            try:
                self._done.result(wait)
            except Exception as e:
                logger.debug("HTTP server stopped: %s", e)

    close = stop

    def __enter__(self) -> "HTTPServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the application --------------------------------------------------------------------------
    def _app(self):
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        def error(status: int, message: str, **extra) -> JSONResponse:
            headers = extra.pop("headers", None)
            return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

        def authorized(request) -> bool:
            if self._token is None:
                return True
            header = request.headers.get("authorization", "")
            given = header[7:].encode() if header.lower().startswith("bearer ") else b""
            return hmac.compare_digest(given, self._token)

        async def answer_or_hang_up(request, fut):
            """The request's answer; ``TimeoutError`` after the timeout, ``ClientDisconnect`` when
            the client hangs up first. Either way the request is cancelled on its worker (the
            cancellation of ``answer`` reaches ``fut``): nobody is waiting for it any more. The
            hang-up is watched only once a request has taken ``WATCH_AFTER_S``: most answer
            sooner, and a watcher task per request costs the loop (it serves every request)."""
            answer = asyncio.wrap_future(fut)
            t0 = time.monotonic()
            await asyncio.wait((answer,), timeout=min(WATCH_AFTER_S, self.request_timeout))
            if answer.done():
                return answer.result()
            gone = asyncio.ensure_future(hang_up(request.receive))
            try:
                left = max(0.0, self.request_timeout - (time.monotonic() - t0))
                done, _ = await asyncio.wait((answer, gone), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if answer in done:
                return answer.result()
            answer.cancel()
            raise ClientDisconnect() if gone in done else asyncio.TimeoutError()

        async def hang_up(receive):   # once the body is read, the server's next message is the hang-up
            while (await receive())["type"] != "http.disconnect":
                pass

        async def predict(request):
            name = request.path_params["name"]
            status = 200
            try:
                if not authorized(request):
                    status = 401
                    return error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
                dep = self.deployments.get(name)
                if dep is None:
                    status = 404
                    return error(404, f"no flow {name!r}; the flows are {sorted(self.deployments)}")
                length = request.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    status = 413
                    return error(413, f"body of {length} bytes is over the limit of {self.max_body}")
                body = bytearray()
                try:
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > self.max_body:
                            status = 413
                            return error(413, f"body is over the limit of {self.max_body} bytes")
                except ClientDisconnect:   # the client went away mid-body: nothing to answer, nothing to log
                    status = 499
                    return error(499, "the client closed the connection before sending its whole body")
                try:
                    payload = json.loads(body)
                except (ValueError, UnicodeDecodeError) as e:
                    status = 400
                    return error(400, f"malformed JSON: {e}")
                try:
                    rows = decode_rows(payload, dep.plan.source.schema)
                    fut = dep.submit(rows)
                except SchemaError as e:
                    status = 422
                    return error(422, str(e), column=e.column)
                except Overloaded as e:
                    status = 503
                    return error(503, str(e), headers={"Retry-After": "1"})
                self.inflight += 1
                try:
                    table = await answer_or_hang_up(request, fut)
                except ClientDisconnect:
                    status = 499
                    return error(499, "the client hung up before the answer")
                except OperatorError as e:
                    status = 500
                    return error(500, str(e), operator=e.operator, qid=_encode_value(e.qid))
                except SchemaError as e:
                    status = 500
                    return error(500, str(e), column=e.column)
                except asyncio.TimeoutError:
                    status = 504
                    return error(504, f"no answer within {self.request_timeout:g} s")
                except FlowError as e:
                    status = 503
                    return error(503, str(e), headers={"Retry-After": "1"})
                finally:
                    self.inflight -= 1
                try:
                    return JSONResponse(encode_table(table))
                except (TypeError, ValueError):
                    status = 500
                    return error(500, _unencodable(table))
            finally:
                key = (name, status)
                self.counts[key] = self.counts.get(key, 0) + 1

        async def healthz(request):
            workers = {n: len(d.workers) for n, d in self.deployments.items()}
            ok = all(workers.values())
            return JSONResponse({"status": "ok" if ok else "degraded", "workers": workers}, status_code=200 if ok else 503)

        async def flows(request):
            if not authorized(request):
                return error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
            return JSONResponse({n: {"input": schema_json(d.plan.source.schema), "output": schema_json(d.plan.schema),
                                     "stages": [op.name for op in d.plan.stages()]} for n, d in self.deployments.items()})

        async def metrics(request):
            if not authorized(request):
                return error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(None, self.metrics_text)
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

        return Starlette(routes=[Route("/v1/flows/{name}/predict", predict, methods=["POST"]),
                                 Route("/healthz", healthz), Route("/v1/flows", flows), Route("/metrics", metrics)])

    def metrics_text(self) -> str:
        """Prometheus text: HTTP responses by status, and per-stage counts and latency."""
        lines = ["# HELP flowkit_http_responses_total HTTP responses by flow and status.",
                 "# TYPE flowkit_http_responses_total counter"]
        for (flow, status), n in sorted(list(self.counts.items())):  # list(): one atomic copy; the loop thread writes
            lines.append(f'flowkit_http_responses_total{{flow="{flow}",status="{status}"}} {n}')
        lines += ["# HELP flowkit_stage_requests_total Requests per stage.", "# TYPE flowkit_stage_requests_total counter",
                  "# HELP flowkit_stage_errors_total Errors per stage.", "# TYPE flowkit_stage_errors_total counter",
                  "# HELP flowkit_stage_latency_ms Stage latency percentiles over recent requests.",
                  "# TYPE flowkit_stage_latency_ms gauge"]
        for flow, dep in self.deployments.items():
            for _, row in dep.stats().iterrows():
                stage = str(row["stage"]).replace('"', "'")
                labels = f'flow="{flow}",stage="{stage}"'
                lines.append(f"flowkit_stage_requests_total{{{labels}}} {int(row['requests'])}")
                lines.append(f"flowkit_stage_errors_total{{{labels}}} {int(row['errors'])}")
                for q, col in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                    v = row[col]
                    if v == v:
                        lines.append(f'flowkit_stage_latency_ms{{{labels},quantile="{q}"}} {v:.4f}')
        lines.append(f"flowkit_http_inflight {self.inflight}")
        lines.append(f"flowkit_scrape_timestamp_seconds {time.time():.3f}")
        return "\n".join(lines) + "\n"
