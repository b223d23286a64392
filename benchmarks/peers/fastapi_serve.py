"""Serve ``fastapi_pipeline:app`` as ``uvicorn --workers 2`` does, with one correction.

uvicorn's multi-worker supervisor binds the listening socket itself with ``proto`` 0, and
asyncio only turns TCP_NODELAY on for accepted sockets that say ``IPPROTO_TCP``: with
``--workers N`` on Linux every keep-alive response after the first then waits ~40 ms for the
client's delayed ACK (uvicorn issue 3149, measured here: p50 44 ms with 2 workers, 1.2 ms with
1). Benchmarking that would be measuring a known bug, not FastAPI; so this script binds the
socket as the fix does (``IPPROTO_TCP``, plus TCP_NODELAY on the listener, which accepted
sockets inherit) and hands it to uvicorn's own ``Multiprocess`` supervisor.

    python fastapi_serve.py PORT [WORKERS]

``serve(app, port, workers, factory)`` does the same for another app (benchmarks/peers/servers.py
serves the pipelines with it).
"""

import os
import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess


def main() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    serve("fastapi_pipeline:app", port, workers)


def serve(app: str, port: int, workers: int, factory: bool = False) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    config = uvicorn.Config(app, workers=workers, access_log=False, log_level="warning", factory=factory)
    Multiprocess(config, sockets=[sock]).run()


if __name__ == "__main__":
    main()
