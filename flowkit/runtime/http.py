"""The HTTP front door: one or more deployments served over HTTP (Starlette on uvicorn).

    server = dep.serve(host="127.0.0.1", port=0)      # server.url
    POST {url}/v1/flows/<name>/predict   {"rows": [{...}, ...]} or {"columns": {"col": [...]}} or [{...}]
    GET  {url}/healthz     GET {url}/v1/flows     GET {url}/metrics (Prometheus text)

What travels as JSON, and which error is which status, is ``http_codec``'s. Every error is
answered as JSON; anything not flowkit's is also logged with its traceback, which the client
never sees. ``HTTPServer`` serves anything that looks like a deployment (``plan``, ``submit``,
``workers``, ``stats``): a ``Deployment`` in the client process, or a worker's own
``ingress.LocalEndpoint``.

Security: the server binds to loopback by default. Binding elsewhere needs a bearer token
(compared in constant time) or ``allow_unauthenticated=True``, which is logged. The token never
appears in logs or reprs. Stopping the server stops accepting, lets requests in flight finish
(bounded by ``timeout``), then closes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import threading
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import FlowError, SchemaError
from ..table import Table
from .http_codec import (AnswerTimeout, BadResult, BodyTimeout, BodyTooLarge, ClientGone, Refused, Unauthorized,
                         UnknownFlow, bad_result, decode_rows, encode_table, error_answer, label_value, parse_json,
                         schema_json)

__all__ = ["HTTPServer", "require_authentication", "bind"]

logger = logging.getLogger("flowkit.http")

WATCH_AFTER_S = 0.02   # a request still running after this long is watched for its client hanging up
DISCARD_MAX_BYTES = 64 * 2 ** 20   # how much of a body over the limit is read and dropped before the 413
CLOSE = {"Connection": "close"}


# -- the server ---------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_authentication(host: str, token: str | None, allow_unauthenticated: bool,
                           hint: str = "pass token=... or allow_unauthenticated=True") -> None:
    """Refuse (``FlowError``, ending with ``hint``) to serve beyond loopback without a token,
    unless the caller opted out (which is logged)."""
    if not _is_loopback(host) and not token:
        if not allow_unauthenticated:
            raise FlowError(f"refusing to serve on {host!r} without authentication: {hint}")
        logger.warning("serving on %s WITHOUT authentication (allow_unauthenticated=True)", host)


def bind(host: str, port: int, hint: str = "pass port=0 for a free port", *, shared: bool = False) -> socket.socket:
    """A socket bound to ``host:port`` for the server to listen on; a ``FlowError`` (ending
    with ``hint`` when a port was named) if it cannot be. ``shared``: with ``SO_REUSEPORT``, so
    that the worker processes of one host serve one port, the kernel spreading connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # Accepted connections inherit TCP_NODELAY from the listening socket. Without it a
    # response's header and body segments wait on the client's delayed ACK: 44 ms per request
    # on a keep-alive connection here, instead of 0.3 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FlowError(f"cannot serve on {host}:{port}: {e.strerror or e}" + (f"; {hint}" if port else "")) from e
    return sock


async def read_body(request: Request, limit: int) -> bytearray:
    """The request's body; ``BodyTooLarge`` when it is over ``limit`` bytes, ``ClientGone`` when
    the client leaves before sending all of it.

    A body over the limit is read to its end and dropped (up to ``DISCARD_MAX_BYTES`` more)
    before the 413 goes out: a client that sends its whole body before reading (``urllib``)
    would otherwise find its connection reset instead of the answer. A client that announced
    more than that, or that waits for ``100 Continue``, is answered at once and disconnected."""
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else 0
    waiting = request.headers.get("expect", "").lower() == "100-continue"   # it sends nothing unless told to
    if declared > limit + DISCARD_MAX_BYTES or (declared > limit and waiting):
        raise BodyTooLarge(f"body of {declared} bytes is over the limit of {limit}", headers=CLOSE)
    body, size = bytearray(), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > limit + DISCARD_MAX_BYTES:
                raise BodyTooLarge(f"body is over the limit of {limit} bytes", headers=CLOSE)
    except ClientDisconnect:
        raise ClientGone("the client closed the connection before sending its whole body") from None
    if size > limit:
        raise BodyTooLarge(f"body of {size} bytes is over the limit of {limit}")
    return body


class HTTPServer:
    """A running HTTP front door for one or more deployments (``dep.serve()`` makes one).

    ``max_body_bytes`` bounds a request's body (413 past it); ``body_timeout`` the seconds a
    body may take to arrive in full after its headers (408 and the connection closed after it:
    a client that sends half a body does not hold its connection); ``timeout`` the seconds a
    request waits for its answer (504). ``sock``: a socket from ``bind()`` to serve on instead
    of binding ``host:port`` (``flowkit serve`` binds before it deploys)."""

    def __init__(self, deployments: dict, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 allow_unauthenticated: bool = False, max_body_bytes: int = 10 * 2 ** 20, timeout: float = 30.0,
                 body_timeout: float = 30.0, sock: socket.socket | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, worker: str | None = None):
        require_authentication(host, token, allow_unauthenticated)
        self.deployments = deployments
        self.worker = worker   # the worker serving, where one does (a label of its metrics)
        self.host = host
        self._token = token.encode() if token else None
        self.max_body = max_body_bytes
        self.request_timeout = timeout
        self.body_timeout = body_timeout
        self.counts: dict[tuple[str, int], int] = {}
        self.inflight = 0
        self._sock = sock if sock is not None else bind(host, port)
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

        # log_config=None: uvicorn leaves the process's logging set-up alone (a worker's, a notebook's)
        config = uvicorn.Config(self._app(), log_level="warning", log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=self.request_timeout, timeout_keep_alive=30)
        self._server = _server(config)
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

    def stop(self, timeout: float | None = None, wait: bool = True) -> None:
        """Stop accepting, let requests in flight finish (at most ``timeout`` s), then close;
        ``wait=False`` only starts that (on the server's own event loop, which must not block)."""
        if self._server is None:
            return
        if timeout is not None:
            self._server.config.timeout_graceful_shutdown = timeout
        self._server.should_exit = True
        if not wait:
            return
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
    def _app(self) -> Starlette:
        predict = self._counted(self._answering_errors(self._predict))
        return Starlette(routes=[Route("/v1/flows/{name}/predict", predict, methods=["POST"]),
                                 Route("/healthz", self._answering_errors(self._healthz)),
                                 Route("/v1/flows", self._answering_errors(self._flows)),
                                 Route("/metrics", self._answering_errors(self._metrics))])

    @staticmethod
    def _answering_errors(endpoint):
        """``endpoint`` answering whatever it raises as JSON (``error_answer``); an exception
        that is not flowkit's is also logged with its traceback: it is a bug to look into.
        ``SystemExit`` and ``KeyboardInterrupt`` here come from a request, never from this
        thread's own signals: they are answered too, not let through to stop the server."""
        async def answering(request: Request) -> Response:
            try:
                return await endpoint(request)
            except (Exception, SystemExit, KeyboardInterrupt) as e:
                if not isinstance(e, (FlowError, Refused)):
                    logger.error("%s %s failed", request.method, request.url.path, exc_info=e)
                status, body, headers = error_answer(e)
                return JSONResponse(body, status_code=status, headers=headers)
        return answering

    def _counted(self, endpoint):
        """``endpoint`` counting its answers by flow and status (for /metrics), and telling a
        deployment that keeps its own end-to-end times (a worker's ``LocalEndpoint.answered``)
        how long each took here: from the handler's start (headers parsed) to the answer's
        bytes, so reading, decoding and encoding count too."""
        async def counting(request: Request) -> Response:
            t0 = time.perf_counter()
            response = await endpoint(request)
            name = request.path_params["name"]
            key = (name, response.status_code)
            self.counts[key] = self.counts.get(key, 0) + 1
            answered = getattr(self.deployments.get(name), "answered", None)
            if answered is not None:
                answered(time.perf_counter() - t0, response.status_code)
            return response
        return counting

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        if not hmac.compare_digest(given, self._token):
            raise Unauthorized("missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _predict(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["name"]
        dep = self.deployments.get(name)
        if dep is None:
            raise UnknownFlow(f"no flow {name!r}; the flows are {sorted(self.deployments)}")
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await read_body(request, self.max_body)
        except TimeoutError:
            raise BodyTimeout(f"the body did not arrive within {self.body_timeout:g} s", headers=CLOSE) from None
        rows = decode_rows(parse_json(body), dep.plan.source.schema)
        fut = dep.submit(rows)
        self.inflight += 1
        try:
            table = await self._answer_or_hang_up(request, fut)
        except SchemaError as e:   # the flow's own rows broke a declared type: the server's fault
            raise BadResult(str(e), column=e.column) from e
        finally:
            self.inflight -= 1
        try:
            return JSONResponse(encode_table(table))
        except (TypeError, ValueError):
            raise bad_result(table) from None

    async def _answer_or_hang_up(self, request: Request, fut) -> Table:
        """The request's answer; ``AnswerTimeout`` after the timeout, ``ClientGone`` when the
        client hangs up first. Either way the request is cancelled on its worker (the
        cancellation of ``answer`` reaches ``fut``): nobody is waiting for it any more. The
        hang-up is watched only once a request has taken ``WATCH_AFTER_S``: most answer
        sooner, and a watcher task per request costs the loop (it serves every request)."""
        answer = asyncio.wrap_future(fut)
        t0 = time.monotonic()
        await asyncio.wait((answer,), timeout=min(WATCH_AFTER_S, self.request_timeout))
        if answer.done():
            return answer.result()
        gone = asyncio.ensure_future(_hang_up(request.receive))
        try:
            left = max(0.0, self.request_timeout - (time.monotonic() - t0))
            done, _ = await asyncio.wait((answer, gone), timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer in done:
            return answer.result()
        answer.cancel()
        if gone in done:
            raise ClientGone("the client hung up before the answer")
        raise AnswerTimeout(f"no answer within {self.request_timeout:g} s")

    async def _healthz(self, request: Request) -> Response:
        workers = {n: len(d.workers) for n, d in self.deployments.items()}
        ok = all(workers.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "workers": workers}, status_code=200 if ok else 503)

    async def _flows(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({n: {"input": schema_json(d.plan.source.schema), "output": schema_json(d.plan.schema),
                                 "stages": [op.name for op in d.plan.stages()]} for n, d in self.deployments.items()})

    async def _metrics(self, request: Request) -> Response:
        self._authorize(request)
        text = await asyncio.get_running_loop().run_in_executor(None, self.metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def metrics_text(self) -> str:
        """Prometheus text: HTTP responses by status, and per-stage counts and latency."""
        lines = ["# HELP flowkit_http_responses_total HTTP responses by flow and status.",
                 "# TYPE flowkit_http_responses_total counter"]
        at = f',worker="{label_value(self.worker)}"' if self.worker else ""
        for (flow, status), n in sorted(list(self.counts.items())):  # list(): one atomic copy; the loop thread writes
            lines.append(f'flowkit_http_responses_total{{flow="{label_value(flow)}",status="{status}"{at}}} {n}')
        lines += ["# HELP flowkit_stage_requests_total Requests per stage.", "# TYPE flowkit_stage_requests_total counter",
                  "# HELP flowkit_stage_errors_total Errors per stage.", "# TYPE flowkit_stage_errors_total counter",
                  "# HELP flowkit_stage_latency_ms Stage latency percentiles over recent requests.",
                  "# TYPE flowkit_stage_latency_ms gauge"]
        for flow, dep in self.deployments.items():
            for _, row in dep.stats().iterrows():
                labels = f'flow="{label_value(flow)}",stage="{label_value(row["stage"])}"{at}'
                lines.append(f"flowkit_stage_requests_total{{{labels}}} {int(row['requests'])}")
                lines.append(f"flowkit_stage_errors_total{{{labels}}} {int(row['errors'])}")
                for q, col in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                    v = row[col]
                    if v == v:
                        lines.append(f'flowkit_stage_latency_ms{{{labels},quantile="{q}"}} {v:.4f}')
        lines.append(f"flowkit_http_inflight{{{at[1:]}}} {self.inflight}" if at else f"flowkit_http_inflight {self.inflight}")
        lines.append(f"flowkit_scrape_timestamp_seconds {time.time():.3f}")
        return "\n".join(lines) + "\n"


def _server(config):
    """uvicorn's server, minus its signal handlers: it runs inside processes that own their
    signals (a dask worker, whose event loop runs in its main thread; a notebook kernel)."""
    import contextlib

    import uvicorn

    class QuietServer(uvicorn.Server):
        def capture_signals(self):
            return contextlib.nullcontext()

    return QuietServer(config)


async def _hang_up(receive) -> None:
    """Return when the client hangs up: once the body is read, the server's next message is that."""
    while (await receive())["type"] != "http.disconnect":
        pass
