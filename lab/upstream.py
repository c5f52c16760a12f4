"""Lab upstream: a small threaded HTTP service that plays one version (v1, v2) of the `payment` workload.

Every response carries the version in the ``x-lab-version`` header (and the body). Faults can be switched
at run time, on a separate admin port (so they never go through Envoy) or through a JSON fault file:

  POST /admin/fault  {"error_rate": 0.2}      fraction of requests answered with 503
  POST /admin/fault  {"latency_ms": 300}      added latency before each answer
  POST /admin/fault  {"crash": true}          stop serving: listener closed, keep-alive connections
                                              reset (connection refused, as a crashed pod)
  POST /admin/fault  {"clear": true}          all faults off, listener back
  POST /admin/listen {"addresses": [...]}     serve on these addresses (the IPs of the pods it plays)
  GET  /admin/fault                           current faults; GET /admin/stats counters

Usage: python lab/upstream.py --version v2 --ready-file run/v2.json [--port 0] [--address IP]... [--admin-port 0]
       [--fault-file run/v2-fault.json]
The ready file (written atomically once both ports listen) holds {"port", "admin_port", "pid", "version"}.
Standard library only; the admin port on 127.0.0.1, the app on the given (local) addresses.
"""
import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
FAULT_KEYS = ("error_rate", "latency_ms", "crash")


def write_json_atomic(path, data):
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


class Faults:
    """Thread-safe fault state."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error_rate = 0.0
        self.latency_ms = 0.0
        self.crash = False

    def snapshot(self):
        with self._lock:
            return {"error_rate": self.error_rate, "latency_ms": self.latency_ms, "crash": self.crash}

    def update(self, data):
        """Apply a fault document; returns the new snapshot. Raises ValueError on bad input."""
        if not isinstance(data, dict):
            raise ValueError("fault document must be a JSON object")
        unknown = set(data) - set(FAULT_KEYS) - {"clear"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}; known: {list(FAULT_KEYS) + ['clear']}")
        with self._lock:
            if data.get("clear"):
                self.error_rate, self.latency_ms, self.crash = 0.0, 0.0, False
            if "error_rate" in data:
                rate = float(data["error_rate"])
                if not 0.0 <= rate <= 1.0:
                    raise ValueError("error_rate must be between 0 and 1")
                self.error_rate = rate
            if "latency_ms" in data:
                latency = float(data["latency_ms"])
                if not 0.0 <= latency <= 600000:
                    raise ValueError("latency_ms must be between 0 and 600000")
                self.latency_ms = latency
            if "crash" in data:
                self.crash = bool(data["crash"])
        return self.snapshot()


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0

    def count(self, error):
        with self._lock:
            self.requests += 1
            self.errors += int(error)

    def snapshot(self):
        with self._lock:
            return {"requests": self.requests, "errors": self.errors}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_app_handler(version, faults, stats):
    class AppHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms Nagle/delayed-ACK stall
        wbufsize = 64 * 1024  # ... and one send() per answer (flushed after the body)
        server_version = f"lab-payment/{version}"

        def log_message(self, *args):  # quiet: the load generator sends thousands of requests
            pass

        def _drop(self):
            """Crash mode: reset the connection without an answer."""
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 20))
            state = faults.snapshot()
            if state["crash"]:
                self._drop()
                return
            if state["latency_ms"] > 0:
                time.sleep(state["latency_ms"] / 1000.0)
            error = state["error_rate"] > 0 and random.random() < state["error_rate"]
            code = 503 if error else 200
            body = json.dumps({"version": version, "status": code, "path": self.path}).encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-lab-version", version)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
            stats.count(error)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    return AppHandler


def make_admin_handler(version, faults, stats, on_change, listen):
    class AdminHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _reply(self, code, data):
            body = json.dumps(data).encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/admin/fault":
                self._reply(200, faults.snapshot())
            elif self.path == "/admin/stats":
                self._reply(200, dict(stats.snapshot(), version=version))
            elif self.path == "/healthz":
                self._reply(200, {"ok": True, "version": version})
            else:
                self._reply(404, {"error": "try /admin/fault, /admin/stats or /healthz"})

        def do_POST(self):
            if self.path not in ("/admin/fault", "/admin/listen"):
                self._reply(404, {"error": "POST /admin/fault or /admin/listen"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/admin/listen":
                    self._reply(200, listen(data))
                    return
                state = faults.update(data)
            except ValueError as exc:
                self._reply(400, {"error": str(exc)})
                return
            on_change()
            self._reply(200, state)

    return AdminHandler


class Upstream:
    """The service: app listeners (one per address: the IPs of the pods this process plays) that can be
    closed and re-opened (crash), and an admin listener on 127.0.0.1 that stays."""

    def __init__(self, version, port=0, admin_port=0, fault_file=None, addresses=(HOST,)):
        self.version = version
        self.faults = Faults()
        self.stats = Stats()
        self.fault_file = fault_file
        self._lock = threading.Lock()
        self._apps = {}  # address -> (server, thread)
        self._stop = threading.Event()
        self.port = port
        self.addresses = list(addresses)
        if self.addresses:
            self._open_app(self.addresses[0])  # resolves port 0 once; the same port serves every address
        self.sync()
        handler = make_admin_handler(version, self.faults, self.stats, self.sync, self.listen)
        self.admin = _Server((HOST, admin_port), handler)
        self.admin_port = self.admin.server_address[1]
        self._admin_thread = threading.Thread(target=self.admin.serve_forever, kwargs={"poll_interval": 0.2},
                                              name="admin", daemon=True)
        self._admin_thread.start()

    def _open_app(self, address):
        server = _Server((address, self.port), make_app_handler(self.version, self.faults, self.stats))
        self.port = server.server_address[1]  # keep the same port across crash/clear
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"app-{address}",
                                  daemon=True)
        thread.start()
        self._apps[address] = (server, thread)

    def _close_app(self, address):
        server, dummy = self._apps.pop(address)
        server.shutdown()
        server.server_close()

    def listen(self, data):
        """{"addresses": [...]}: serve on exactly these addresses (the pods' IPs) from now on."""
        addresses = data.get("addresses") if isinstance(data, dict) else None
        if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
            raise ValueError('send {"addresses": ["10.213.0.4", ...]}')
        with self._lock:
            self.addresses = list(addresses)
        self.sync()
        return {"addresses": sorted(self._apps), "port": self.port}

    def sync(self):
        """Open or close the app listeners to match the addresses and the crash fault."""
        with self._lock:
            want = set() if self.faults.snapshot()["crash"] else set(self.addresses)
            for address in sorted(set(self._apps) - want):
                self._close_app(address)
            for address in sorted(want - set(self._apps)):
                for dummy in range(50):  # bounded: the port may linger a moment after close
                    try:
                        self._open_app(address)
                        break
                    except OSError:
                        time.sleep(0.1)

    def watch_fault_file(self, interval=0.2):
        """Poll the fault file (if any) until stop(); a changed, valid document is applied."""
        last = None
        while not self._stop.wait(interval):
            if not self.fault_file:
                continue
            try:
                with open(self.fault_file, encoding="utf-8") as fh:
                    text = fh.read()
            except OSError:
                continue
            if text == last:
                continue
            last = text
            try:
                self.faults.update(json.loads(text))
                self.sync()
            except ValueError as exc:
                print(f"upstream {self.version}: ignoring fault file: {exc}", file=sys.stderr, flush=True)

    def stop(self):
        self._stop.set()
        with self._lock:
            for address in list(self._apps):
                self._close_app(address)
        self.admin.shutdown()
        self.admin.server_close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, help="version label served, e.g. v1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--address", action="append", help="address to serve on (repeat; default 127.0.0.1); "
                                                           "POST /admin/listen changes them at run time")
    parser.add_argument("--admin-port", type=int, default=0)
    parser.add_argument("--ready-file", help="where to write the ports once listening")
    parser.add_argument("--fault-file", help="JSON fault document polled every 200 ms")
    parser.add_argument("--max-seconds", type=float, default=24 * 3600, help="exit by itself after this long")
    args = parser.parse_args(argv)

    up = Upstream(args.version, args.port, args.admin_port, args.fault_file, args.address or [HOST])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    watcher = threading.Thread(target=up.watch_fault_file, name="fault-file", daemon=True)
    watcher.start()
    info = {"version": args.version, "port": up.port, "admin_port": up.admin_port, "pid": os.getpid()}
    if args.ready_file:
        write_json_atomic(args.ready_file, info)
    print(json.dumps(info), flush=True)
    done.wait(args.max_seconds)
    up.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
