"""onprem.mesh.canary_gate through ansible-playbook against a real Prometheus scraping driven Istio metrics.

One Prometheus and one exporter for the module; every scenario has its own canary workload, whose steady traffic
starts when the fixture starts, so the 10 s analysis window has data by the time the playbooks run.
The workload checks (workload_ready, no_restarts) read real Deployments and pods on the lab's control plane.
"""
import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
from kubernetes import client

from canary_cluster import deployment, pods_of, readme_role_rules, record_restarts, wait_for, wait_for_deployment  # pylint: disable=import-error
from prometheus_harness import IstioExporter, PrometheusHarness, prometheus_available  # pylint: disable=import-error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "canary_gate", "gate.yml")
VENV_BIN = os.path.dirname(sys.executable)
NS = "shop"
WINDOW = "10s"

assert prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

# workload -> steady traffic
TRAFFIC = {
    "reviews-healthy": dict(rps=20, error_ratio=0.0, latency_ms=30),
    "reviews-errors": dict(rps=20, error_ratio=0.2, latency_ms=30),
    "reviews-slow": dict(rps=20, error_ratio=0.0, latency_ms=800),
    "reviews-quiet": dict(rps=0.2, error_ratio=0.0, latency_ms=30),
    "reviews-down": dict(rps=20, error_ratio=1.0, latency_ms=5),
}
SR = dict(name="errors", type="success_rate", min=99)
P99 = dict(name="p99", type="latency", max=500)


RECORDED = "workload:istio_requests_5xx:ratio10s"
RULES = """
groups:
  - name: canary
    interval: 1s
    rules:
      - record: %s
        # "or ... * 0": a workload without any 5xx series gets 0, not an empty result (which the gate never passes)
        expr: >-
          (sum by (destination_workload_namespace, destination_workload) (rate(istio_requests_total{response_code=~"5.."}[10s]))
          or sum by (destination_workload_namespace, destination_workload) (rate(istio_requests_total[10s])) * 0)
          / sum by (destination_workload_namespace, destination_workload) (rate(istio_requests_total[10s]))
""" % RECORDED


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "canary.rules.yml"
    rules.write_text(RULES)
    with IstioExporter() as exporter, PrometheusHarness([exporter.target], rule_files=[str(rules)]) as harness:
        for workload, traffic in TRAFFIC.items():
            exporter.set_traffic(NS, workload, "v2", **traffic)
        # Enough scraped samples for rate() over the window (bounded wait; the tests assert on the gate, not on time).
        harness.wait_for_series('istio_requests_total{destination_workload="reviews-healthy"}', min_samples=6, timeout=90)
        harness.wait_for_series('%s{destination_workload="reviews-errors"}' % RECORDED, min_samples=2, timeout=30)
        harness.exporter = exporter
        yield harness


def yaml_value(value):
    """Vars files are JSON (valid YAML); strings with {{ }} are emitted as !unsafe so Ansible leaves them to the module."""
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (json.dumps(k), yaml_value(v)) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str) and "{{" in value:
        return "!unsafe " + json.dumps(value)
    return json.dumps(value)


def run_gate(tmp_path, check=False, **gate_vars):
    result_file = tmp_path / "gate.json"
    variables = dict(gate_namespace=NS, gate_version="v2", gate_window=WINDOW, gate_result_file=str(result_file))
    variables.update(gate_vars)
    vars_file = tmp_path / "vars.yml"
    vars_file.write_text("\n".join("%s: %s" % (k, yaml_value(v)) for k, v in variables.items()) + "\n")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost")
    cmd = [os.path.join(VENV_BIN, "ansible-playbook"), PLAYBOOK, "-e", "@%s" % vars_file]
    if check:
        cmd.append("--check")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          check=False)
    assert result_file.exists(), proc.stdout[-5000:]
    return proc.returncode, json.loads(result_file.read_text()), proc.stdout


def by_name(result):
    return dict((c["name"], c) for c in result["checks"])


def test_healthy_canary_passes_with_measured_values(prom, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-healthy", gate_checks=[SR, P99])
    assert rc == 0, out
    assert result["verdict"] == "pass" and result["changed"] is False
    checks = by_name(result)
    assert checks["errors"]["value"] == pytest.approx(100.0)
    # 30 ms falls in Istio's (25, 50] bucket; histogram_quantile interpolates p99 inside it.
    assert 25 < checks["p99"]["value"] <= 50
    assert checks["errors"]["requests"] >= 10
    assert 'destination_workload="reviews-healthy"' in checks["errors"]["query"]


def test_check_mode_evaluates_too(prom, tmp_path):
    rc, result, out = run_gate(tmp_path, check=True, gate_prometheus_url=prom.url, gate_workload="reviews-healthy",
                               gate_checks=[SR])
    assert rc == 0, out
    assert result["verdict"] == "pass" and by_name(result)["errors"]["value"] == pytest.approx(100.0)


def test_twenty_percent_errors_fail_success_rate(prom, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-errors", gate_checks=[SR, P99])
    assert rc != 0
    checks = by_name(result)
    assert result["verdict"] == "fail" and checks["errors"]["verdict"] == "fail"
    assert checks["errors"]["value"] == pytest.approx(80.0, abs=1.0)
    assert "errors (success_rate): fail" in result["msg"] and "is not >= 99 %" in result["msg"]


def test_only_5xx_measures_zero_even_when_no_data_would_pass(prom, tmp_path):
    """The canary has no non-5xx series at all; the built-in query still measures 0 %, not an empty result."""
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-down",
                               gate_checks=[dict(SR, on_no_data="pass")])
    assert rc != 0
    assert by_name(result)["errors"]["value"] == 0 and by_name(result)["errors"]["verdict"] == "fail"


def test_slow_buckets_fail_latency(prom, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-slow", gate_checks=[SR, P99])
    assert rc != 0
    checks = by_name(result)
    assert checks["errors"]["verdict"] == "pass" and checks["p99"]["verdict"] == "fail"
    assert 500 < checks["p99"]["value"] <= 1000  # 800 ms lands in the (500, 1000] bucket
    assert "p99 (latency): fail" in result["msg"]


def test_too_few_requests_follow_the_low_traffic_policy(prom, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-quiet", gate_checks=[SR],
                               gate_min_requests=50)
    assert rc != 0
    check = by_name(result)["errors"]
    assert check["verdict"] == "fail" and "low traffic" in check["reason"] and "min_requests is 50" in check["reason"]
    assert "(on_low_traffic: inconclusive)" in check["reason"] and "still inconclusive" in check["reason"]
    # The user may decide that low traffic passes; then it does, and says why.
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-quiet", gate_checks=[SR],
                               gate_min_requests=50, gate_on_low_traffic="pass")
    assert rc == 0, out
    assert "(on_low_traffic: pass)" in by_name(result)["errors"]["reason"]


def test_custom_query_with_placeholders(prom, tmp_path):
    query = ('sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",'
             'destination_workload="{{ workload }}",response_code=~"5.."}[{{ window }}]))')
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-errors",
                               gate_checks=[dict(name="5xx-per-second", type="promql", query=query, max=1)])
    assert rc != 0
    check = by_name(result)["5xx-per-second"]
    assert check["query"] == query.replace("{{ namespace }}", NS).replace("{{ workload }}", "reviews-errors").replace(
        "{{ window }}", WINDOW)
    assert check["value"] == pytest.approx(4.0, abs=0.5)  # 20 rps * 20 %


def test_custom_query_on_a_recording_rule(prom, tmp_path):
    query = '%s{destination_workload_namespace="{{ namespace }}",destination_workload="{{ workload }}"} * 100' % RECORDED
    check = dict(name="5xx-ratio", type="promql", query=query, max=1, min_requests=10)
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-healthy", gate_checks=[check])
    assert rc == 0, out
    assert by_name(result)["5xx-ratio"]["value"] == 0 and by_name(result)["5xx-ratio"]["requests"] >= 10
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-errors", gate_checks=[check])
    assert rc != 0 and by_name(result)["5xx-ratio"]["value"] == pytest.approx(20.0, abs=1.0)
    assert prom.reload() == 200  # --web.enable-lifecycle


def test_http_checks_against_prometheus_own_endpoints(prom, tmp_path):
    healthy = dict(name="healthy", type="http", url=prom.url + "/-/healthy")
    buildinfo = dict(name="buildinfo", type="http", url=prom.url + "/api/v1/status/buildinfo", expect_json={"status": "success"})
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-healthy", gate_checks=[healthy, buildinfo])
    assert rc == 0, out
    assert [c["value"] for c in result["checks"]] == [200, 200]
    wrong = dict(buildinfo, expect_json={"status": "success", "data": {"version": "0.0.0-not-this-one"}})
    missing = dict(name="missing", type="http", url=prom.url + "/no-such-page")
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-healthy", gate_checks=[wrong, missing])
    assert rc != 0
    checks = by_name(result)
    assert '$.data.version: expected "0.0.0-not-this-one"' in checks["buildinfo"]["reason"]
    assert checks["missing"]["value"] == 404


def test_invalid_promql_fails_quoting_prometheus_400(prom, tmp_path):
    bad = 'sum(rate(istio_requests_total{destination_workload="reviews-healthy"}[1m])'
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-healthy", gate_retry_for=30,
                               gate_checks=[dict(name="typo", type="promql", query=bad, max=1)])
    assert rc != 0
    check = by_name(result)["typo"]
    assert check["verdict"] == "fail" and check["attempts"] == 1
    assert "HTTP 400 bad_data" in result["msg"] and "parse error" in result["msg"] and bad in result["msg"]


def test_prometheus_stopped_follows_the_error_policy(tmp_path):
    with PrometheusHarness([]) as dead:
        url = dead.url
        dead.stop()
        rc, result, out = run_gate(tmp_path, gate_prometheus_url=url, gate_workload="reviews-healthy", gate_checks=[SR],
                                   gate_retry_for=2, gate_retry_interval=1)
        assert rc != 0
        check = by_name(result)["errors"]
        assert "prometheus_url %s is unreachable" % url in check["reason"]
        assert "(on_error: inconclusive)" in check["reason"] and check["attempts"] >= 2 and check["verdict"] == "fail"
        rc, result, out = run_gate(tmp_path, gate_prometheus_url=url, gate_workload="reviews-healthy", gate_checks=[SR],
                                   gate_on_error="fail", gate_retry_for=30)
        assert rc != 0 and by_name(result)["errors"]["attempts"] == 1 and "(on_error: fail)" in result["msg"]


# ------------------------------------------------------------------------------------------------
# Workload checks on the lab's real control plane (tests/support/cluster_fixtures.py): Deployments rolled out by the
# controller-manager, their pods scheduled by kube-scheduler and run by KWOK; the module reads them as a
# ServiceAccount bound to exactly the README's Role.
# ------------------------------------------------------------------------------------------------

def _iso(seconds_ago):
    return (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def gate_kubeconfig(cluster, ns, tmp_path):
    """A kubeconfig of ServiceAccount `canary` in ns, bound to exactly the README's Role (TLS verified by its CA)."""
    return cluster.service_account_kubeconfig(ns, "canary", readme_role_rules(), str(tmp_path / "canary.kubeconfig"))


def rolled_out(cluster, ns, name, replicas=2, pod_spec=None, available=None):
    """Create Deployment `name` and wait (bounded) until the controller reports `available` (default: all) replicas."""
    apps = client.AppsV1Api(cluster.api_client())
    apps.create_namespaced_deployment(ns, deployment(name, replicas, pod_spec=pod_spec))
    return wait_for_deployment(apps, ns, name, available=replicas if available is None else available, updated=replicas)


def k8s_vars(kubeconfig):
    return dict(gate_k8s_kubeconfig=kubeconfig)


READY = dict(name="ready", type="workload_ready")
RESTARTS = dict(name="restarts", type="no_restarts")


def test_full_gate_on_metrics_and_workload_passes(prom, cluster, ns, gate_kubeconfig, tmp_path):
    rolled_out(cluster, ns, "reviews-healthy")
    # the metrics of this namespace's canary: steady healthy traffic, enough samples for the window (bounded wait)
    prom.exporter.set_traffic(ns, "reviews-healthy", "v2", **TRAFFIC["reviews-healthy"])
    try:
        prom.wait_for_series('istio_requests_total{destination_workload_namespace="%s",destination_workload="reviews-healthy"}' % ns,
                             min_samples=6, timeout=90)
        rc, result, out = run_gate(tmp_path, gate_namespace=ns, gate_prometheus_url=prom.url, gate_workload="reviews-healthy",
                                   gate_checks=[SR, P99, READY, RESTARTS], **k8s_vars(gate_kubeconfig))
    finally:
        prom.exporter.stop_traffic(ns, "reviews-healthy", "v2")
    assert rc == 0, out
    checks = by_name(result)
    assert checks["errors"]["value"] == pytest.approx(100.0)
    assert checks["ready"]["value"] == 2 and "2/2 replicas available" in checks["ready"]["reason"]
    assert checks["restarts"]["value"] == 0 and "in 2 pods" in checks["restarts"]["reason"]


def test_restart_in_the_window_fails_no_restarts(cluster, ns, gate_kubeconfig, tmp_path):
    rolled_out(cluster, ns, "reviews-errors")
    core = cluster.core()
    restarted, other = pods_of(core, ns, "reviews-errors")
    record_restarts(core, ns, restarted, 2, finished_at=_iso(5))
    # No baseline here: with a 1 h window the pod (created seconds ago) counts all its restarts, whenever this runs.
    rc, result, out = run_gate(tmp_path, gate_namespace=ns, gate_workload="reviews-errors", gate_checks=[READY, RESTARTS],
                               gate_window="1h", **k8s_vars(gate_kubeconfig))
    assert rc != 0, out
    checks = by_name(result)
    assert checks["ready"]["verdict"] == "pass" and checks["restarts"]["verdict"] == "fail"
    assert checks["restarts"]["value"] == 2
    assert "%s/app +2 (restartCount 2)" % restarted["metadata"]["name"] in result["msg"]
    assert other["metadata"]["name"] not in result["msg"]


def test_unavailable_replicas_fail_workload_ready(cluster, ns, gate_kubeconfig, tmp_path):
    # Two replicas that may not share a topology domain "type" - and every lab node has type=kwok: the scheduler
    # places one pod and leaves the other Pending, so the controller truthfully reports 1 of 2 available.
    one_per_domain = {"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"workload": "reviews-slow"}}, "topologyKey": "type"}]}}}
    rolled_out(cluster, ns, "reviews-slow", replicas=2, pod_spec=one_per_domain, available=1)
    core = cluster.core()

    def unschedulable():
        return [p for p in pods_of(core, ns, "reviews-slow")
                if any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                       for c in (p.get("status") or {}).get("conditions") or [])]

    assert len(wait_for(unschedulable, "the second reviews-slow pod to be reported Unschedulable")) == 1
    rc, result, out = run_gate(tmp_path, gate_namespace=ns, gate_workload="reviews-slow", gate_checks=[READY],
                               **k8s_vars(gate_kubeconfig))
    assert rc != 0 and by_name(result)["ready"]["value"] == 1 and "1/2 replicas available" in result["msg"], out
    rc, result, out = run_gate(tmp_path, gate_namespace=ns, gate_workload="reviews-slow", gate_checks=[dict(READY, min_available=1)],
                               **k8s_vars(gate_kubeconfig))
    assert rc == 0, out
    assert by_name(result)["ready"]["value"] == 1


def test_missing_deployment_fails_without_retries(ns, gate_kubeconfig, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_namespace=ns, gate_workload="reviews-nope", gate_checks=[READY], gate_retry_for=30,
                               **k8s_vars(gate_kubeconfig))
    assert rc != 0 and by_name(result)["ready"]["attempts"] == 1, out
    assert "Kubernetes API answered 404" in result["msg"] and 'deployments.apps "reviews-nope" not found' in result["msg"]


def test_baseline_then_restart_through_the_official_client(cluster, ns, gate_kubeconfig):
    """What canary_rollout does per step: start_window() takes the baseline, evaluate() compares with it."""
    from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import CanaryGate  # pylint: disable=import-outside-toplevel

    rolled_out(cluster, ns, "reviews-healthy")
    core = cluster.core()
    pods = pods_of(core, ns, "reviews-healthy")
    gate = CanaryGate(dict(checks=[RESTARTS, READY], retry_inconclusive_for=0), dict(namespace=ns, workload="reviews-healthy"),
                      k8s=cluster.api_client(gate_kubeconfig))
    token = gate.start_window()
    assert sorted(p["name"] for p in token["restarts"].values()) == [p["metadata"]["name"] for p in pods]
    assert gate.evaluate(token)["verdict"] == "pass"
    record_restarts(core, ns, pods[0], 1)
    result = gate.evaluate(token)
    assert result["verdict"] == "fail" and result["checks"][0]["value"] == 1
    assert "%s/app +1" % pods[0]["metadata"]["name"] in result["checks"][0]["reason"]
    assert pods[1]["metadata"]["name"] not in result["checks"][0]["reason"]


def test_kubernetes_api_down_follows_the_error_policy(tmp_path):
    with socket.socket() as sock:  # a port on 127.0.0.1 that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-healthy", gate_checks=[READY], gate_on_error="fail",
                               gate_k8s_host="https://127.0.0.1:%d" % port, gate_k8s_api_key="unused")
    assert rc != 0, out
    assert "(on_error: fail)" in result["msg"] and "Kubernetes API unreachable" in result["msg"]
    assert by_name(result)["ready"]["attempts"] == 1
