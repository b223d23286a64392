"""The benchmarks' load generator counts a system's failures, not its own."""

import http.server
import select
import sys
import threading
from pathlib import Path

from .waiting import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loadgen  # noqa: E402

sys.path.pop(0)


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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersThenCloses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ep = loadgen.Endpoint(f"http://127.0.0.1:{server.server_address[1]}/predict", b"{}", timeout=10)
        conn = ep.connect()
        for _ in range(3):
            ok, conn = ep.send(conn)
            assert ok
            wait_until(lambda: select.select([conn.sock], [], [], 0)[0], "the server to close the idle connection")
    finally:
        server.shutdown()
        server.server_close()
