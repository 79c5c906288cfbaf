"""A loopback HTTP server for remote-read tests and the README example: it serves a folder,
honours ``Range: bytes=a-b`` (206) unless told to ignore it, and counts bytes and requests.

Run it by hand (Python 3.11's ``http.server`` ignores Range, which ckpt refuses):
    python3 tests/rangeserver.py FOLDER [PORT]
"""

from __future__ import annotations

import os
import re
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class Counters:
    """What the server sent: body bytes and GET requests (HEAD not counted as bytes)."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.gets = 0
        self.lock = threading.Lock()
        self.drop_after: int | None = None  # close the connection after this many body bytes of a GET

    def reset(self) -> None:
        with self.lock:
            self.bytes_sent = 0
            self.gets = 0


class RangeHandler(SimpleHTTPRequestHandler):
    counters: Counters
    honour_range = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        match = _RANGE.match(self.headers.get("Range", "")) if self.honour_range else None
        start, end = 0, size
        if match:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes" if self.honour_range else "none")
        self.end_headers()
        with self.counters.lock:
            self.counters.gets += 1
        self._send(path, start, end)

    def _send(self, path: str, start: int, end: int) -> None:
        sent = 0
        with open(path, "rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                chunk = fh.read(min(1 << 20, end - pos))
                drop = self.counters.drop_after
                if drop is not None and sent + len(chunk) > drop:
                    chunk = chunk[: max(0, drop - sent)]
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client stopped reading (a 200 it did not want)
                finally:
                    with self.counters.lock:
                        self.counters.bytes_sent += len(chunk)
                sent += len(chunk)
                pos += len(chunk)
                if drop is not None and sent >= drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return


def serve(folder: str, port: int = 0, honour_range: bool = True) -> tuple[ThreadingHTTPServer, Counters]:
    """Start serving ``folder`` on 127.0.0.1 in a daemon thread; (server, counters)."""
    counters = Counters()
    handler = type("Handler", (RangeHandler,), {"counters": counters, "honour_range": honour_range})
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(handler, directory=folder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counters


if __name__ == "__main__":
    srv, _ = serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8000)
    print(f"serving {sys.argv[1]} with Range on http://127.0.0.1:{srv.server_address[1]}/", flush=True)
    threading.Event().wait()
