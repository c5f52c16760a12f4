"""canary_rollout's preflight and its step windows (issue 11), through ansible-playbook, on the lab's real control plane
(kube-apiserver 1.35 with Istio's CRDs, KWOK running the canary's pods) and a real Prometheus.

The module runs as the ServiceAccount bound to exactly the README's Role; what it asked the API server comes from the
audit log. Prometheus scrapes an exporter of Istio's metrics that the test drives (tests/support/prometheus_harness.py):
the stable reviews-v1 and the canary reviews-v2 answer steady traffic, labelled with each test's namespace.

- A refused preflight (Prometheus down, a PromQL typo, a quiet stable, a canary without ready pods) writes nothing: no
  PATCH in the audit log, v2 keeps 0 %, the result is not_started and the message names the check, the reason and the fix.
- A canary that answered well for a minute and fails 20 % from the rollout's start is judged on its step's own traffic
  (80 %), where the whole minute would still have passed it.
"""
import datetime
import json
import os
import threading
import time
import urllib.parse
import urllib.request

import pytest
from kubernetes import client

from canary_cluster import deployment, readme_role_rules, wait_for_deployment  # pylint: disable=import-error
from cluster_fixtures import samples  # pylint: disable=import-error
from playbook_runner import ROOT, run_playbook  # pylint: disable=import-error
from prometheus_harness import IstioExporter, PrometheusHarness, free_port, prometheus_available  # pylint: disable=import-error

assert prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "canary_modules", "canary_rollout.yml")
GROUP, VERSION = "networking.istio.io", "v1"
ACCOUNT = "canary"


def raw(query):
    """A query with the module's placeholders ({{ workload }}), which Ansible hands over as they are."""
    return query.replace("{{", "{% raw %}{{").replace("}}", "}}{% endraw %}")


SR = {"name": "success-rate", "type": "success_rate", "min": 90}
ERRORS = {"name": "errors-5xx", "type": "promql", "max": 1,
          "query": raw('sum(rate(istio_requests_total{destination_workload_namespace="{{ namespace }}",'
                       'destination_workload="{{ workload }}",response_code=~"5.."}[{{ window }}])) or vector(0)')}
HISTORY = 45   # seconds of healthy canary traffic before the window test switches it to errors


NOTHING = "; this run wrote nothing: traffic stays v1=100, v2=0 (canary v2 gets 0 % of it)"


@pytest.fixture(scope="module")
def prom():
    with IstioExporter() as exporter, PrometheusHarness([exporter.target]) as harness:
        harness.exporter = exporter
        yield harness


@pytest.fixture(scope="module")
def history(cluster, prom):  # pylint: disable=redefined-outer-name
    """A namespace whose canary has answered healthy traffic since the module began (a previous release)."""
    name = cluster.namespace("w")
    prom.exporter.set_traffic(name, "reviews-v1", "v1", rps=20)
    prom.exporter.set_traffic(name, "reviews-v2", "v2", rps=20)
    yield name, time.time()
    cluster.core().delete_namespace(name)


def weights(api, ns):
    vs = api.get_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews")
    return dict((d["destination"]["subset"], d.get("weight")) for d in vs["spec"]["http"][0]["route"])


def lab(cluster, prom_, ns, tmp_path, ready=True, stable_rps=20, canary_rps=20):  # pylint: disable=too-many-arguments
    """Bookinfo's reviews at v1 = 100, v2 = 0; the canary's Deployment (2 pods, ready or Pending); the stable's and the
    canary's traffic in Prometheus; the module's kubeconfig (the README's Role). Returns (api, kubeconfig)."""
    api = client.CustomObjectsApi(cluster.api_client())
    client.CoreV1Api(api.api_client).create_namespaced_service(ns, {"metadata": {"name": "reviews", "labels": {"app": "reviews"}},
                                                                    "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
    for obj in samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"):
        api.create_namespaced_custom_object(GROUP, VERSION, ns, obj["kind"].lower() + "s", obj)
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", [
        {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 100},
        {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 0}], _content_type="application/json-patch+json")
    apps = client.AppsV1Api(cluster.api_client())
    pod_spec = None if ready else {"nodeSelector": {"onprem.mesh/no-such-node": "true"}}   # Pending: no node matches
    apps.create_namespaced_deployment(ns, deployment("reviews-v2", replicas=2, labels={"version": "v2"}, pod_spec=pod_spec))
    wait_for_deployment(apps, ns, "reviews-v2", available=2 if ready else 0, updated=2)
    if stable_rps:
        prom_.exporter.set_traffic(ns, "reviews-v1", "v1", rps=stable_rps)
        prom_.wait_for_series('istio_requests_total{destination_workload_namespace="%s",destination_workload="reviews-v1"}' % ns,
                              min_samples=3, timeout=30)
    if canary_rps:
        prom_.exporter.set_traffic(ns, "reviews-v2", "v2", rps=canary_rps)
    kubeconfig = cluster.service_account_kubeconfig(ns, ACCOUNT, readme_role_rules(), str(tmp_path / "canary.kubeconfig"))
    return api, kubeconfig


def rollout(kubeconfig, tmp_path, ns, prometheus_url, check=False, **args):
    base = dict(name="reviews", namespace=ns, stable="v1", canary="v2", canary_workload="reviews-v2", steps=[50, 100], interval="6s",
                kubeconfig=kubeconfig, prometheus_url=prometheus_url, analysis_window="1m", retry_inconclusive_for=0, checks=[SR])
    base.update(args)
    return run_playbook(PLAYBOOK, tmp_path, {"module_args": base}, check=check)


def module_calls(cluster, ns, mark):
    return cluster.audit.counts(cluster.audit.events(since=mark, user="system:serviceaccount:%s:%s" % (ns, ACCOUNT), namespace=ns))


def assert_refused(cluster, api, ns, mark, result, out):
    assert result["failed"] and result["result"] == "not_started" and result["changed"] is False, out[-3000:]
    assert result["msg"].startswith("preflight failed, so canary v2 gets no traffic: ") and result["msg"].endswith(NOTHING)
    assert result["weights_after"] == {"v1": 100, "v2": 0} and result["timeline"] == [] and result["preflight"]["verdict"] == "fail"
    assert weights(api, ns) == {"v1": 100, "v2": 0}
    calls = module_calls(cluster, ns, mark)
    assert "patch" not in calls and result["api_calls"]["write"] == 0, calls
    # the module's own count of its reads is what the API server saw
    assert calls["get virtualservices"] + calls.get("list destinationrules", 0) == result["api_calls"]["read"], (calls, result["api_calls"])
    return calls


def test_prometheus_down_refuses_with_no_write(cluster, ns, prom, tmp_path):  # pylint: disable=redefined-outer-name
    api, kubeconfig = lab(cluster, prom, ns, tmp_path)
    down = "http://127.0.0.1:%d" % free_port()   # nothing listens there
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, down, checks=[SR, ERRORS])
    assert_refused(cluster, api, ns, mark, result, out)
    assert result["msg"] == ("preflight failed, so canary v2 gets no traffic: prometheus (prometheus, {url}): Prometheus at prometheus_url {url}"
                             " is unreachable: {why}; fix: start Prometheus or correct prometheus_url (and prometheus_headers,"
                             " prometheus_validate_certs), then rerun".format(url=down, why=result["preflight"]["checks"][0]["reason"].split(
                                 " is unreachable: ", 1)[1]) + NOTHING), result["msg"]
    assert "Connection refused" in result["msg"]
    assert [(c["name"], c["verdict"]) for c in result["preflight"]["checks"]] == [("prometheus", "fail"), ("canary-pods", "pass")]


def test_a_promql_typo_and_a_misspelled_metric_refuse_with_no_write(cluster, ns, prom, tmp_path):  # pylint: disable=redefined-outer-name
    api, kubeconfig = lab(cluster, prom, ns, tmp_path)
    typo = dict(ERRORS, query=ERRORS["query"].replace("{% endraw %}]))", "{% endraw %}])"))
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, checks=[SR, typo])
    assert_refused(cluster, api, ns, mark, result, out)
    item = result["preflight"]["checks"][2]
    # Prometheus's own answer to the typo: HTTP 400 bad_data with its parser's message
    assert item["verdict"] == "fail" and item["reason"].startswith("Prometheus at %s rejected the query (HTTP 400 bad_data: " % prom.url)
    assert 'destination_workload="reviews-v1"' in item["query"]   # aimed at the stable, the canary's threshold aside
    assert "errors-5xx (promql, stable): Prometheus at %s rejected the query (HTTP 400 bad_data: " % prom.url in result["msg"]
    assert "; fix: correct the PromQL of check errors-5xx (the query as sent is in this item's query)" + NOTHING in result["msg"]
    assert result["preflight"]["checks"][1]["verdict"] == "pass" and result["preflight"]["checks"][1]["value"] == 100.0
    misspelled = dict(ERRORS, name="resets", query=raw('sum(rate(istio_request_total{destination_workload="{{ workload }}"}[{{ window }}]))'))
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, checks=[SR, misspelled])
    assert_refused(cluster, api, ns, mark, result, out)
    assert ("resets (promql, stable): the query returned no series for the stable %s/reviews-v1 (version v1) (a misspelled metric or"
            " label name, or no traffic)" % ns) in result["msg"]


def test_a_canary_without_ready_pods_refuses_with_no_write(cluster, ns, prom, tmp_path):  # pylint: disable=redefined-outer-name
    api, kubeconfig = lab(cluster, prom, ns, tmp_path, ready=False)
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url)
    calls = assert_refused(cluster, api, ns, mark, result, out)
    assert result["msg"] == ("preflight failed, so canary v2 gets no traffic: canary-pods (workload_ready, canary): Deployment {ns}/reviews-v2"
                             " has 0/2 replicas available, 2 updated; fix: wait until the canary's pods are ready (kubectl -n {ns} rollout"
                             " status deployment/reviews-v2), then rerun".format(ns=ns) + NOTHING), result["msg"]
    assert calls["get deployments"] == 1, calls   # the README's Role allows the read


def test_a_quiet_stable_refuses_unless_told_and_check_mode_reports_the_preflight(cluster, ns, prom, tmp_path):  # pylint: disable=redefined-outer-name
    api, kubeconfig = lab(cluster, prom, ns, tmp_path, stable_rps=0)
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, check=True)   # check mode: the preflight runs and refuses too
    assert_refused(cluster, api, ns, mark, result, out)
    assert ("success-rate (success_rate, stable): low traffic on the stable %s/reviews-v1 (version v1): 0 requests in 1m, min_requests is 10"
            % ns) in result["msg"]
    assert "preflight_low_traffic: skip starts without this evidence" in result["msg"]
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, check=True, preflight_low_traffic="skip")
    assert not result.get("failed") and result["result"] == "planned" and result["preflight"]["verdict"] == "pass", out[-3000:]
    assert [(c["name"], c["verdict"]) for c in result["preflight"]["checks"]] == [
        ("prometheus", "pass"), ("success-rate", "skipped"), ("canary-pods", "pass")]
    assert "preflight: success-rate skipped: low traffic on the stable" in out
    assert "patch" not in module_calls(cluster, ns, mark) and weights(api, ns) == {"v1": 100, "v2": 0}
    # traffic on the stable: the preflight passes, and the real run promotes the healthy canary
    prom.exporter.set_traffic(ns, "reviews-v1", "v1", rps=20)
    prom.wait_for_series('istio_requests_total{destination_workload_namespace="%s",destination_workload="reviews-v1"}' % ns, min_samples=3)
    mark = cluster.audit.mark()
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, checks=[SR, ERRORS])
    assert result["result"] == "promoted" and result["preflight"]["verdict"] == "pass", out[-3000:]
    checks = dict((c["name"], c) for c in result["preflight"]["checks"])
    assert checks["success-rate"]["value"] == 100.0 and checks["success-rate"]["requests"] >= 10 and checks["errors-5xx"]["value"] == 0.0
    assert weights(api, ns) == {"v1": 0, "v2": 100} and module_calls(cluster, ns, mark)["patch virtualservices"] == 2


def test_a_stable_whose_traffic_returns_while_the_preflight_retries_is_promoted(cluster, ns, prom, tmp_path):  # pylint: disable=redefined-outer-name
    """The stable's traffic paused (a deploy of the caller, a scrape missed): the preflight asks again every
    retry_interval for retry_inconclusive_for, and starts the rollout once Prometheus counts the stable's requests."""
    api, kubeconfig = lab(cluster, prom, ns, tmp_path, stable_rps=0)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(zip(("rc", "result", "out"), rollout(
        kubeconfig, tmp_path, ns, prom.url, analysis_window="30s", retry_inconclusive_for=60, retry_interval=3))))
    runner.start()
    try:
        time.sleep(8)     # the preflight has found the stable quiet at least once by now (the playbook starts in ~3 s)
        prom.exporter.set_traffic(ns, "reviews-v1", "v1", rps=20)
    finally:
        runner.join(timeout=300)
    result, out = outcome["result"], outcome["out"]
    assert result["result"] == "promoted" and result["preflight"]["verdict"] == "pass", out[-3000:]
    item = dict((c["name"], c) for c in result["preflight"]["checks"])["success-rate"]
    assert item["verdict"] == "pass" and item["attempts"] >= 2 and item["requests"] >= 10, item
    assert weights(api, ns) == {"v1": 0, "v2": 100}


def value_at(prom_, promql, at):
    """An instant query's first value at time ``at`` (as Prometheus saw it then)."""
    url = prom_.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": "%.3f" % at})
    with urllib.request.urlopen(url, timeout=10) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def when(stamp):
    """Epoch seconds of the timeline's ISO time (2026-01-01T00:00:00.12Z)."""
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_canary_turned_faulty_is_judged_on_its_steps_own_traffic(cluster, prom, history, tmp_path):  # pylint: disable=redefined-outer-name
    """The demo's second release: v2 answered well for the last minute (the first release), and from the rollout's
    start it answers 20 % errors. The step's analysis and its probes look back only to the moment the step's weight
    took effect, and measure 80 %; the whole minute would still have measured more than the 90 % the check needs."""
    ns, since = history
    api, kubeconfig = lab(cluster, prom, ns, tmp_path, stable_rps=0, canary_rps=0)   # the traffic has flowed since `since`
    time.sleep(max(0.0, HISTORY - (time.time() - since)))
    prom.exporter.set_traffic(ns, "reviews-v2", "v2", rps=20, error_ratio=0.2)   # the new release
    _rc, result, out = rollout(kubeconfig, tmp_path, ns, prom.url, interval="10s")
    assert result["failed"] and result["result"] == "rolled_back", out[-3000:]
    assert result["preflight"]["verdict"] == "pass" and weights(api, ns) == {"v1": 100, "v2": 0}
    step = result["timeline"][0]
    check = step["checks"][0]
    assert check["verdict"] == "fail" and 75 <= check["value"] <= 85, step
    window = check["query"].split("[", 1)[1].split("]", 1)[0]
    assert window.endswith("s") and not window.endswith("ms") and int(window[:-1]) <= 10, check["query"]
    # what the whole minute (analysis_window, as before issue 11) measured at the same moment
    whole = value_at(prom, check["query"].replace("[%s]" % window, "[1m]"), when(step["ended"]))
    print("step %s: %s over [%s], %.1f over [1m]; failed early: %s" % (step["step"], check["value"], window, whole, step.get("failed_early")))
    assert whole >= 90, whole
