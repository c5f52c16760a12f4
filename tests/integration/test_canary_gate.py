"""onprem.mesh.canary_gate through ansible-playbook against a real Prometheus scraping driven Istio metrics.

One Prometheus and one exporter for the module; every scenario has its own canary workload, whose steady traffic
starts when the fixture starts, so the 10 s analysis window has data by the time the playbooks run.
"""
import datetime
import json
import os
import subprocess
import sys

import pytest

from prometheus_harness import IstioExporter, PrometheusHarness, prometheus_available  # pylint: disable=import-error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "canary_gate", "gate.yml")
VENV_BIN = os.path.dirname(sys.executable)
NS = "shop"
WINDOW = "10s"

pytestmark = pytest.mark.skipif(not prometheus_available(), reason="no Prometheus binary (run tools/bootstrap.sh)")

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
# Workload checks against the test Kubernetes API (tests/support/k8s_double)
# ------------------------------------------------------------------------------------------------

def _k8s_double():
    try:
        import k8s_double  # pylint: disable=import-error,import-outside-toplevel
        from kubernetes import client  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        pytest.skip("the test Kubernetes API or the kubernetes library is not available: %s" % e)
    return k8s_double, client


def _iso(seconds_ago):
    return (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod(name, workload, restarts=0, finished=None):
    status = {"name": "app", "restartCount": restarts, "ready": True, "image": "reviews:2", "imageID": "",
              "state": {"running": {"startedAt": _iso(1)}}}
    if finished is not None:
        status["lastState"] = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": finished}}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": "reviews", "workload": workload}},
            "spec": {"containers": [{"name": "app", "image": "reviews:2"}]},
            "status": {"phase": "Running", "containerStatuses": [status]}}


def _deployment(name, replicas=2):
    labels = {"app": "reviews", "workload": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "app", "image": "reviews:2"}]}}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The test Kubernetes API with namespace shop: reviews-healthy (rolled out, 2 pods without restarts),
    reviews-errors (rolled out, a pod that restarted twice), reviews-slow (1 of 2 replicas available)."""
    k8s_double, client = _k8s_double()
    with k8s_double.start(port=0, workdir=str(tmp_path_factory.mktemp("k8s-double"))) as handle:
        conf = client.Configuration()
        conf.host = handle.url
        conf.api_key = {"authorization": "Bearer %s" % handle.token}
        api = client.ApiClient(conf)
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for name in ("reviews-healthy", "reviews-errors"):
            apps.create_namespaced_deployment(NS, _deployment(name))
        core.create_namespaced_pod(NS, _pod("reviews-healthy-a", "reviews-healthy"))
        core.create_namespaced_pod(NS, _pod("reviews-healthy-b", "reviews-healthy"))
        core.create_namespaced_pod(NS, _pod("reviews-errors-a", "reviews-errors", restarts=2, finished=_iso(5)))
        handle.api.controllers = False  # from here on nobody marks Deployments rolled out
        apps.create_namespaced_deployment(NS, _deployment("reviews-slow"))
        apps.patch_namespaced_deployment_status("reviews-slow", NS, {"status": {
            "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}})
        handle.client = api
        handle.core = core
        yield handle
        api.close()


def k8s_vars(handle):
    return dict(gate_k8s_host=handle.url, gate_k8s_api_key=handle.token, gate_k8s_validate_certs=False)


READY = dict(name="ready", type="workload_ready")
RESTARTS = dict(name="restarts", type="no_restarts")


def test_full_gate_on_metrics_and_workload_passes(prom, cluster, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_prometheus_url=prom.url, gate_workload="reviews-healthy",
                               gate_checks=[SR, P99, READY, RESTARTS], **k8s_vars(cluster))
    assert rc == 0, out
    checks = by_name(result)
    assert checks["ready"]["value"] == 2 and "2/2 replicas available" in checks["ready"]["reason"]
    assert checks["restarts"]["value"] == 0 and "in 2 pods" in checks["restarts"]["reason"]


def test_restart_in_the_window_fails_no_restarts(cluster, tmp_path):
    # No baseline here: with a 1 h window the pod (created minutes ago) counts all its restarts, whenever this runs.
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-errors", gate_checks=[READY, RESTARTS], gate_window="1h",
                               **k8s_vars(cluster))
    assert rc != 0
    checks = by_name(result)
    assert checks["ready"]["verdict"] == "pass" and checks["restarts"]["verdict"] == "fail"
    assert "reviews-errors-a/app +2 (restartCount 2)" in result["msg"]


def test_unavailable_replicas_fail_workload_ready(cluster, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-slow", gate_checks=[READY], **k8s_vars(cluster))
    assert rc != 0 and by_name(result)["ready"]["value"] == 1 and "1/2 replicas available" in result["msg"]
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-slow", gate_checks=[dict(READY, min_available=1)],
                               **k8s_vars(cluster))
    assert rc == 0, out


def test_missing_deployment_fails_without_retries(cluster, tmp_path):
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-nope", gate_checks=[READY], gate_retry_for=30,
                               **k8s_vars(cluster))
    assert rc != 0 and by_name(result)["ready"]["attempts"] == 1
    assert "Kubernetes API answered 404" in result["msg"] and "reviews-nope" in result["msg"]


def test_baseline_then_restart_through_the_official_client(cluster):
    """What canary_rollout does per step: start_window() takes the baseline, evaluate() compares with it."""
    from ansible_collections.onprem.mesh.plugins.module_utils.canary_checks import CanaryGate  # pylint: disable=import-outside-toplevel

    gate = CanaryGate(dict(checks=[RESTARTS, READY], retry_inconclusive_for=0), dict(namespace=NS, workload="reviews-healthy"),
                      k8s=cluster.client)
    token = gate.start_window()
    assert sorted(p["name"] for p in token["restarts"].values()) == ["reviews-healthy-a", "reviews-healthy-b"]
    assert gate.evaluate(token)["verdict"] == "pass"
    cluster.core.patch_namespaced_pod_status("reviews-healthy-a", NS, {"status": {"containerStatuses": [
        {"name": "app", "restartCount": 1, "ready": True, "image": "reviews:2", "imageID": ""}]}})
    try:
        result = gate.evaluate(token)
        assert result["verdict"] == "fail" and result["checks"][0]["value"] == 1
        assert "reviews-healthy-a/app +1" in result["checks"][0]["reason"]
    finally:
        cluster.core.patch_namespaced_pod_status("reviews-healthy-a", NS, {"status": {"containerStatuses": [
            {"name": "app", "restartCount": 0, "ready": True, "image": "reviews:2", "imageID": ""}]}})


def test_kubernetes_api_down_follows_the_error_policy(tmp_path):
    k8s_double, dummy = _k8s_double()
    handle = k8s_double.start(port=0, workdir=str(tmp_path / "k8s-double"))
    url, token = handle.url, handle.token
    handle.stop()
    rc, result, out = run_gate(tmp_path, gate_workload="reviews-healthy", gate_checks=[READY], gate_on_error="fail",
                               gate_k8s_host=url, gate_k8s_api_key=token, gate_k8s_validate_certs=False)
    assert rc != 0 and "(on_error: fail)" in result["msg"] and "Kubernetes API unreachable" in result["msg"]
