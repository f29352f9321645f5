"""A loopback HTTP proxy in front of an S3 endpoint that injects the transient faults a
busy object store produces: 503 SlowDown replies, object downloads cut off mid-body, and
listing pages that say 200 but hold an S3 error or stop mid-XML.
Faults are off until a test turns them on; counters say how many were injected."""
from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                  b"<Message>We encountered an internal error. Please try again.</Message></Error>")
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3:
    def __init__(self, upstream: str, hold=None):
        """``hold(method, path)``: called before each request is relayed; it may block it."""
        u = urlsplit(upstream)
        self.upstream, self.hold = (u.hostname, u.port), hold
        self.throttle_every = 0      # every Nth request answers 503 SlowDown (0: never)
        self.cut_every = 0           # every Nth object GET is cut off halfway (0: never)
        self.garble_lists_every = 0  # every Nth listing answers 200 with an error, then with half its XML
        self.requests = self.throttled = self.cut = self.object_gets = self.lists = self.garbled = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.hold is not None:
                    proxy.hold(self.command, self.path)
                with proxy._lock:
                    proxy.requests += 1
                    n = proxy.requests
                    throttle = proxy.throttle_every and n % proxy.throttle_every == 0
                if throttle:
                    proxy.throttled += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                is_object = (self.command == "GET" and resp.status in (200, 206) and len(data) > 1024
                             and "xml" not in (resp.getheader("Content-Type") or ""))
                is_list = self.command == "GET" and resp.status == 200 and "list-type=2" in self.path
                with proxy._lock:
                    proxy.object_gets += is_object
                    cut = is_object and proxy.cut_every and proxy.object_gets % proxy.cut_every == 0
                    proxy.lists += is_list
                    garble = is_list and proxy.garble_lists_every and proxy.lists % proxy.garble_lists_every == 0
                    if garble:
                        proxy.garbled += 1
                        data = INTERNAL_ERROR if proxy.garbled % 2 else data[: len(data) // 2]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # a HEAD's length is the object's, as the server said it
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if cut:
                    proxy.cut += 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def faults(self, throttle_every: int = 0, cut_every: int = 0, garble_lists_every: int = 0) -> None:
        with self._lock:
            self.throttle_every, self.cut_every = throttle_every, cut_every
            self.garble_lists_every = garble_lists_every

    def close(self) -> None:
        self.server.shutdown()
