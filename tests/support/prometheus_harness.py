"""A real Prometheus for tests, and a tiny exporter of Istio metrics that the test drives.

    with IstioExporter() as exporter, PrometheusHarness(targets=[exporter.target]) as prom:
        exporter.set_traffic("shop", "reviews-v2", "v2", rps=20, error_ratio=0.2, latency_ms=30)
        prom.wait_for_series('istio_requests_total{destination_workload="reviews-v2"}', min_samples=5)
        prom.url  # http://127.0.0.1:<port>

PrometheusHarness starts /usr/bin/prometheus (override: PROMETHEUS_BINARY) on 127.0.0.1 with a free port, its own
config file and TSDB in a temporary directory, --web.enable-lifecycle, scrape and rule evaluation every second,
optional recording rule files; waits until /-/ready answers (bounded); stop() terminates it (kill after a bound) and
removes the directory. Both classes are context managers, so they stop on test failures too.

IstioExporter serves /metrics from Python's http.server on 127.0.0.1. Its istio_requests_total counters and
istio_request_duration_milliseconds_bucket/_sum/_count histogram carry the labels reporter, destination_workload,
destination_workload_namespace, destination_version, response_code (plus destination_service_name). Traffic is either
steady (set_traffic: requests per second, integrated at every scrape, so rate() sees a smooth line) or discrete
(add_requests). Series start at 0 so that the first requests are visible to rate()/increase().
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMETHEUS_BINARY = os.environ.get("PROMETHEUS_BINARY", "/usr/bin/prometheus")
# Istio's default buckets for istio_request_duration_milliseconds.
ISTIO_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_available():
    return os.path.isfile(PROMETHEUS_BINARY) and os.access(PROMETHEUS_BINARY, os.X_OK)


# ------------------------------------------------------------------------------------------------
# Exporter
# ------------------------------------------------------------------------------------------------

class _Flow:
    """One workload/version's steady traffic."""

    def __init__(self, rps, error_ratio, latency_ms, error_code):
        self.rps = float(rps)
        self.error_ratio = float(error_ratio)
        self.latency_ms = float(latency_ms)
        self.error_code = str(error_code)


class IstioExporter:
    """Serves Istio-shaped metrics whose values the test controls."""

    def __init__(self, buckets=ISTIO_BUCKETS, clock=time.monotonic):
        self.buckets = tuple(buckets)
        self.clock = clock
        self._lock = threading.Lock()
        self._requests = {}   # label tuple -> count
        self._hist = {}       # label tuple (no response_code) -> {"buckets": [..], "sum": x, "count": n}
        self._flows = {}      # (reporter, ns, workload, version) -> _Flow
        self._last = None
        self._server = None
        self._thread = None
        self.scrapes = 0

    # -- driving ------------------------------------------------------------------------------------
    @staticmethod
    def _key(namespace, workload, version, reporter):
        return (reporter, namespace, workload, version)

    def _ensure(self, key, code):
        self._requests.setdefault(key + (str(code),), 0.0)
        self._hist.setdefault(key + (str(code),), {"buckets": [0.0] * len(self.buckets), "sum": 0.0, "count": 0.0})

    def _observe(self, key, code, count, latency_ms):
        self._ensure(key, code)
        self._requests[key + (str(code),)] += count
        hist = self._hist[key + (str(code),)]
        for i, le in enumerate(self.buckets):
            if latency_ms <= le:
                hist["buckets"][i] += count
        hist["sum"] += latency_ms * count
        hist["count"] += count

    def add_requests(self, namespace, workload, version, count=1, code=200, latency_ms=10.0, reporter="destination"):
        """Count `count` requests answered with `code` in `latency_ms`, now."""
        with self._lock:
            self._observe(self._key(namespace, workload, version, reporter), code, float(count), float(latency_ms))

    def set_traffic(self, namespace, workload, version, rps, error_ratio=0.0, latency_ms=10.0, error_code=503,
                    reporter="destination"):
        """Steady traffic from now on: rps requests per second, a share error_ratio of them answered error_code."""
        with self._lock:
            self._advance()
            key = self._key(namespace, workload, version, reporter)
            if error_ratio < 1:  # a canary that only fails has no 200 series at all, as in real Istio telemetry
                self._ensure(key, 200)
            if error_ratio:
                self._ensure(key, error_code)
            self._flows[key] = _Flow(rps, error_ratio, latency_ms, error_code)

    def stop_traffic(self, namespace, workload, version, reporter="destination"):
        with self._lock:
            self._advance()
            self._flows.pop(self._key(namespace, workload, version, reporter), None)

    def _advance(self):
        now = self.clock()
        if self._last is not None:
            elapsed = max(0.0, now - self._last)
            for key, flow in self._flows.items():
                total = flow.rps * elapsed
                errors = total * flow.error_ratio
                if total - errors:
                    self._observe(key, 200, total - errors, flow.latency_ms)
                if errors:
                    self._observe(key, flow.error_code, errors, flow.latency_ms)
        self._last = now

    # -- exposition ---------------------------------------------------------------------------------
    @staticmethod
    def _labels(key, extra=None):
        reporter, namespace, workload, version, code = key
        pairs = [("reporter", reporter), ("destination_workload_namespace", namespace), ("destination_workload", workload),
                 ("destination_version", version), ("destination_service_name", workload.rsplit("-", 1)[0]),
                 ("response_code", code)]
        if extra:
            pairs.append(extra)
        return ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')) for k, v in pairs)

    def render(self):
        with self._lock:
            self._advance()
            self.scrapes += 1
            lines = ["# TYPE istio_requests_total counter"]
            for key, value in sorted(self._requests.items()):
                lines.append("istio_requests_total{%s} %r" % (self._labels(key), value))
            lines.append("# TYPE istio_request_duration_milliseconds histogram")
            for key, hist in sorted(self._hist.items()):
                for le, value in zip(self.buckets, hist["buckets"]):
                    lines.append("istio_request_duration_milliseconds_bucket{%s} %r" % (self._labels(key, ("le", le)), value))
                lines.append("istio_request_duration_milliseconds_bucket{%s} %r" % (self._labels(key, ("le", "+Inf")), hist["count"]))
                lines.append("istio_request_duration_milliseconds_sum{%s} %r" % (self._labels(key), hist["sum"]))
                lines.append("istio_request_duration_milliseconds_count{%s} %r" % (self._labels(key), hist["count"]))
            return "\n".join(lines) + "\n"

    # -- server -------------------------------------------------------------------------------------
    def start(self):
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="istio-exporter", daemon=True)
        self._thread.start()
        return self

    @property
    def target(self):
        return "127.0.0.1:%d" % self._server.server_address[1]

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------------------------------------
# Prometheus
# ------------------------------------------------------------------------------------------------

class PrometheusHarness:
    """A real Prometheus process on 127.0.0.1, configured to scrape the given targets every second."""

    def __init__(self, targets=(), rule_files=(), scrape_interval="1s", binary=None, extra_args=(), start_timeout=60):
        self.targets = list(targets)
        self.rule_files = list(rule_files)
        self.scrape_interval = scrape_interval
        self.binary = binary or PROMETHEUS_BINARY
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.workdir = None
        self.port = None
        self.proc = None
        self._log = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def log_path(self):
        return os.path.join(self.workdir, "prometheus.log")

    def _write_config(self):
        rules = []
        for i, path in enumerate(self.rule_files):
            dest = os.path.join(self.workdir, "rules-%d.yml" % i)
            shutil.copyfile(path, dest)
            rules.append(dest)
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": rules,
            "scrape_configs": [{"job_name": "istio-exporter", "static_configs": [{"targets": self.targets}]}],
        }
        path = os.path.join(self.workdir, "prometheus.yml")
        with open(path, "w") as f:
            json.dump(config, f, indent=1)  # JSON is YAML
        return path

    def start(self):
        if not prometheus_available():
            raise RuntimeError("Prometheus binary %s not found; run tools/bootstrap.sh (Debian package prometheus)" % self.binary)
        self.workdir = tempfile.mkdtemp(prefix="onprem-mesh-prometheus-")
        config = self._write_config()
        for attempt in range(3):  # a free port can be taken between picking and binding
            self.port = free_port()
            self._log = open(self.log_path, "ab")
            cmd = [self.binary, "--config.file=%s" % config, "--storage.tsdb.path=%s" % os.path.join(self.workdir, "data"),
                   "--web.listen-address=127.0.0.1:%d" % self.port, "--web.enable-lifecycle",
                   "--storage.tsdb.retention.time=2h", "--log.level=info"] + self.extra_args
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
            if self._wait_ready():
                return self
            self._terminate()
            if attempt == 2:
                break
        log = self.log_tail()
        self.stop()
        raise RuntimeError("Prometheus did not become ready within %ss:\n%s" % (self.start_timeout, log))

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        for dummy in range(int(self.start_timeout / 0.2) + 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, chars=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def _terminate(self, timeout=10):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self):
        """Stop the process (terminate, kill after 10 s); the port then refuses connections."""
        self._terminate()

    def cleanup(self):
        self.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def reload(self):
        """POST /-/reload (the config and rule files are re-read)."""
        req = urllib.request.Request(self.url + "/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status

    def query(self, promql):
        """The raw JSON answer to an instant query (errors included)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")

    def value(self, promql):
        """The first sample's value of an instant query, or None when the result is empty."""
        result = self.query(promql).get("data", {}).get("result") or []
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql, predicate=lambda v: v is not None, timeout=60, interval=0.5):
        """Poll an instant query until predicate(value) holds; bounded; returns the last value (caller asserts)."""
        value = None
        deadline = time.monotonic() + timeout
        for dummy in range(int(timeout / interval) + 1):
            value = self.value(promql)
            if predicate(value) or time.monotonic() > deadline:
                break
            time.sleep(interval)
        return value

    def wait_for_series(self, selector, min_samples=3, timeout=60):
        """Wait until `selector` has at least min_samples scraped samples in the TSDB (data to compute rates on)."""
        return self.wait_for("max(count_over_time(%s[5m]))" % selector, lambda v: v is not None and v >= min_samples, timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
