# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 11: the preflight before a rollout's first shift, and a step's analysis window that never reaches back before
the step's weight took effect. The engine with fakes (fake_prometheus.py answers over the collection's real client);
the same cases against a real Prometheus and kube-apiserver are in tests/integration/test_canary_preflight.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks as cc
from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.prometheus import TransportError
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_prometheus import FakePrometheus
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_canary_checks import (
    CANARY, STABLE, FakeClock, FakeReader, deployment, latency, params, run)
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_rollout import Clock, Probe, annotations, make, objects, state

URL = "http://127.0.0.1:9"
TARGET = dict(namespace="shop", workload="reviews-v2", version="v2", stable_version="v1", host="reviews.shop.svc")
STABLE_TARGET = dict(namespace="shop", workload="reviews-v1", version="v1", stable_version="v1", host="reviews.shop.svc")
SR = dict(name="errors", type="success_rate", min=99)
LAT = dict(name="p99", type="latency", max=500)
ERRORS = dict(name="5xx", type="promql", max=1,
              query='sum(rate(istio_requests_total{destination_workload="{{ workload }}",response_code=~"5.."}[{{ window }}]))')
NOW = 1767225600.0   # 2026-01-01T00:00:00Z


# ------------------------------------------------------------------------------------------------
# The window of a step
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, elapsed, expected", [
    ("1m", 60, "1m"), ("1m", 90, "1m"), ("1m", 59.999, "59s"), ("1m", 29.4, "29s"), ("1m", 1.0, "1s"),
    ("1m", 0.9996, "999ms"), ("1m", 0.25, "250ms"), ("1m", 0.0004, "1ms"), ("1m", 0, "1ms"), ("1m", -3, "1ms"),
    ("1m30s", 75.5, "75s"), ("1m30s", 90, "1m30s"), ("500ms", 0.7, "500ms"), ("500ms", 0.3, "300ms"),
])
def test_step_window_never_reaches_back_before_the_start(window, elapsed, expected):
    assert cc.step_window(window, elapsed) == expected


def traffic(prom, start, before=(100, 0), after=(80, 20), labels=None, span=120):
    """Requests per second to ``labels`` (the canary's; non-5xx, 5xx): ``before`` until ``start``, ``after`` from then on."""
    labels = labels or CANARY
    for t in range(int(start) - span, int(start) + span):
        good, bad = before if t < start else after
        prom.count("istio_requests_total", t + 0.5, good, response_code="200", reporter="destination", **labels)
        prom.count("istio_requests_total", t + 0.5, bad, response_code="503", reporter="destination", **labels)


class Wall:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def busy():
    """A canary with traffic (the same count for any range)."""
    return FakePrometheus(now=lambda: NOW).add("istio_requests_total", 600, response_code="200", reporter="destination", **CANARY)


def test_with_a_start_every_query_looks_back_only_to_it():
    prom = busy()
    gate = run(params(SR, dict(ERRORS, min_requests=5)), prom, window_start=NOW - 30, wall=lambda: NOW)
    assert all("[30s]" in q for q in prom.queries) and len(prom.queries) == 4, prom.queries   # 2 request counts, 2 queries
    assert [c["query"].count("[30s]") for c in gate["checks"]] == [3, 1]
    prom = busy()
    run(params(SR), prom, window_start=None, wall=lambda: NOW)
    assert all("[1m]" in q for q in prom.queries) and len(prom.queries) == 2    # canary_gate: no start, the whole window
    prom = busy()
    run(params(SR), prom, window_start=NOW - 3600, wall=lambda: NOW)
    assert all("[1m]" in q for q in prom.queries) and len(prom.queries) == 2    # a start longer ago than the window


def test_a_baseline_token_starts_the_window_too_and_low_traffic_names_it():
    baseline = cc.take_baseline(params(SR), TARGET, wall_clock=lambda: NOW - 12.7)
    prom = FakePrometheus(now=lambda: NOW)
    gate = run(params(SR), prom, window_start=baseline, wall=lambda: NOW)
    assert prom.queries == [cc.request_count_query(TARGET, "12s")]
    assert gate["checks"][0]["reason"].endswith(": low traffic: 0 requests to shop/reviews-v2 in 12s, min_requests is 10"
                                                " (on_low_traffic: inconclusive)")


def test_each_retry_round_takes_the_window_anew():
    clock = FakeClock()

    def wall():   # the wall clock moves with the retries' sleeps
        return NOW + clock.now

    prom = FakePrometheus(now=wall)
    run(params(SR, retry_inconclusive_for=10, retry_interval=10), prom, clock=clock, window_start=wall() - 20, wall=wall)
    assert prom.queries == [cc.request_count_query(TARGET, "20s"), cc.request_count_query(TARGET, "30s")]


def test_a_canary_turned_faulty_is_judged_on_its_own_traffic():
    """The demo's case: v2 answered well under the previous release; from the step's start it fails 20 %. The whole
    minute would still measure 90 % (half of it the old traffic); the step's own 30 s measure 80 %."""
    start = NOW - 30
    prom = FakePrometheus(now=lambda: NOW)
    traffic(prom, start)
    gate = run(params(dict(SR, min=85), analysis_window="1m"), prom, window_start=start, wall=lambda: NOW)
    assert gate["verdict"] == "fail" and gate["checks"][0]["value"] == 80.0 and gate["checks"][0]["requests"] == 3000.0
    old = run(params(dict(SR, min=85), analysis_window="1m"), prom, wall=lambda: NOW)
    assert old["verdict"] == "pass" and old["checks"][0]["value"] == 90.0 and old["checks"][0]["requests"] == 6000.0


def test_the_window_placeholder_is_the_step_window():
    prom = FakePrometheus(now=lambda: NOW)
    run(params(dict(name="q", type="promql", query="sum(rate(x[{{ window }}]))", max=1)), prom, window_start=NOW - 7.9,
        wall=lambda: NOW)
    assert prom.queries == ["sum(rate(x[7s]))"]


def test_the_gate_object_remembers_its_window_for_evaluate_without_a_token():
    wall = Wall(NOW)
    prom = FakePrometheus(now=wall)
    gate = cc.CanaryGate(params(dict(SR, min_requests=0)), TARGET, http=prom.transport, wall_clock=wall)
    gate.evaluate()
    assert prom.queries[-1].endswith("[1m])) * 100")                  # never started: the whole analysis_window
    token = gate.start_window()
    assert gate.window_start is token and token["epoch"] == NOW
    wall.t = NOW + 5
    gate.evaluate()
    assert prom.queries[-1].endswith("[5s])) * 100")                  # a probe: since the step's start
    wall.t = NOW + 9
    gate.evaluate(NOW + 7)
    assert prom.queries[-1].endswith("[2s])) * 100")                  # an explicit token wins
    gate.evaluate(token)
    assert prom.queries[-1].endswith("[9s])) * 100")


# ------------------------------------------------------------------------------------------------
# Preflight (canary_checks)
# ------------------------------------------------------------------------------------------------

def stable_prom(good=600, bad=0, p99=80, **extra):
    """Istio's telemetry of the stable over the window, and the canary's, which the preflight must not ask for."""
    prom = FakePrometheus()
    labels = dict(STABLE, reporter="destination", **extra)
    if good is not None:
        prom.add("istio_requests_total", good, response_code="200", **labels)
    if bad:
        prom.add("istio_requests_total", bad, response_code="503", **labels)
    if p99 is not None:
        latency(prom, p99, **labels)
    prom.add("istio_requests_total", 1, response_code="503", reporter="destination", **CANARY)
    return prom


def preflight(checks, prom=None, reader=None, stable=None, low_traffic="fail", target=None, **top):
    p = params(*checks, **top)
    http = prom.transport if prom is not None else None
    return cc.preflight(p, target or TARGET, stable or STABLE_TARGET, k8s=reader, http=http, low_traffic=low_traffic)


def ready():
    return FakeReader(deployment(replicas=2, available=2, updated=2))


def by_name(report):
    return dict((c["name"], c) for c in report["checks"])


def test_a_healthy_setup_passes_and_reports_every_check():
    prom = stable_prom(good=594, bad=6)
    report = preflight([SR, LAT, ERRORS], prom, ready())
    assert report["verdict"] == "pass" and report["reason"] == "5 passed, 0 skipped"
    assert [(c["name"], c["type"], c["target"], c["verdict"]) for c in report["checks"]] == [
        ("prometheus", "prometheus", URL, "pass"), ("errors", "success_rate", "stable", "pass"), ("p99", "latency", "stable", "pass"),
        ("5xx", "promql", "stable", "pass"), ("canary-pods", "workload_ready", "canary", "pass")]
    checks = by_name(report)
    assert checks["prometheus"] == dict(name="prometheus", type="prometheus", target=URL, verdict="pass", query="1",
                                        reason="Prometheus at %s answers queries" % URL)
    assert checks["errors"] == dict(name="errors", type="success_rate", target="stable", verdict="pass", value=99.0, requests=600.0,
                                    query=cc.success_rate_query(STABLE_TARGET, "1m"),
                                    reason="answers for the stable shop/reviews-v1 (version v1): 99 %"
                                           " (the canary's threshold, >= 99 %, is not applied to the stable)")
    assert checks["p99"]["value"] == 80.0 and checks["p99"]["query"] == cc.latency_query(STABLE_TARGET, "1m")
    assert checks["5xx"]["value"] == 0.1 and checks["5xx"]["requests"] is None and "reviews-v1" in checks["5xx"]["query"]
    assert checks["5xx"]["reason"].endswith(": 0.1 (the canary's threshold, <= 1, is not applied to the stable)")
    assert checks["canary-pods"] == dict(name="canary-pods", type="workload_ready", target="canary", verdict="pass", value=2,
                                         threshold="== 2 (spec.replicas)", reason="Deployment shop/reviews-v2 has 2/2 replicas available and updated")
    # one reachability query, then per check its request count (built-in ones) and its query; none about the canary
    assert prom.queries[0] == "1" and len(prom.queries) == 6
    assert all('"reviews-v2"' not in q and 'destination_version="v2"' not in q for q in prom.queries)


def test_the_gate_objects_preflight_uses_its_params_connection_and_prometheus():
    prom = stable_prom()
    gate = cc.CanaryGate(params(SR, dict(name="ready", type="workload_ready")), TARGET, k8s=ready(), http=prom.transport)
    report = gate.preflight(STABLE_TARGET)
    assert report["verdict"] == "pass" and [c["name"] for c in report["checks"]] == ["prometheus", "errors", "canary-pods"]
    gate = cc.CanaryGate(params(SR), TARGET, k8s=ready(), http=stable_prom(good=3).transport)
    assert gate.preflight(STABLE_TARGET, low_traffic="skip")["checks"][1]["verdict"] == "skipped"


def test_prometheus_down_fails_first_and_its_checks_are_not_tried():
    calls = []

    def refused(url, **kwargs):
        calls.append(url)
        raise TransportError("[Errno 111] Connection refused")

    report = cc.preflight(params(SR, ERRORS), TARGET, STABLE_TARGET, k8s=ready(), http=refused)
    assert report["verdict"] == "fail" and len(calls) == 1
    assert [c["name"] for c in report["checks"]] == ["prometheus", "canary-pods"]
    item = report["checks"][0]
    assert item == dict(name="prometheus", type="prometheus", target=URL, verdict="fail", query="1",
                        reason="Prometheus at prometheus_url %s is unreachable: [Errno 111] Connection refused" % URL,
                        fix="start Prometheus or correct prometheus_url (and prometheus_headers, prometheus_validate_certs), then rerun")
    assert report["reason"] == "prometheus (prometheus, %s): %s; fix: %s" % (URL, item["reason"], item["fix"])


def test_something_that_is_not_prometheus_fails_the_reachability_check():
    prom = FakePrometheus()
    prom.answers.append((200, b"<html>login</html>"))
    report = preflight([SR], prom, ready())
    assert report["verdict"] == "fail" and report["checks"][0]["verdict"] == "fail"
    assert "did not answer like the Prometheus HTTP API" in report["checks"][0]["reason"]


def test_a_promql_typo_fails_with_prometheus_answer_and_the_fix():
    typo = dict(ERRORS, query='sum(rate(istio_requests_total{destination_workload="{{ workload }}"}[{{ window }}])')
    prom = stable_prom()
    report = preflight([SR, typo], prom, ready())
    assert report["verdict"] == "fail"
    assert [c["verdict"] for c in report["checks"]] == ["pass", "pass", "fail", "pass"]   # every check is reported
    item = by_name(report)["5xx"]
    assert item["reason"].startswith("Prometheus at %s rejected the query (HTTP 400 bad_data: parse error: " % URL)
    assert item["fix"] == "correct the PromQL of check 5xx (the query as sent is in this item's query)"
    assert item["query"] == 'sum(rate(istio_requests_total{destination_workload="reviews-v1"}[1m])' and item["requests"] is None
    assert report["reason"] == "5xx (promql, stable): %s; fix: %s" % (item["reason"], item["fix"])


def test_a_query_error_and_a_failed_request_count_fail():
    prom = stable_prom()
    prom.answers.extend([(200, {"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}),
                         (503, {"status": "error", "errorType": "unavailable", "error": "too many queries"})])
    item = by_name(preflight([SR], prom, ready()))["errors"]
    assert item["verdict"] == "fail" and "answered HTTP 503" in item["reason"] and "too many queries" in item["reason"]
    assert item["query"] == cc.request_count_query(STABLE_TARGET, "1m") and item["requests"] is None
    assert item["fix"] == "see Prometheus's answer; correct the query of check errors or the load on Prometheus, then rerun"
    prom = stable_prom()
    prom.answers.extend([(200, {"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}),
                         (422, {"status": "error", "errorType": "execution", "error": "query timed out"})])
    item = by_name(preflight([dict(SR, min_requests=0)], prom, ready()))["errors"]
    assert item["verdict"] == "fail" and "422" in item["reason"] and item["query"] == cc.success_rate_query(STABLE_TARGET, "1m")
    prom = stable_prom()
    prom.answers.extend([(200, {"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}),
                         TransportError("reset by peer")])
    item = by_name(preflight([SR], prom, ready()))["errors"]
    assert item["verdict"] == "fail" and item["fix"] == "make Prometheus answer at prometheus_url, then rerun"


@pytest.mark.parametrize("low_traffic, verdict", [("fail", "fail"), ("skip", "pass")])
def test_low_traffic_on_the_stable_follows_preflight_low_traffic(low_traffic, verdict):
    report = preflight([SR], stable_prom(good=9), ready(), low_traffic=low_traffic)
    item = by_name(report)["errors"]
    assert report["verdict"] == verdict and item["requests"] == 9.0 and item["query"] == cc.request_count_query(STABLE_TARGET, "1m")
    words = "low traffic on the stable shop/reviews-v1 (version v1): 9 requests in 1m, min_requests is 10"
    if low_traffic == "fail":
        assert item["verdict"] == "fail" and item["reason"] == (
            words + "; the gate could not judge the canary on this traffic either (preflight_low_traffic: fail)")
        assert item["fix"] == ("send traffic to the stable shop/reviews-v1 (version v1), or check the metric and label names of the"
                               " query; preflight_low_traffic: skip starts without this evidence")
    else:
        assert item["verdict"] == "skipped" and item["reason"] == words + " (preflight_low_traffic: skip)" and "fix" not in item
        assert report["reason"] == "2 passed, 1 skipped (errors)"


def test_low_traffic_counts_what_the_stable_answered_to_the_hundredth():
    item = by_name(preflight([SR], stable_prom(good=9.4567, p99=None), ready()))["errors"]
    assert item["requests"] == 9.4567 and "9.46 requests in 1m, min_requests is 10" in item["reason"]
    item = by_name(preflight([dict(SR, min_requests=1)], stable_prom(good=None, p99=None), ready()))["errors"]
    assert item["verdict"] == "fail" and item["requests"] == 0.0    # no series at all: no requests
    assert item["reason"].startswith("low traffic on the stable shop/reviews-v1 (version v1): 0 requests in 1m, min_requests is 1;")


def test_low_traffic_boundary_and_the_checks_own_minimum():
    assert preflight([SR], stable_prom(good=10), ready())["verdict"] == "pass"               # min_requests 10: 10 is enough
    assert preflight([dict(SR, min_requests=11)], stable_prom(good=10), ready())["verdict"] == "fail"
    assert preflight([SR], stable_prom(good=9), ready(), min_requests=9)["verdict"] == "pass"
    prom = stable_prom(good=None, p99=None)
    assert preflight([dict(SR, min_requests=0)], prom, ready())["checks"][1]["reason"].startswith("the query returned no series")
    assert prom.queries == ["1", cc.success_rate_query(STABLE_TARGET, "1m")]                   # no request count with 0


@pytest.mark.parametrize("low_traffic", ["fail", "skip"])
def test_no_series_and_nan_follow_preflight_low_traffic(low_traffic):
    misspelled = dict(ERRORS, query='sum(rate(istio_request_total{destination_workload="{{ workload }}"}[{{ window }}]))')
    nan = dict(name="nan", type="promql", max=1, query="sum(rate(x[{{ window }}])) / sum(rate(x[{{ window }}]))")
    prom = stable_prom().add("x", 0)
    report = preflight([misspelled, nan], prom, ready(), low_traffic=low_traffic)
    expected = "fail" if low_traffic == "fail" else "skipped"
    assert [c["verdict"] for c in report["checks"]] == ["pass", expected, expected, "pass"]
    assert report["checks"][1]["reason"].startswith("the query returned no series for the stable shop/reviews-v1 (version v1) (a misspelled"
                                                    " metric or label name, or no traffic)")
    assert report["checks"][2]["reason"].startswith("the query returned NaN for the stable shop/reviews-v1 (version v1) (no requests in 1m,"
                                                    " or 0/0)")
    assert report["verdict"] == ("fail" if low_traffic == "fail" else "pass")


def test_a_nan_in_one_of_several_series_is_nan():
    prom = stable_prom().add("y", 1, a="1").add("y", float("nan"), a="2")
    report = preflight([dict(name="y", type="promql", query="y", max=5)], prom, ready())
    assert report["checks"][1]["verdict"] == "fail" and "NaN" in report["checks"][1]["reason"]


def test_several_series_report_the_worst_one():
    prom = stable_prom().add("y", 1, a="1").add("y", 7, a="2").add("y", 3, a="3")
    report = preflight([dict(name="y", type="promql", query="y", max=5), dict(name="z", type="promql", query="y", min=2)], prom, ready())
    assert [c["value"] for c in report["checks"][1:3]] == [7.0, 1.0] and report["verdict"] == "pass"


def test_the_stable_without_a_known_workload():
    stable = dict(STABLE_TARGET, workload=None)
    prom = stable_prom()
    report = preflight([SR, ERRORS], prom, ready(), stable=stable)
    checks = by_name(report)
    sel = 'reporter="destination",destination_workload_namespace="shop",destination_version="v1"'
    assert checks["errors"]["verdict"] == "pass" and checks["errors"]["query"] == cc.success_rate_query(stable, "1m")
    assert 'istio_requests_total{%s}' % sel in checks["errors"]["query"]
    assert "answers for the stable namespace shop (version v1)" in checks["errors"]["reason"]
    assert checks["5xx"] == dict(name="5xx", type="promql", target="stable", verdict="fail",
                                 reason="the query cannot be aimed at the stable: the query uses {{ workload }} but the target has no workload",
                                 fix="set stable_workload (the stable's Deployment, Istio's destination_workload)")
    report = preflight([SR], stable_prom(), ready(), stable=dict(STABLE_TARGET, workload=None, version=None))
    assert "answers for the stable namespace shop:" in report["checks"][1]["reason"]


def test_checks_without_prometheus_ask_it_nothing():
    http = dict(name="hook", type="http", url="http://127.0.0.1:9/ok")
    report = cc.preflight(dict(checks=[http]), TARGET, STABLE_TARGET, k8s=ready(),
                          http=lambda *a, **k: pytest.fail("no request expected"))
    assert report["verdict"] == "pass" and [c["name"] for c in report["checks"]] == ["canary-pods"]
    assert report["reason"] == "1 passed, 0 skipped"


@pytest.mark.parametrize("dep, verdict, reason", [
    (deployment(replicas=2, available=0, updated=2), "fail", "Deployment shop/reviews-v2 has 0/2 replicas available, 2 updated"),
    (deployment(replicas=2, available=1, updated=2), "fail", "Deployment shop/reviews-v2 has 1/2 replicas available, 2 updated"),
    (deployment(replicas=0, available=0, updated=0), "fail", "Deployment shop/reviews-v2 has spec.replicas 0"),
    (deployment(replicas=1, available=1, updated=1, generation=3, observed=2), "fail",
     "Deployment shop/reviews-v2: the controller has not observed generation 3"),
    (deployment(replicas=1, available=1, updated=1), "pass", "Deployment shop/reviews-v2 has 1/1 replicas available and updated"),
])
def test_the_canary_needs_ready_pods(dep, verdict, reason):
    report = preflight([], reader=FakeReader(dep))
    item = report["checks"][0]
    assert report["verdict"] == verdict and item["verdict"] == verdict and item["reason"].startswith(reason)
    if verdict == "fail":
        assert item["fix"] == "wait until the canary's pods are ready (kubectl -n shop rollout status deployment/reviews-v2), then rerun"
        assert report["reason"] == "canary-pods (workload_ready, canary): %s; fix: %s" % (item["reason"], item["fix"])
    else:
        assert "fix" not in item


@pytest.mark.parametrize("min_available, available, verdict", [(2, 2, "pass"), (2, 1, "fail"), (0, 0, "fail"), (0, 1, "pass"), (1, 0, "fail")])
def test_the_workload_ready_checks_min_available_and_at_least_one_pod(min_available, available, verdict):
    ready_check = dict(name="ready", type="workload_ready", min_available=min_available)
    report = preflight([ready_check], reader=FakeReader(deployment(replicas=3, available=available, updated=3)))
    assert report["verdict"] == verdict and report["checks"][0]["threshold"] == ">= %d available" % max(1, min_available)


def test_canary_pods_without_a_workload_a_connection_or_a_deployment():
    report = preflight([], reader=ready(), target=dict(TARGET, workload=None))
    assert report == {"verdict": "pass", "reason": "0 passed, 1 skipped (canary-pods)", "checks": [dict(
        name="canary-pods", type="workload_ready", target="canary", verdict="skipped",
        reason="no canary_workload was given, so the canary's pods were not checked; set it to have them checked")]}
    rbac = "check the Kubernetes connection and that it may get deployments.apps in namespace shop (README: RBAC)"
    item = preflight([], reader=None)["checks"][0]
    assert item["verdict"] == "fail" and item["reason"] == "no Kubernetes connection was given to read Deployment shop/reviews-v2"
    assert item["fix"] == rbac
    item = preflight([], reader=FakeReader(error=cc.K8sReadError("reading Deployment shop/reviews-v2: Kubernetes API answered 404: gone", 404)))["checks"][0]
    assert item["verdict"] == "fail" and item["fix"] == "correct canary_workload, or create the canary's Deployment first"
    assert item["reason"] == "reading Deployment shop/reviews-v2: Kubernetes API answered 404: gone"
    item = preflight([], reader=FakeReader(error=cc.K8sReadError("forbidden", 403)))["checks"][0]
    assert item["verdict"] == "fail" and item["fix"] == rbac


def test_a_wrong_low_traffic_choice_is_refused():
    with pytest.raises(cc.CanaryCheckError, match="preflight_low_traffic: 'warn' is not one of fail, skip"):
        preflight([], reader=ready(), low_traffic="warn")


@pytest.mark.parametrize("canary, version, stable_version, expected", [
    ("payment-v2", "v2", "v1", "payment-v1"), ("reviews-v3", "v3", "v1", "reviews-v1"), ("payment", "v2", "v1", None),
    ("v2", "v2", "v1", None), (None, "v2", "v1", None), ("payment-v2", None, "v1", None), ("payment-v2", "v2", None, None),
    ("payment-v2", "", "v1", None),
])
def test_the_stable_workload_by_the_usual_naming(canary, version, stable_version, expected):
    assert cc.stable_workload_name(canary, version, stable_version) == expected


# ------------------------------------------------------------------------------------------------
# Preflight in the rollout (rollout.py)
# ------------------------------------------------------------------------------------------------

class Preflight:
    """The preflight's answer, and when it was asked (with the writes made by then)."""

    def __init__(self, store, verdict="pass"):
        self.store = store
        self.verdict = verdict
        self.asked = []

    def __call__(self):
        self.asked.append(dict(self.store.calls))
        return {"verdict": self.verdict, "checks": [{"name": "prometheus", "verdict": self.verdict}],
                "reason": "prometheus (prometheus, http://p:9090): down; fix: start it" if self.verdict == "fail" else "1 passed, 0 skipped"}


def with_preflight(verdict="pass", store=None, **kwargs):
    store = store or FakeIstio(objects())
    check = Preflight(store, verdict)
    store, gate, clock, rollout = make(store=store, **kwargs)
    return store, gate, check, rollout


def test_the_preflight_runs_once_before_the_first_write_and_is_reported():
    store, gate, check, rollout = with_preflight()
    result = rollout.run(preflight=check)
    assert result["result"] == "promoted" and check.asked == [{"read": 2, "write": 0}]   # the VirtualService and its DestinationRules
    assert result["preflight"] == {"verdict": "pass", "checks": [{"name": "prometheus", "verdict": "pass"}], "reason": "1 passed, 0 skipped"}
    assert store.calls["write"] == 5 and gate.seen == [5, 10, 25, 50]


def test_a_failed_preflight_writes_nothing_and_names_the_check():
    store, gate, check, rollout = with_preflight("fail")
    with pytest.raises(ro.RolloutError) as caught:
        rollout.run(preflight=check)
    assert str(caught.value) == ("preflight failed, so canary v2 gets no traffic: prometheus (prometheus, http://p:9090): down; fix: start it;"
                                 " this run wrote nothing: traffic stays v1=100, v2=0 (canary v2 gets 0 % of it)")
    assert caught.value.result == dict(canary="v2", stable="v1", holder=rollout.holder, weights_before={"v1": 100, "v2": 0}, changed=False,
                                       result="not_started", weights_after={"v1": 100, "v2": 0}, timeline=[], preflight=check())
    assert store.calls["write"] == 0 and store.patches == [] and gate.windows == 0 and len(check.asked) == 2
    assert annotations(store) == {} and current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}


def test_check_mode_runs_the_preflight_and_reports_it():
    store, _gate, check, rollout = with_preflight()
    result = rollout.run(check_mode=True, preflight=check)
    assert result["result"] == "planned" and result["preflight"]["verdict"] == "pass" and len(check.asked) == 1
    store, _gate, check, rollout = with_preflight("fail")
    with pytest.raises(ro.RolloutError, match="^preflight failed, so canary v2 gets no traffic") as caught:
        rollout.run(check_mode=True, preflight=check)
    assert caught.value.result["result"] == "not_started" and store.calls["write"] == 0


def test_a_canary_that_already_has_traffic_is_not_preflighted():
    store, _gate, check, rollout = with_preflight("fail", store=FakeIstio(objects(stable=75, canary=25)))
    result = rollout.run(preflight=check)
    assert result["result"] == "promoted" and check.asked == []
    assert result["preflight"] == {"verdict": "skipped", "checks": [],
                                   "reason": "canary v2 already gets 25 % of the traffic: the analysis of its step judges it"}


def test_a_resumed_run_at_zero_weight_is_preflighted():
    store, _gate, _clock, first = make(verdicts=["pass", "fail"], on_failure="hold")
    first.run()
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"][0]["weight"] = 100
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"][1]["weight"] = 0
    writes = store.calls["write"]
    _store, _gate, check, rerun = with_preflight("fail", store=store, on_failure="hold")
    with pytest.raises(ro.RolloutError, match="^preflight failed"):
        rerun.run(preflight=check)
    assert len(check.asked) == 1 and store.calls["write"] == writes and state(store)["phase"] == "held"


def test_no_preflight_nothing_reported_and_a_promoted_rollout_is_not_preflighted():
    _store, _gate, _clock, rollout = make()
    assert "preflight" not in rollout.run()
    store = FakeIstio(objects())
    make(store=store)[3].run()
    _store, _gate, check, again = with_preflight("fail", store=store)
    result = again.run(preflight=check)
    assert result["result"] == "promoted" and result["note"].startswith("already promoted") and check.asked == [] and "preflight" not in result


def test_a_held_lease_is_refused_before_the_preflight():
    store = FakeIstio(objects())
    first = make(store=store, lease_seconds=600)[3]

    def killed(token):   # like Ctrl-C in the first window: the lease stays
        raise KeyboardInterrupt()

    first.gate.evaluate = killed
    with pytest.raises(KeyboardInterrupt):
        first.run()
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"][1]["weight"] = 0
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"][0]["weight"] = 100
    _store, _gate, check, second = with_preflight(store=store)
    with pytest.raises(ro.LeaseHeld):
        second.run(preflight=check)
    assert check.asked == []


def test_each_step_starts_the_probes_window_after_its_write():
    clock = Clock()
    probe = Probe(clock, [])
    store, gate, clock, rollout = make(clock=clock, probe=probe, probe_every=10, steps=(5, 50))
    start = clock.t
    rollout.run()
    assert probe.windows == [start, start + 30] and gate.windows == 2


def test_a_step_and_its_probes_are_judged_on_the_steps_own_traffic():
    """The demo's second release: v2 answered well until the rollout began and fails 20 % from then on. The first
    probe, 5 s into the step, looks back 5 s and fails the step at once with 80 %."""
    clock = Clock()
    prom = FakePrometheus(now=clock.now)
    traffic(prom, clock.t, labels=CANARY, span=300)
    check_params = params(dict(SR, min=95), analysis_window="1m")
    gate = cc.CanaryGate(check_params, TARGET, http=prom.transport, wall_clock=clock.now, sleep=clock.sleep)
    probe = cc.CanaryGate(ro.probe_checks(check_params), TARGET, http=prom.transport, wall_clock=clock.now, sleep=clock.sleep)
    store = FakeIstio(objects())
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    rollout = ro.Rollout(change, gate, "v1", "v2", ro.plan_steps([20, 50], interval="30s"), now=clock.now, sleep=clock.sleep,
                         probe=probe, probe_every=5)
    result = rollout.run()
    first = result["timeline"][0]
    assert result["result"] == "rolled_back" and first["failed_early"] is True and first["seconds"] == 5.0
    assert first["checks"][0]["value"] == 80.0 and "[5s]" in first["checks"][0]["query"] and "[1m]" not in first["checks"][0]["query"]
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}
    # the whole minute before that probe would have measured 100 % for 55 s and 80 % for 5 s
    assert cc.evaluate_gate(check_params, TARGET, http=prom.transport, wall_clock=clock.now)["checks"][0]["value"] == pytest.approx(98.333, abs=0.001)


def test_a_route_without_the_canary_yet_is_preflighted():
    store = FakeIstio(objects())
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"] = [
        {"destination": {"host": "payment", "subset": "v1"}, "weight": 100}]
    _store, _gate, check, rollout = with_preflight("fail", store=store)
    with pytest.raises(ro.RolloutError, match="^preflight failed, so canary v2 gets no traffic") as caught:
        rollout.run(preflight=check)
    assert len(check.asked) == 1 and store.calls["write"] == 0 and caught.value.result["weights_before"] == {"v1": 100}


# ------------------------------------------------------------------------------------------------
# A quiet stable is asked again (retry_inconclusive_for, retry_interval), as the gate retries
# ------------------------------------------------------------------------------------------------

def retried(checks, prom, clock, low_traffic="fail", **top):
    p = params(*checks, **top)
    return cc.preflight(p, TARGET, STABLE_TARGET, k8s=ready(), http=prom.transport, low_traffic=low_traffic, clock=clock, sleep=clock.sleep)


def test_a_stable_that_gets_its_traffic_while_retried_passes():
    prom = stable_prom(good=None).add("up", 1)
    clock = FakeClock(meanwhile=[lambda: None, lambda: prom.add("istio_requests_total", 600, response_code="200", reporter="destination", **STABLE)])
    report = retried([SR, LAT, dict(name="scalar", type="promql", max=1, query="sum(rate(up[{{ window }}]))")], prom, clock, retry_inconclusive_for=30,
                     retry_interval=10)
    item = by_name(report)["errors"]
    assert report["verdict"] == "pass" and item["verdict"] == "pass" and item["attempts"] == 3 and item["requests"] == 600.0
    assert clock.sleeps == [10, 10]
    assert by_name(report)["p99"]["attempts"] == 3              # its request count was quiet too
    assert "attempts" not in by_name(report)["scalar"]          # answered at once: asked once, not again
    assert prom.queries.count("sum(rate(up[1m]))") == 1
    assert "quiet" not in item


def test_a_stable_still_quiet_fails_after_the_retries_and_says_how_often_it_was_asked():
    prom = stable_prom(good=4)
    clock = FakeClock()
    report = retried([SR], prom, clock, retry_inconclusive_for=25, retry_interval=10)
    item = by_name(report)["errors"]
    assert report["verdict"] == "fail" and item["attempts"] == 3 and clock.sleeps == [10, 10] and "quiet" not in item
    assert prom.queries.count(cc.request_count_query(STABLE_TARGET, "1m")) == 3
    assert item["reason"].startswith("low traffic on the stable shop/reviews-v1 (version v1): 4 requests in 1m, min_requests is 10")


def test_the_retries_end_at_retry_inconclusive_for():
    clock = FakeClock()
    report = retried([SR], stable_prom(good=4), clock, retry_inconclusive_for=9, retry_interval=10)
    assert clock.sleeps == [] and "attempts" not in by_name(report)["errors"]      # no second round fits in 9 s
    clock = FakeClock()
    retried([SR], stable_prom(good=4), clock, retry_inconclusive_for=10, retry_interval=10)
    assert clock.sleeps == [10]
    clock = FakeClock()
    retried([SR], stable_prom(good=4), clock, retry_inconclusive_for=0)
    assert clock.sleeps == []


def test_what_a_retry_cannot_change_is_not_retried():
    clock = FakeClock()
    typo = dict(ERRORS, query='sum(rate(istio_requests_total{destination_workload="{{ workload }}"}[{{ window }}])')
    report = retried([typo], stable_prom(), clock, retry_inconclusive_for=60)
    assert report["verdict"] == "fail" and clock.sleeps == [] and "attempts" not in report["checks"][1]
    clock = FakeClock()
    report = retried([SR], stable_prom(good=4), clock, low_traffic="skip", retry_inconclusive_for=60)
    assert report["verdict"] == "pass" and by_name(report)["errors"]["verdict"] == "skipped" and clock.sleeps == []


def test_the_preflight_validates_its_parameters():
    with pytest.raises(cc.CanaryCheckError, match="retry_interval: must be at least 1 second"):
        retried([SR], stable_prom(), FakeClock(), retry_interval=0)


def test_the_gate_objects_preflight_retries_on_its_clock():
    prom = stable_prom(good=4)
    clock = FakeClock()
    gate = cc.CanaryGate(params(SR, retry_inconclusive_for=20, retry_interval=10), TARGET, k8s=ready(), http=prom.transport,
                         clock=clock, sleep=clock.sleep)
    assert by_name(gate.preflight(STABLE_TARGET))["errors"]["attempts"] == 3 and clock.sleeps == [10, 10]


class StoppedClock(FakeClock):
    """A clock that a sleep does not move (a sleep cut short, a coarse clock): only the number of rounds bounds the retries."""

    def sleep(self, seconds):
        self.sleeps.append(seconds)


def test_the_retries_are_bounded_by_their_number_too_when_the_clock_does_not_move():
    clock = StoppedClock()
    report = retried([SR], stable_prom(good=4), clock, retry_inconclusive_for=25, retry_interval=10)
    assert by_name(report)["errors"]["attempts"] == 3 and clock.sleeps == [10, 10]


def test_slow_queries_count_against_retry_inconclusive_for():
    clock = FakeClock()
    prom = stable_prom(good=4)
    answer = prom.transport

    def eight_seconds_per_query(url, **kwargs):
        clock.now += 8
        return answer(url, **kwargs)

    p = params(SR, retry_inconclusive_for=25, retry_interval=10)
    report = cc.preflight(p, TARGET, STABLE_TARGET, k8s=ready(), http=eight_seconds_per_query, clock=clock, sleep=clock.sleep)
    # the retries start after "up" (8 s) and last until 33 s: round 1 ends at 16 s, round 2 begins at 26 s and ends at 34 s,
    # and a third round would begin at 44 s, past 33 s: not begun
    assert by_name(report)["errors"]["attempts"] == 2 and clock.sleeps == [10]
