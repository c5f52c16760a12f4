# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The health-check engine with fakes: no Prometheus, no cluster, no real time."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks as cc
from ansible_collections.onprem.mesh.plugins.module_utils.prometheus import (
    PrometheusClient,
    PrometheusError,
    TransportError,
    urls_transport,
)
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_prometheus import FakePrometheus

NAN = float("nan")
TARGET = dict(namespace="shop", workload="reviews-v2", version="v2", stable_version="v1", host="reviews.shop.svc")


# ------------------------------------------------------------------------------------------------
# Fakes
# ------------------------------------------------------------------------------------------------

class FakeClock:
    """Monotonic clock whose sleep() advances it; counts sleeps. ``meanwhile``: what happens in the world
    during each sleep, in order (e.g. Prometheus scrapes the canary's first series)."""

    def __init__(self, meanwhile=()):
        self.now = 1000.0
        self.sleeps = []
        self.meanwhile = list(meanwhile)

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds
        if self.meanwhile:
            self.meanwhile.pop(0)()


CANARY = dict(destination_workload_namespace="shop", destination_workload="reviews-v2", destination_version="v2")
STABLE = dict(destination_workload_namespace="shop", destination_workload="reviews-v1", destination_version="v1")


def latency(prom, p99, **labels):
    """Request-duration buckets whose p99 is ``p99`` ms: 98 of 100 requests took at most that long, 2 longer
    (histogram_quantile places a quantile past the last finite bucket at that bucket's bound)."""
    for le, count in ((repr(float(p99)), 98), ("+Inf", 100)):
        prom.add("istio_request_duration_milliseconds_bucket", count, le=le, **labels)


def prometheus(good=None, errors=None, p99=None, reporter="destination", **canary):
    """Istio's telemetry for the window: the canary answered ``good`` non-5xx and ``errors`` 5xx requests
    (None: no such series) in ``p99`` ms. Beside it, what a query must not pick up: the stable version (half
    its requests fail, p99 3 s) and the other reporter's view of the canary (also half failing)."""
    prom = FakePrometheus()
    labels = dict(CANARY, reporter=reporter, **canary)
    if good is not None:
        prom.add("istio_requests_total", good, response_code="200", **labels)
    if errors is not None:
        prom.add("istio_requests_total", errors, response_code="503", **labels)
    if p99 is not None:
        latency(prom, p99, **labels)
    other_reporter = "source" if reporter == "destination" else "destination"
    for decoy in (dict(STABLE, reporter=reporter), dict(CANARY, reporter=other_reporter)):
        prom.add("istio_requests_total", 500, response_code="200", **decoy)
        prom.add("istio_requests_total", 500, response_code="500", **decoy)
        latency(prom, 3000, **decoy)
    return prom


class FakeReader:
    def __init__(self, deployment=None, pods=None, error=None):
        self.deployment = deployment
        self.pods = pods or []
        self.error = error
        self.selectors = []

    def read_deployment(self, namespace, name):
        if self.error:
            raise self.error
        return self.deployment

    def list_pods(self, namespace, label_selector):
        self.selectors.append(label_selector)
        return self.pods


def deployment(replicas=3, available=3, updated=3, generation=2, observed=2):
    return {"metadata": {"name": "reviews-v2", "namespace": "shop", "generation": generation},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "reviews", "version": "v2"}}},
            "status": {"availableReplicas": available, "updatedReplicas": updated, "observedGeneration": observed}}


def pod(name, restarts=0, finished=None, created="2025-01-01T00:00:00Z", uid=None, container="app"):
    status = {"name": container, "restartCount": restarts}
    if finished:
        status["lastState"] = {"terminated": {"finishedAt": finished}}
    return {"metadata": {"name": name, "uid": uid or name + "-uid", "creationTimestamp": created},
            "status": {"containerStatuses": [status]}}


def params(*checks, **top):
    out = dict(prometheus_url="http://127.0.0.1:9", checks=list(checks), retry_inconclusive_for=0)
    out.update(top)
    return out


def run(p, prom=None, reader=None, http=None, clock=None, window_start=None, target=None, wall=None):
    """evaluate_gate as the modules call it: Prometheus reached through the collection's client over HTTP."""
    clock = clock or FakeClock()
    if prom is not None:
        prom.other, http = http, prom.transport
    return cc.evaluate_gate(p, target or TARGET, k8s=reader, http=http, clock=clock, sleep=clock.sleep,
                            window_start=window_start, wall_clock=wall or (lambda: 1767225600.0))


SR = dict(name="errors", type="success_rate", min=99)
LAT = dict(name="p99", type="latency", max=500)


# ------------------------------------------------------------------------------------------------
# Queries and templates
# ------------------------------------------------------------------------------------------------

def test_success_rate_query_selects_canary_istio_labels():
    q = cc.success_rate_query(TARGET, "1m")
    sel = 'reporter="destination",destination_workload_namespace="shop",destination_workload="reviews-v2",destination_version="v2"'
    assert q == ('(sum(rate(istio_requests_total{%s,response_code!~"5.."}[1m])) or sum(rate(istio_requests_total{%s}[1m])) * 0)'
                 ' / sum(rate(istio_requests_total{%s}[1m])) * 100' % (sel, sel, sel))


def test_latency_query_is_histogram_quantile_summed_by_le():
    q = cc.latency_query(dict(namespace="shop", workload="reviews-v2"), "30s", 0.95, "source")
    assert q == ('histogram_quantile(0.95, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter="source",'
                 'destination_workload_namespace="shop",destination_workload="reviews-v2"}[30s])))')


def test_label_values_are_escaped():
    q = cc.request_count_query(dict(namespace='a"b', workload="c\\d", version="x\ny"), "1m")
    assert 'destination_workload_namespace="a\\"b"' in q and 'destination_workload="c\\\\d"' in q and 'destination_version="x\\ny"' in q


def test_render_query_refuses_what_it_cannot_fill():
    with pytest.raises(cc.CanaryCheckError, match=r"unknown placeholder \{\{ colour \}\}"):
        cc.render_query("x{c=\"{{ colour }}\"}", TARGET, "1m")
    with pytest.raises(cc.CanaryCheckError, match=r"the query uses \{\{ host \}\} but the target has no host"):
        cc.render_query("x{h=\"{{ host }}\"}", dict(TARGET, host=""), "1m")
    assert cc.render_query("rate(x[{{ window }}])", dict(namespace="shop"), "2m30s") == "rate(x[2m30s])"


def test_a_target_is_a_canary_target_or_a_dict():
    target = cc.CanaryTarget("shop", "reviews-v2")
    assert cc.CanaryTarget.from_any(target) is target
    assert cc.CanaryTarget.from_any(TARGET).as_dict() == TARGET
    with pytest.raises(cc.CanaryCheckError, match="target must be a CanaryTarget or a dict, got list"):
        cc.CanaryTarget.from_any(["shop"])


def test_render_query_replaces_all_placeholders():
    out = cc.render_query('x{ns="{{ namespace }}",w="{{workload}}",v="{{  version }}",s="{{ stable_version }}",'
                          'h="{{ host }}"}[{{ window }}]', TARGET, "2m")
    assert out == 'x{ns="shop",w="reviews-v2",v="v2",s="v1",h="reviews.shop.svc"}[2m]'


def test_custom_query_is_rendered_and_run():
    prom = FakePrometheus().add("x", 60, ns="shop").add("x", 6000, ns="shop-staging")
    gate = run(params(dict(name="resets", type="promql", query='sum(rate(x{ns="{{ namespace }}"}[{{ window }}]))', max=1),
                      analysis_window="5m"), prom)
    assert gate["verdict"] == "pass" and gate["checks"][0]["value"] == 0.2   # 60 in 5 minutes
    assert prom.queries == ['sum(rate(x{ns="shop"}[5m]))']  # no traffic guard unless min_requests is set
    assert gate["checks"][0]["query"] == 'sum(rate(x{ns="shop"}[5m]))'


def test_window_seconds():
    assert cc.window_seconds("1m30s") == 90
    assert cc.window_seconds("500ms") == 0.5


def test_label_selector_from_match_labels_and_expressions():
    sel = {"matchLabels": {"version": "v2", "app": "reviews"},
           "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                {"key": "x", "operator": "NotIn", "values": ["y"]},
                                {"key": "e", "operator": "Exists"}, {"key": "d", "operator": "DoesNotExist"}]}
    assert cc.label_selector(sel) == "app=reviews,version=v2,tier in (a,b),x notin (y),e,!d"


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checks, top, message", [
    ([SR, dict(name="lat", type="latency")], {}, "checks[1].max: latency check needs max (milliseconds), e.g. max: 500"),
    ([dict(name="e", type="success_rate")], {}, "checks[0].min: success_rate check needs min (percent of non-5xx requests)"),
    ([dict(name="e", type="success_rate", min=99.5 * 2)], {}, "checks[0].min: success_rate is a percentage"),
    ([dict(name="e", type="success_rate", min=99, max=1)], {}, "checks[0].max: a success_rate check does not take max"),
    ([dict(name="l", type="latency", max=5, quantile=99)], {}, "checks[0].quantile: must be between 0 and 1"),
    ([dict(name="q", type="promql", min=1)], {}, "checks[0].query: promql check needs a query"),
    ([dict(name="q", type="promql", query="up")], {}, "checks[0].min: promql check needs min or max"),
    ([dict(name="q", type="promql", query="up", min=2, max=1)], {}, "checks[0].min: min 2 is greater than max 1"),
    ([dict(name="q", type="promql", query="x{a='{{ nope }}'}", max=1)], {}, "checks[0].query: unknown placeholder {{ nope }}"),
    ([dict(name="q", type="bogus")], {}, "checks[0].type: 'bogus' is not a check type"),
    ([dict(type="latency", max=1)], {}, "checks[0].name: every check needs a name"),
    ([SR, dict(SR)], {}, "checks[1].name: 'errors' is used twice"),
    ([dict(SR, on_nan="maybe")], {}, "checks[0].on_nan: 'maybe' is not one of fail, pass, inconclusive"),
    ([dict(SR, colour="red")], {}, "checks[0]: unknown option(s) colour"),
    ([dict(name="h", type="http", url="ftp://x")], {}, "checks[0].url: http check needs an http:// or https:// URL"),
    ([dict(name="h", type="http", url="http://x", method="FETCH")], {}, "checks[0].method: 'FETCH' is not an HTTP method"),
    ([SR], {"prometheus_url": None}, "prometheus_url: success_rate, latency and promql checks need it"),
    ([SR], {"analysis_window": "1 minute"}, "analysis_window: '1 minute' is not a PromQL duration"),
    ([SR], {"retry_inconclusive_for": 7200}, "retry_inconclusive_for: 7200 s is more than the 3600 s limit"),
    ([SR], {"retry_interval": 0}, "retry_interval: must be at least 1 second"),
    ([SR], {"on_error": "ignore"}, "on_error: 'ignore' is not one of fail, pass, inconclusive"),
    ([], {}, "checks: the gate has no checks"),
])
def test_spec_errors_name_the_field_and_the_fix(checks, top, message):
    with pytest.raises(cc.CanaryCheckError) as err:
        run(params(*checks, **top), FakePrometheus())
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_placeholder_without_target_value_is_an_error():
    with pytest.raises(cc.CanaryCheckError, match=r"checks\[0\].query: uses \{\{ version \}\} but the target has no version"):
        run(params(dict(name="q", type="promql", query='x{v="{{ version }}"}', max=1)), FakePrometheus(),
            target=dict(namespace="shop", workload="w"))


def test_builtin_check_needs_namespace_and_workload():
    with pytest.raises(cc.CanaryCheckError, match=r"checks\[0\]: a success_rate check needs the target's workload"):
        run(params(SR), FakePrometheus(), target=dict(namespace="shop"))


def test_unknown_target_key():
    with pytest.raises(cc.CanaryCheckError, match="target: unknown keys colour"):
        run(params(SR), FakePrometheus(), target=dict(TARGET, colour="red"))


def test_argspec_has_the_contract_keys():
    for key in ("prometheus_url", "prometheus_validate_certs", "prometheus_headers", "checks", "analysis_window", "min_requests",
                "retry_inconclusive_for", "retry_interval", "on_no_data", "on_nan", "on_error", "on_low_traffic"):
        assert key in cc.CHECKS_ARGSPEC
    assert cc.CHECKS_ARGSPEC["prometheus_headers"]["no_log"] is True
    assert cc.CHECKS_ARGSPEC["prometheus_validate_certs"]["default"] is True
    assert all(cc.CHECKS_ARGSPEC[p]["default"] == "inconclusive" for p in cc.POLICY_NAMES)


# ------------------------------------------------------------------------------------------------
# Verdicts and thresholds
# ------------------------------------------------------------------------------------------------

def test_healthy_canary_passes_with_values():
    gate = run(params(SR, LAT), prometheus(good=9970, errors=30, p99=120))
    assert gate["verdict"] == "pass" and gate["reason"] == "all 2 checks passed" and gate["rounds"] == 1
    assert [(c["name"], c["value"], c["verdict"], c["attempts"]) for c in gate["checks"]] == [
        ("errors", 99.7, "pass", 1), ("p99", 120.0, "pass", 1)]
    assert gate["checks"][0]["threshold"] == ">= 99 %" and gate["checks"][1]["threshold"] == "<= 500 ms"
    assert gate["checks"][0]["requests"] == 10000.0
    assert set(gate) >= {"verdict", "checks", "started", "ended", "duration", "reason"}
    assert gate["started"].startswith("2026-01-01T00:00:00")


@pytest.mark.parametrize("good, errors, value, verdict", [
    (5940, 60, 99.0, "pass"), (98999, 1001, 98.999, "fail"), (100, None, 100.0, "pass"), (None, 100, 0.0, "fail")])
def test_success_rate_boundary(good, errors, value, verdict):
    gate = run(params(SR), prometheus(good=good, errors=errors))
    assert gate["checks"][0]["value"] == value   # a canary that only answered 5xx measures 0 %, not "no data"
    assert gate["checks"][0]["verdict"] == verdict and gate["verdict"] == verdict


@pytest.mark.parametrize("value, verdict", [(500.0, "pass"), (500.001, "fail"), (499.999, "pass")])
def test_latency_boundary(value, verdict):
    gate = run(params(LAT), prometheus(good=100, p99=value))
    assert gate["checks"][0]["value"] == value and gate["checks"][0]["verdict"] == verdict


def test_an_infinite_value_fails_a_max():
    gate = run(params(dict(name="q", type="promql", query="scalar(x) / 0", max=500)), FakePrometheus().add("x", 1))
    assert gate["checks"][0]["value"] == float("inf") and gate["verdict"] == "fail" and "+Inf is not <= 500" in gate["checks"][0]["reason"]


def test_failure_message_names_check_and_value():
    gate = run(params(SR, LAT), prometheus(good=80, errors=20, p99=100))
    assert gate["verdict"] == "fail"
    assert "errors (success_rate): fail - 80 % is not >= 99 %" in gate["reason"]
    assert "p99" not in gate["reason"]


def test_promql_range_min_and_max():
    check = dict(name="q", type="promql", query="up", min=1, max=3)
    assert run(params(check), FakePrometheus().add("up", 1))["verdict"] == "pass"
    assert run(params(check), FakePrometheus().add("up", 3))["verdict"] == "pass"
    assert run(params(check), FakePrometheus().add("up", 3.5))["verdict"] == "fail"
    gate = run(params(check), FakePrometheus().add("up", 0.5))
    assert gate["verdict"] == "fail" and gate["checks"][0]["threshold"] == "between 1 and 3"


def test_multiple_series_every_one_must_pass_and_the_worst_is_reported():
    check = dict(name="q", type="promql", query="per_pod", max=10)
    prom = FakePrometheus().add("per_pod", 1, pod="a").add("per_pod", 12, pod="b").add("per_pod", 5, pod="c")
    gate = run(params(check), prom)
    c = gate["checks"][0]
    assert c["verdict"] == "fail" and c["value"] == 12.0
    assert "worst of 3 series: __name__=per_pod,pod=b" in c["reason"]
    gate = run(params(dict(check, max=20)), prom)
    assert gate["verdict"] == "pass" and gate["checks"][0]["value"] == 12.0   # all within max: the highest is reported
    gate = run(params(dict(check, max=None, min=2)), prom)
    assert gate["checks"][0]["value"] == 1.0 and gate["verdict"] == "fail"


@pytest.mark.parametrize("values, verdict, value, worst", [
    ((5, 12, 3), "fail", 12, "pod=b"),     # one series above max
    ((5, 1, 3), "fail", 1, "pod=b"),       # one series below min
    ((5, 2, 10), "pass", 2, "pod=b"),      # all within, the bounds included: the lowest is reported
    ((0.5, 20, 5), "fail", 0.5, "pod=a"),  # below min and above max: the one below min is reported
    ((2, 12, 5), "fail", 12, "pod=b"),     # the lowest exactly at min does not hide the one above max
])
def test_promql_min_and_max_over_several_series(values, verdict, value, worst):
    prom = FakePrometheus()
    for name, v in zip("abc", values):
        prom.add("queue_depth", v, pod=name)
    gate = run(params(dict(name="q", type="promql", query="queue_depth", min=2, max=10)), prom)
    c = gate["checks"][0]
    assert c["verdict"] == verdict and c["value"] == value and "(worst of 3 series: __name__=queue_depth,%s)" % worst in c["reason"]
    assert c["threshold"] == "between 2 and 10"


def test_success_rate_min_with_a_fraction():
    check = dict(SR, min=99.9)
    gate = run(params(check), prometheus(good=99900, errors=100))
    assert gate["verdict"] == "pass" and gate["checks"][0]["threshold"] == ">= 99.9 %" and gate["checks"][0]["reason"] == "99.9 % >= 99.9 %"
    gate = run(params(check), prometheus(good=99890, errors=110))
    assert gate["verdict"] == "fail" and gate["checks"][0]["reason"] == "99.89 % is not >= 99.9 %"


def test_latency_quantile_is_the_one_asked_for():
    prom = prometheus(good=100, p99=500)
    gate = run(params(dict(LAT, quantile=0.95, max=490)), prom)
    c = gate["checks"][0]
    assert c["query"].startswith("histogram_quantile(0.95, ") and c["value"] == pytest.approx(484.694, abs=0.001) and c["verdict"] == "pass"
    assert run(params(dict(LAT, max=490)), prom)["checks"][0]["value"] == 500.0   # p99 by default


def test_the_reporter_is_destination_unless_asked():
    gate = run(params(SR), prometheus(good=1000))
    assert gate["checks"][0]["value"] == 100.0 and 'reporter="destination"' in gate["checks"][0]["query"]
    gate = run(params(dict(SR, reporter="source")), prometheus(good=5940, errors=60, reporter="source"))
    assert gate["checks"][0]["value"] == 99.0 and gate["checks"][0]["requests"] == 6000.0 and 'reporter="source"' in gate["checks"][0]["query"]


@pytest.mark.parametrize("check, accepted", [
    (dict(LAT, quantile=0.95), True), (dict(LAT, quantile=0.999), True), (dict(LAT, quantile=0), False), (dict(LAT, quantile=1), False),
    (dict(LAT, max=0.5), True), (dict(LAT, max=0), False),
    (dict(SR, min=0), True), (dict(SR, min=100), True), (dict(SR, min=-0.1), False), (dict(SR, min=100.1), False),
    (dict(name="q", type="promql", query="x", min=1, max=1), True),
    (dict(name="r", type="no_restarts", max=0), True), (dict(name="r", type="no_restarts", max=-1), False),
    (dict(SR, min_requests=0), True), (dict(SR, min_requests=-1), False),
])
def test_bounds_of_the_check_fields(check, accepted):
    if accepted:
        cc.validate(params(check), TARGET)
    else:
        with pytest.raises(cc.CanaryCheckError, match=r"checks\[0\]\.(quantile|max|min|min_requests): "):
            cc.validate(params(check), TARGET)


def test_scalar_like_result_with_no_labels():
    gate = run(params(dict(name="q", type="promql", query="scalar(up)", min=1)), FakePrometheus().add("up", 1))
    assert gate["verdict"] == "pass" and gate["checks"][0]["value"] == 1.0 and "series" not in gate["checks"][0]["reason"]


# ------------------------------------------------------------------------------------------------
# Policies: nothing passes by accident
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fail", "pass", "inconclusive"])
def test_empty_vector_follows_on_no_data(policy):
    # without the traffic guard (min_requests 0), a canary without series gives an empty result
    gate = run(params(dict(SR, on_no_data=policy), on_still_inconclusive="inconclusive", min_requests=0), prometheus())
    c = gate["checks"][0]
    assert c["verdict"] == policy and gate["verdict"] == policy
    assert "no data" in c["reason"] and "on_no_data: %s" % policy in c["reason"]
    assert c["value"] is None


def test_empty_vector_is_never_pass_by_default():
    gate = run(params(SR, min_requests=0), prometheus())
    assert gate["verdict"] == "fail"
    assert "still inconclusive" in gate["checks"][0]["reason"] and "no data" in gate["checks"][0]["reason"]


@pytest.mark.parametrize("policy", ["fail", "pass", "inconclusive"])
def test_nan_follows_on_nan(policy):
    # series that did not move in the window (no requests): the quantile of zero observations is NaN
    prom = prometheus(good=0)
    for le in ("100.0", "+Inf"):
        prom.add("istio_request_duration_milliseconds_bucket", 0, le=le, reporter="destination", **CANARY)
    gate = run(params(LAT, on_nan=policy, on_still_inconclusive="inconclusive", min_requests=0), prom)
    assert gate["checks"][0]["verdict"] == policy
    assert "NaN" in gate["checks"][0]["reason"]


def test_nan_in_one_series_of_several_is_nan():
    gate = run(params(dict(name="q", type="promql", query="x", max=1)), FakePrometheus().add("x", 0.5, a="1").add("x", NAN, a="2"))
    assert gate["verdict"] == "fail" and "NaN for 1 of 2 series" in gate["checks"][0]["reason"]


@pytest.mark.parametrize("policy", ["fail", "pass", "inconclusive"])
def test_query_error_follows_on_error(policy):
    nobody_there = FakePrometheus(url="http://prometheus.istio-system:9090")   # prometheus_url points elsewhere
    gate = run(params(dict(SR, on_error=policy), on_still_inconclusive="inconclusive"), nobody_there)
    c = gate["checks"][0]
    assert c["verdict"] == policy and "prometheus_url http://127.0.0.1:9" in c["reason"]


def test_bad_query_400_fails_at_once_even_with_error_policy_pass():
    clock = FakeClock()
    gate = run(params(dict(name="q", type="promql", query="x{", max=1, on_error="pass"), retry_inconclusive_for=60),
               FakePrometheus(), clock=clock)
    c = gate["checks"][0]
    assert c["verdict"] == "fail" and c["attempts"] == 1 and clock.sleeps == []
    assert "configuration error, not retried" in c["reason"] and "HTTP 400 bad_data: parse error" in c["reason"]


@pytest.mark.parametrize("policy", ["fail", "pass", "inconclusive"])
def test_low_traffic_follows_on_low_traffic(policy):
    prom = prometheus(good=3)
    gate = run(params(dict(SR, on_low_traffic=policy), on_still_inconclusive="inconclusive"), prom)
    c = gate["checks"][0]
    assert c["verdict"] == policy and c["requests"] == 3
    assert "low traffic: 3 requests to shop/reviews-v2 in 1m, min_requests is 10" in c["reason"]
    assert len(prom.queries) == 1  # the metric itself was not judged
    assert c["query"] == cc.success_rate_query(TARGET, "1m") and c["threshold"] == ">= 99 %"   # the check's query, not the count's


def test_low_traffic_boundary_and_no_series():
    assert run(params(SR), prometheus(good=10))["verdict"] == "pass"
    assert run(params(SR), prometheus(good=9))["verdict"] == "fail"
    gate = run(params(SR), prometheus())
    assert gate["verdict"] == "fail" and "low traffic: 0 requests" in gate["checks"][0]["reason"]


def test_min_requests_per_check_and_off():
    gate = run(params(dict(SR, min_requests=50)), prometheus(good=30))
    assert "low traffic: 30 requests" in gate["checks"][0]["reason"] and "min_requests is 50" in gate["checks"][0]["reason"]
    prom = prometheus(good=1)
    assert run(params(SR, min_requests=0), prom)["verdict"] == "pass"
    assert len(prom.queries) == 1


def test_promql_check_with_min_requests_uses_the_traffic_guard():
    prom = prometheus(good=2).add("x", 0)
    gate = run(params(dict(name="q", type="promql", query="x", max=1, min_requests=5, on_low_traffic="fail")), prom)
    assert gate["verdict"] == "fail" and prom.queries[0].startswith("sum(increase(istio_requests_total")


def test_global_policy_applies_and_check_policy_overrides():
    gate = run(params(SR, dict(LAT, on_no_data="fail"), on_no_data="pass", min_requests=0), prometheus())
    assert [c["verdict"] for c in gate["checks"]] == ["pass", "fail"]


# ------------------------------------------------------------------------------------------------
# Retries: bounded in count and (fake) time
# ------------------------------------------------------------------------------------------------

def test_inconclusive_is_retried_then_fails_within_bounded_time():
    clock = FakeClock()
    gate = run(params(SR, retry_inconclusive_for=30, retry_interval=10), prometheus(), clock=clock)
    c = gate["checks"][0]
    assert c["verdict"] == "fail" and c["attempts"] == 4
    assert clock.sleeps == [10, 10, 10]
    assert gate["duration"] == 30 and gate["rounds"] == 4
    assert "still inconclusive after 4 attempt(s) in 30s (retry_inconclusive_for 30)" in c["reason"]


def test_retry_stops_even_when_the_clock_jumps():
    clock = FakeClock()

    def slow_sleep(seconds):
        clock.sleeps.append(seconds)
        clock.now += seconds * 5  # a slow world: each sleep takes longer than asked

    gate = cc.evaluate_gate(params(SR, retry_inconclusive_for=100, retry_interval=10), TARGET, clock=clock, sleep=slow_sleep,
                            http=prometheus().transport)
    assert gate["verdict"] == "fail" and len(clock.sleeps) == 2


def test_inconclusive_then_data_arrives_passes():
    prom = prometheus()
    # no series at first; then series that have not counted a request yet (NaN); then the requests
    clock = FakeClock(meanwhile=[lambda: prom.add("istio_requests_total", 0, response_code="200", reporter="destination", **CANARY),
                                 lambda: prom.add("istio_requests_total", 999, response_code="200", reporter="destination", **CANARY)
                                 .add("istio_requests_total", 1, response_code="503", reporter="destination", **CANARY)])
    gate = run(params(SR, retry_inconclusive_for=60, retry_interval=5, min_requests=0), prom, clock=clock)
    c = gate["checks"][0]
    assert gate["verdict"] == "pass" and c["attempts"] == 3 and c["value"] == 99.9
    assert clock.sleeps == [5, 5]


def test_passing_checks_are_not_rerun_while_others_retry():
    prom = prometheus(good=1000, p99=10)
    warm = dict(name="warm", type="promql", query='cache_warm{workload="reviews-v2"}', min=1)
    clock = FakeClock(meanwhile=[lambda: prom.add("cache_warm", 1, workload="reviews-v2")])
    gate = run(params(warm, LAT, retry_inconclusive_for=20, retry_interval=10), prom, clock=clock)
    assert [c["attempts"] for c in gate["checks"]] == [2, 1]
    assert gate["verdict"] == "pass"


def test_a_failure_ends_the_gate_without_retrying_others():
    clock = FakeClock()
    gate = run(params(SR, LAT, retry_inconclusive_for=60, retry_interval=10), prometheus(good=50, errors=50), clock=clock)
    assert gate["verdict"] == "fail" and clock.sleeps == []
    assert [c["attempts"] for c in gate["checks"]] == [1, 1]


def test_on_still_inconclusive_keeps_the_gate_inconclusive():
    gate = run(params(SR, on_still_inconclusive="inconclusive"), prometheus())
    assert gate["verdict"] == "inconclusive"
    assert "errors (success_rate): inconclusive" in gate["reason"]


def test_retry_zero_evaluates_once():
    clock = FakeClock()
    gate = run(params(SR, retry_inconclusive_for=0), prometheus(), clock=clock)
    assert gate["checks"][0]["attempts"] == 1 and clock.sleeps == []


# ------------------------------------------------------------------------------------------------
# Prometheus client over a fake transport
# ------------------------------------------------------------------------------------------------

def transport_answering(status, body, record=None):
    def transport(url, method="GET", headers=None, data=None, validate_certs=True, timeout=10):
        if record is not None:
            record.append(dict(url=url, method=method, headers=headers, data=data, validate_certs=validate_certs, timeout=timeout))
        if isinstance(status, Exception):
            raise status
        return status, body if isinstance(body, bytes) else json.dumps(body).encode()
    return transport


def vector(*values):
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"i": str(i)}, "value": [1700000000.0, v]} for i, v in enumerate(values)]}}


def test_client_parses_vector_nan_and_inf():
    seen = []
    client = PrometheusClient("http://p:9090/", headers={"Authorization": "Bearer t"}, validate_certs=False,
                              transport=transport_answering(200, vector("1.5", "NaN", "+Inf"), seen))
    samples = client.query('up{job="x"}')
    assert samples[0] == ({"i": "0"}, 1.5) and math.isnan(samples[1][1]) and samples[2][1] == float("inf")
    assert seen[0]["url"] == "http://p:9090/api/v1/query?query=up%7Bjob%3D%22x%22%7D"
    assert seen[0]["method"] == "GET" and seen[0]["headers"]["Authorization"] == "Bearer t" and seen[0]["validate_certs"] is False


def test_client_scalar_and_matrix():
    client = PrometheusClient("http://p", transport=transport_answering(
        200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "42"]}}))
    assert client.query("scalar(1)") == [({}, 42.0)]
    client = PrometheusClient("http://p", transport=transport_answering(
        200, {"status": "success", "data": {"resultType": "matrix", "result": []}}))
    with pytest.raises(PrometheusError, match="must return an instant vector or a scalar, it returned a matrix"):
        client.query("up[5m]")


def test_client_400_is_bad_query_quoting_prometheus_and_the_query():
    body = {"status": "error", "errorType": "bad_data", "error": "1:6: parse error: unexpected end of input"}
    client = PrometheusClient("http://p", transport=transport_answering(400, body))
    with pytest.raises(PrometheusError) as err:
        client.query("sum(x")
    assert err.value.kind == "bad_query" and err.value.status == 400
    assert "bad_data: 1:6: parse error: unexpected end of input" in str(err.value) and "sum(x" in str(err.value)


def test_client_422_503_and_garbage_are_query_errors():
    body = {"status": "error", "errorType": "execution", "error": "many-to-many matching not allowed"}
    with pytest.raises(PrometheusError) as err:
        PrometheusClient("http://p", transport=transport_answering(422, body)).query("a / b")
    assert err.value.kind == "query_error" and "HTTP 422" in str(err.value) and "many-to-many" in str(err.value)
    with pytest.raises(PrometheusError) as err:
        PrometheusClient("http://p", transport=transport_answering(200, b"<html>login</html>")).query("up")
    assert err.value.kind == "bad_response" and "did not answer like the Prometheus HTTP API" in str(err.value)


def test_client_unreachable_names_prometheus_url():
    client = PrometheusClient("http://127.0.0.1:9", transport=transport_answering(TransportError("connection refused"), b""))
    with pytest.raises(PrometheusError) as err:
        client.query("up")
    assert err.value.kind == "unreachable" and "prometheus_url http://127.0.0.1:9 is unreachable: connection refused" in str(err.value)


def test_gate_through_http_transport_400_and_422():
    body = {"status": "error", "errorType": "bad_data", "error": "parse error"}
    gate = run(params(dict(name="q", type="promql", query="x{", max=1), retry_inconclusive_for=30),
               http=transport_answering(400, body))
    assert gate["checks"][0]["attempts"] == 1 and "HTTP 400 bad_data: parse error" in gate["checks"][0]["reason"]
    gate = run(params(dict(name="q", type="promql", query="x", max=1, on_error="fail")),
               http=transport_answering(422, {"status": "error", "errorType": "execution", "error": "boom"}))
    assert gate["verdict"] == "fail" and "(on_error: fail)" in gate["checks"][0]["reason"]


# ------------------------------------------------------------------------------------------------
# workload_ready
# ------------------------------------------------------------------------------------------------

READY = dict(name="ready", type="workload_ready")


@pytest.mark.parametrize("dep, verdict, words", [
    (deployment(), "pass", "3/3 replicas available and updated"),
    (deployment(available=2), "fail", "2/3 replicas available"),
    (deployment(updated=1), "fail", "1 updated"),
    (deployment(replicas=0, available=0, updated=0), "fail", "spec.replicas 0"),
    (deployment(generation=3, observed=2), "fail", "has not observed generation 3"),
])
def test_workload_ready(dep, verdict, words):
    gate = run(params(READY), reader=FakeReader(dep))
    assert gate["checks"][0]["verdict"] == verdict and words in gate["checks"][0]["reason"]


def test_workload_ready_when_the_status_omits_available_replicas():
    dep = deployment()
    del dep["status"]["availableReplicas"]   # how Kubernetes reports none available
    gate = run(params(READY), reader=FakeReader(dep))
    assert gate["verdict"] == "fail" and gate["checks"][0]["value"] == 0 and "0/3 replicas available, 3 updated" in gate["checks"][0]["reason"]
    gate = run(params(dict(READY, min_available=1)), reader=FakeReader(dep))
    assert gate["verdict"] == "fail" and "0 available replicas, min_available is 1" in gate["checks"][0]["reason"]
    assert run(params(dict(READY, min_available=0)), reader=FakeReader(dep))["verdict"] == "pass"


def test_workload_ready_takes_one_replica_when_the_spec_omits_it():
    dep = deployment(available=1, updated=1)
    del dep["spec"]["replicas"]
    gate = run(params(READY), reader=FakeReader(dep))
    assert gate["verdict"] == "pass" and "1/1 replicas available and updated" in gate["checks"][0]["reason"]
    assert gate["checks"][0]["threshold"] == "== 1 (spec.replicas)"
    dep["spec"]["replicas"] = None   # written out as null
    assert "1/1 replicas available and updated" in run(params(READY), reader=FakeReader(dep))["checks"][0]["reason"]


def test_workload_ready_when_the_status_omits_updated_replicas():
    dep = deployment()
    del dep["status"]["updatedReplicas"]
    gate = run(params(READY), reader=FakeReader(dep))
    assert gate["verdict"] == "fail" and "3/3 replicas available, 0 updated" in gate["checks"][0]["reason"]


def test_workload_ready_min_available_boundary():
    assert run(params(dict(READY, min_available=2)), reader=FakeReader(deployment(available=2)))["verdict"] == "pass"
    gate = run(params(dict(READY, min_available=2)), reader=FakeReader(deployment(available=1)))
    assert gate["verdict"] == "fail" and gate["checks"][0]["value"] == 1 and gate["checks"][0]["threshold"] == ">= 2 available"


def test_workload_not_found_fails_and_api_errors_follow_on_error():
    gate = run(params(READY, retry_inconclusive_for=60), reader=FakeReader(error=cc.K8sReadError("reading Deployment: 404", 404)))
    assert gate["verdict"] == "fail" and gate["checks"][0]["attempts"] == 1 and "must exist" in gate["checks"][0]["reason"]
    gate = run(params(dict(READY, on_error="pass")), reader=FakeReader(error=cc.K8sReadError("API unreachable")))
    assert gate["verdict"] == "pass" and "(on_error: pass)" in gate["checks"][0]["reason"]


def test_workload_check_without_connection_is_not_a_pass():
    gate = run(params(READY))
    assert gate["verdict"] == "fail" and "no Kubernetes connection" in gate["checks"][0]["reason"]


def test_workload_check_does_not_need_prometheus_url():
    gate = run(params(READY, prometheus_url=None), reader=FakeReader(deployment()))
    assert gate["verdict"] == "pass"


# ------------------------------------------------------------------------------------------------
# no_restarts with and without a baseline
# ------------------------------------------------------------------------------------------------

RESTARTS = dict(name="restarts", type="no_restarts")


def test_baseline_then_no_increase_passes():
    reader = FakeReader(deployment(), [pod("a", 2), pod("b", 0)])
    baseline = cc.take_baseline(params(RESTARTS), TARGET, k8s=reader, wall_clock=lambda: 1767225600.0)
    assert baseline["restarts"]["a-uid"] == {"name": "a", "containers": {"app": 2}}
    assert reader.selectors == ["app=reviews,version=v2"]
    gate = run(params(RESTARTS), reader=reader, window_start=baseline)
    assert gate["verdict"] == "pass" and gate["checks"][0]["value"] == 0 and "since the baseline" in gate["checks"][0]["reason"]


def test_baseline_then_increase_and_new_pod_fail():
    reader = FakeReader(deployment(), [pod("a", 2)])
    baseline = cc.take_baseline(params(RESTARTS), TARGET, k8s=reader)
    reader.pods = [pod("a", 3), pod("c", 1)]
    gate = run(params(RESTARTS), reader=reader, window_start=baseline)
    c = gate["checks"][0]
    assert c["verdict"] == "fail" and c["value"] == 2
    assert "a/app +1 (restartCount 3)" in c["reason"] and "c/app +1" in c["reason"]
    assert run(params(dict(RESTARTS, max=2)), reader=reader, window_start=baseline)["verdict"] == "pass"


def test_baseline_not_needed_without_restart_check():
    reader = FakeReader(error=AssertionError("must not be called"))
    baseline = cc.take_baseline(params(SR), TARGET, k8s=reader, wall_clock=lambda: 100.0)
    assert baseline["restarts"] is None and baseline["epoch"] == 100.0


def test_without_baseline_restarts_in_the_window_count():
    now = 1767225600.0  # 2026-01-01T00:00:00Z; window 1m
    pods = [pod("old", 5, finished="2025-12-31T23:50:00Z"), pod("recent", 5, finished="2025-12-31T23:59:30Z"),
            pod("new", 2, created="2025-12-31T23:59:45Z")]
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), pods), wall=lambda: now)
    c = gate["checks"][0]
    assert c["verdict"] == "fail" and c["value"] == 3
    assert "old/" not in c["reason"] and "recent/app +1" in c["reason"] and "new/app +2" in c["reason"]
    assert "no baseline" in c["reason"]


def test_window_start_epoch_and_baseline_errors():
    now = 1767225600.0   # 2026-01-01T00:00:00Z; window 1m
    pods = [pod("p", 1, finished="2025-12-31T23:50:00Z")]
    # an epoch as the window's start (an hour ago): the restart ten minutes ago is inside it
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), pods), window_start=now - 3600, wall=lambda: now)
    c = gate["checks"][0]
    assert gate["verdict"] == "fail" and c["value"] == 1 and "p/app +1 (restartCount 1)" in c["reason"]
    assert "since 2025-12-31T23:00:00+00:00 (no baseline: restarts whose last termination is in the window)" in c["reason"]
    # a baseline that could not read the pods: the window starts when it was taken, and the reason says why
    baseline = cc.take_baseline(params(RESTARTS), TARGET, k8s=FakeReader(error=cc.K8sReadError("boom")), wall_clock=lambda: now)
    assert baseline == {"epoch": now, "taken_at": "2026-01-01T00:00:00+00:00", "restarts": None, "error": "boom"}
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), pods), window_start=baseline, wall=lambda: now)
    c = gate["checks"][0]
    assert gate["verdict"] == "pass" and c["value"] == 0 and "since 2026-01-01T00:00:00+00:00 (no baseline: boom" in c["reason"]


def test_no_pods_is_no_data():
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), []))
    assert gate["verdict"] == "fail" and "no pods match" in gate["checks"][0]["reason"] and "on_no_data" in gate["checks"][0]["reason"]


def test_canary_gate_object_start_window_and_evaluate():
    now = 1767225600.0
    reader = FakeReader(deployment(), [pod("a", 1, finished="2025-12-31T20:00:00Z")])
    clock = FakeClock()
    gate = cc.CanaryGate(params(RESTARTS, READY), TARGET, k8s=reader, clock=clock, sleep=clock.sleep, wall_clock=lambda: now)
    token = gate.start_window()
    assert token["restarts"] == {"a-uid": {"name": "a", "containers": {"app": 1}}}
    reader.pods = [pod("a", 3, finished="2025-12-31T23:59:50Z")]
    result = gate.evaluate(token)
    # two restarts since the token's count; without the token only the last one would be seen in the window
    assert result["verdict"] == "fail" and result["checks"][0]["value"] == 2 and "since the baseline at 2026-01-01T00:00:00" in result["checks"][0]["reason"]
    assert result["checks"][1]["verdict"] == "pass"
    with pytest.raises(cc.CanaryCheckError):
        cc.CanaryGate(params(dict(LAT, max=None)), TARGET)


def test_canary_gate_without_a_kubernetes_connection_fails_workload_checks_by_on_error():
    gate = cc.CanaryGate(params(READY), TARGET)
    token = gate.start_window()
    result = gate.evaluate(token)
    reason = result["checks"][0]["reason"]
    assert result["verdict"] == "fail" and "no Kubernetes connection was given for the workload_ready check (on_error: inconclusive)" in reason


# ------------------------------------------------------------------------------------------------
# http checks
# ------------------------------------------------------------------------------------------------

def test_http_2xx_passes_and_renders_url():
    seen = []
    gate = run(params(dict(name="h", type="http", url="http://{{ host }}/healthz"), prometheus_url=None),
               http=transport_answering(204, b"", seen))
    assert gate["verdict"] == "pass" and seen[0]["url"] == "http://reviews.shop.svc/healthz" and seen[0]["method"] == "GET"


def test_http_check_verifies_tls_by_default():
    seen = []
    gate = run(params(dict(name="h", type="http", url="https://{{ host }}/healthz"), prometheus_url=None), http=transport_answering(200, b"ok", seen))
    assert gate["verdict"] == "pass" and gate["checks"][0]["threshold"] == "HTTP 2xx"
    assert seen == [dict(url="https://reviews.shop.svc/healthz", method="GET", headers={}, data=None, validate_certs=True, timeout=10)]


def test_http_check_headers_are_no_log():
    assert cc.CHECK_OPTIONS["headers"]["no_log"] is True and cc.CHECKS_ARGSPEC["checks"]["options"]["headers"]["no_log"] is True


def test_http_text_body_is_sent_as_is_without_a_content_type():
    seen = []
    check = dict(name="h", type="http", url="http://x/hook", method="put", body="approve", headers={"X-Token": "s"})
    assert run(params(check), http=transport_answering(202, b"", seen))["verdict"] == "pass"
    assert seen[0]["method"] == "PUT" and seen[0]["data"] == b"approve" and seen[0]["headers"] == {"X-Token": "s"}


def test_http_status_boundaries():
    check = dict(name="h", type="http", url="http://x/")
    assert run(params(check), http=transport_answering(299, b""))["verdict"] == "pass"
    assert run(params(check), http=transport_answering(300, b""))["verdict"] == "fail"
    assert run(params(check), http=transport_answering(199, b""))["verdict"] == "fail"


def test_http_non_2xx_fails():
    gate = run(params(dict(name="h", type="http", url="http://x/")), http=transport_answering(503, b"down"))
    assert gate["verdict"] == "fail" and "answered HTTP 503: down" in gate["checks"][0]["reason"]


def test_http_expect_json_subset():
    check = dict(name="h", type="http", url="http://x/", method="post", body={"a": 1}, headers={"X-Token": "s"},
                 expect_json={"status": "ok", "checks": [{"name": "db"}]}, validate_certs=False, timeout=3)
    seen = []
    good = {"status": "ok", "version": "2", "checks": [{"name": "cache", "ok": True}, {"name": "db", "ok": True}]}
    gate = run(params(check), http=transport_answering(200, good, seen))
    assert gate["verdict"] == "pass"
    assert seen[0]["method"] == "POST" and seen[0]["headers"] == {"X-Token": "s", "Content-Type": "application/json"}
    assert seen[0]["validate_certs"] is False and seen[0]["timeout"] == 3
    gate = run(params(check), http=transport_answering(200, dict(good, status="degraded")))
    assert gate["verdict"] == "fail" and '$.status: expected "ok", got "degraded"' in gate["checks"][0]["reason"]
    gate = run(params(check), http=transport_answering(200, b"not json"))
    assert gate["verdict"] == "fail" and "but not JSON" in gate["checks"][0]["reason"]


def test_json_subset_mismatch_details():
    assert cc.json_subset_mismatch({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) is None
    assert cc.json_subset_mismatch({"a": {"b": 1}}, {"a": {}}) == "$.a.b: missing"
    assert cc.json_subset_mismatch([1], [2, 3]) == "$[0]: no element matches 1"
    assert cc.json_subset_mismatch(True, 1) == "$: expected true, got 1"
    assert cc.json_subset_mismatch({"a": 1}, [1]) == "$: expected an object, got [1]"
    assert cc.json_subset_mismatch({"a": [1]}, {"a": {"b": 1}}) == '$.a: expected a list, got {"b": 1}'
    assert cc.json_subset_mismatch([{"name": "db"}, 2], [{"name": "db", "ok": True}, 3]) == "$[1]: no element matches 2"
    assert cc.json_subset_mismatch({"a": [{"b": [1, 2]}]}, {"a": [{"b": [2, 1, 0]}]}) is None
    assert cc.json_subset_mismatch({"a": {"b": 2}}, {"a": {"b": 3}}) == "$.a.b: expected 2, got 3"


def test_http_no_answer_follows_on_error():
    gate = run(params(dict(name="h", type="http", url="http://x/", on_error="fail")),
               http=transport_answering(TransportError("refused"), b""))
    assert gate["verdict"] == "fail" and "no answer: refused (on_error: fail)" in gate["checks"][0]["reason"]


# ------------------------------------------------------------------------------------------------
# The real transport and reader, without a cluster
# ------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        code = 400 if "bad" in self.path else 200
        payload = json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_urls_transport_against_a_local_server():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        base = "http://127.0.0.1:%d" % server.server_address[1]
        status, body = urls_transport(base + "/ok", headers={"Authorization": "Bearer x"}, timeout=5)
        assert status == 200 and json.loads(body) == {"path": "/ok", "auth": "Bearer x"}
        status, body = urls_transport(base + "/bad", timeout=5)
        assert status == 400 and json.loads(body)["path"] == "/bad"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    with pytest.raises(TransportError):
        urls_transport(base + "/gone", timeout=5)


class FakeKubeAPI:
    """The API server behind the official client, at its HTTP layer (urllib3's pool manager): GET of a
    Deployment by path, and pods listed by an exact label selector, answered in the API's JSON. ``down``:
    what a proxy in front of it answers instead (status, text), or an exception for no answer at all."""

    def __init__(self, deployments=(), pods=(), down=None):
        self.deployments = dict(((d["metadata"]["namespace"], d["metadata"]["name"]), d) for d in deployments)
        self.pods = list(pods)
        self.requests = []
        self.down = down

    def request(self, method, url, fields=None, headers=None, preload_content=True, timeout=None, **kwargs):
        import urllib3  # pylint: disable=import-outside-toplevel
        from ansible.module_utils.six.moves.urllib.parse import parse_qs, urlsplit  # pylint: disable=import-outside-toplevel

        parts = urlsplit(url)
        query = dict((k, v[0]) for k, v in parse_qs(parts.query).items())
        self.requests.append((method, parts.path, query))
        if isinstance(self.down, Exception):
            raise self.down
        if self.down:
            return urllib3.HTTPResponse(body=self.down[1].encode(), status=self.down[0], headers={"Content-Type": "text/plain"},
                                        reason="Service Unavailable", preload_content=False)
        status, doc = self.answer(method, parts.path.split("/"), query)
        return urllib3.HTTPResponse(body=json.dumps(doc).encode(), status=status, headers={"Content-Type": "application/json"},
                                    reason="OK" if status == 200 else "Not Found", preload_content=False)

    def answer(self, method, path, query):
        if method == "GET" and path[1:5] == ["apis", "apps", "v1", "namespaces"] and path[6] == "deployments" and len(path) == 8:
            found = self.deployments.get((path[5], path[7]))
            if found:
                return 200, found
            return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": 'deployments.apps "%s" not found' % path[7]}
        if method == "GET" and path[1:4] == ["api", "v1", "namespaces"] and path[5:] == ["pods"]:
            wanted = dict(term.split("=", 1) for term in query.get("labelSelector", "").split(",") if term)
            items = [p for p in self.pods if p["metadata"]["namespace"] == path[4]
                     and all(p["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": items}
        return 404, {"kind": "Status", "status": "Failure", "code": 404, "message": "the server could not find the requested resource"}


def api_pod(name, labels, restarts, namespace="shop"):
    return {"metadata": {"name": name, "namespace": namespace, "uid": name + "-uid", "labels": labels,
                         "creationTimestamp": "2025-12-01T00:00:00Z"},
            "status": {"containerStatuses": [{"name": "app", "restartCount": restarts, "image": "i", "imageID": "", "ready": True,
                                              "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2025-12-31T23:59:30Z"}}}]}}


@pytest.mark.skipif(not cc.HAS_K8S, reason="the kubernetes library is not installed")
def test_k8s_reader_with_the_official_client():
    from kubernetes import client  # pylint: disable=import-outside-toplevel

    dep = deployment(replicas=2, available=2, updated=2, generation=1, observed=1)
    dep["spec"]["template"] = {"metadata": {"labels": {"app": "reviews", "version": "v2"}}, "spec": {"containers": [{"name": "app"}]}}
    dep["spec"]["selector"] = {"matchLabels": {"app": "reviews", "version": "v2"}}
    api = FakeKubeAPI([dep], [api_pod("canary-1", {"app": "reviews", "version": "v2"}, 1),
                              api_pod("stable-1", {"app": "reviews", "version": "v1"}, 7),
                              api_pod("elsewhere", {"app": "reviews", "version": "v2"}, 9, namespace="staging")])
    api_client = client.ApiClient()
    api_client.rest_client.pool_manager = api
    reader = cc.as_reader(api_client)
    assert isinstance(reader, cc.K8sWorkloadReader)
    gate = run(params(READY, RESTARTS), reader=api_client)
    assert [(c["verdict"], c["value"]) for c in gate["checks"]] == [("pass", 2), ("fail", 1)]
    assert "canary-1/app +1 (restartCount 1)" in gate["checks"][1]["reason"]   # only the canary's pods, in its namespace
    assert api.requests == [("GET", "/apis/apps/v1/namespaces/shop/deployments/reviews-v2", {}),
                            ("GET", "/apis/apps/v1/namespaces/shop/deployments/reviews-v2", {}),
                            ("GET", "/api/v1/namespaces/shop/pods", {"labelSelector": "app=reviews,version=v2"})]
    gate = run(params(READY), reader=api_client, target=dict(TARGET, workload="reviews-v3"))
    assert gate["verdict"] == "fail" and gate["checks"][0]["attempts"] == 1
    assert 'reading Deployment shop/reviews-v3: Kubernetes API answered 404: deployments.apps "reviews-v3" not found' in gate["checks"][0]["reason"]


def test_client_401_hints_at_prometheus_headers():
    with pytest.raises(PrometheusError) as err:
        PrometheusClient("http://p", transport=transport_answering(401, b"Unauthorized")).query("up")
    assert err.value.kind == "query_error" and "HTTP 401 (check prometheus_headers" in str(err.value)


def test_unexpected_error_in_a_check_fails_it_without_crashing_the_gate():
    class Broken:
        def read_deployment(self, namespace, name):
            return None  # not a dict: the check cannot read it

        def list_pods(self, namespace, label_selector):
            return []

    gate = run(params(dict(READY, on_error="pass"), retry_inconclusive_for=60), reader=Broken())
    c = gate["checks"][0]
    assert gate["verdict"] == "fail" and c["attempts"] == 1 and "unexpected error in the workload_ready check: AttributeError" in c["reason"]


# ------------------------------------------------------------------------------------------------
# Edges of the specification, the clients and the reasons
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top, message", [
    ({"analysis_window": "0m"}, "analysis_window: '0m' is not a PromQL duration"),
    ({"analysis_window": 60}, "analysis_window: 60 is not a PromQL duration"),
    ({"min_requests": -1}, "min_requests: must be a whole number >= 0, got -1"),
    ({"prometheus_timeout": "10"}, "prometheus_timeout: must be a whole number >= 0, got '10'"),
    ({"retry_inconclusive_for": 3601}, "retry_inconclusive_for: 3601 s is more than the 3600 s limit"),
    ({"on_still_inconclusive": "pass"}, "on_still_inconclusive: 'pass' is not one of fail, inconclusive"),
    ({"checks": "errors"}, "checks[0]: each check is a dict with name and type, got 'e'"),
    ({"checks": ["errors"]}, "checks[0]: each check is a dict with name and type, got 'errors'"),
    ({"prometheus_headers": ["Authorization: x"]}, "prometheus_headers: must be a dict of header names to values"),
])
def test_top_level_spec_errors(top, message):
    with pytest.raises(cc.CanaryCheckError) as err:
        cc.validate(params(SR, **top), TARGET)
    assert message in str(err.value)


def test_top_level_limits_are_inclusive():
    cc.validate(params(SR, retry_inconclusive_for=3600, retry_interval=1, min_requests=0, prometheus_timeout=0), TARGET)
    cc.validate(params(SR, analysis_window="500ms"), TARGET)


@pytest.mark.parametrize("check, message", [
    (dict(SR, name="  "), "checks[0].name: every check needs a name"),
    (dict(SR, min=True), "checks[0].min: must be a number, got True"),
    (dict(READY, min_available=-1), "checks[0].min_available: must be a whole number >= 0, got -1"),
    (dict(name="h", type="http", url="http://x/", timeout=-1), "checks[0].timeout: must be a whole number >= 0, got -1"),
    (dict(name="h", type="http", url="http://x/", headers=["X-Token: s"]), "checks[0].headers: must be a dict of header names to values"),
    (dict(name="h", type="http", url="http://{{ colour }}/"), "checks[0].url: unknown placeholder {{ colour }}"),
    (dict(SR, quantile=0.9), "checks[0].quantile: a success_rate check does not take quantile; it takes min, reporter, min_requests"),
])
def test_check_spec_errors(check, message):
    with pytest.raises(cc.CanaryCheckError) as err:
        cc.validate(params(check), TARGET)
    assert message in str(err.value)


def test_workload_checks_need_the_deployment_and_its_namespace_promql_does_not():
    with pytest.raises(cc.CanaryCheckError, match=r"checks\[0\]: a workload_ready check needs the target's namespace \(the canary Deployment's namespace\)"):
        cc.validate(params(READY), dict(workload="reviews-v2"))
    with pytest.raises(cc.CanaryCheckError, match=r"a no_restarts check needs the target's workload \(the canary Deployment's name\)"):
        cc.validate(params(RESTARTS), dict(namespace="shop"))
    cc.validate(params(dict(name="q", type="promql", query='x{ns="{{ namespace }}"}', max=1)), dict(namespace="shop"))
    cc.validate(params(READY), None)   # without a target, only the specification is checked


def test_prometheus_is_asked_with_the_given_timeout_certificates_and_headers():
    prom = prometheus(good=100)
    run(params(SR, prometheus_timeout=3, prometheus_validate_certs=False, prometheus_headers={"Authorization": "Bearer t"}), prom)
    assert [(r["timeout"], r["validate_certs"], r["headers"]) for r in prom.requests] == [
        (3, False, {"Accept": "application/json", "Authorization": "Bearer t"})] * 2
    prom = prometheus(good=100)
    run(params(SR), prom)
    assert [(r["timeout"], r["validate_certs"]) for r in prom.requests] == [(10, True)] * 2


def test_infinities_and_huge_values_are_written_as_prometheus_writes_them():
    check = dict(name="q", type="promql", query="scalar(x) / 0", min=0)
    gate = run(params(check), FakePrometheus().add("x", -1))
    assert gate["checks"][0]["reason"] == "-Inf is not >= 0" and gate["verdict"] == "fail"
    gate = run(params(dict(name="q", type="promql", query="x", max=1)), FakePrometheus().add("x", 2.5e15))
    assert gate["checks"][0]["reason"] == "2.5e+15 is not <= 1"
    gate = run(params(dict(name="q", type="promql", query="x", max=1)), FakePrometheus().add("x", 4e14))
    assert gate["checks"][0]["reason"] == "400000000000000 is not <= 1"
    gate = run(params(dict(name="q", type="promql", query="x", max=1)), FakePrometheus().add("x", 1e15))
    assert gate["checks"][0]["reason"] == "1e+15 is not <= 1"
    gate = run(params(dict(name="q", type="promql", query="x", max=1)), FakePrometheus().add("x", 999999999999999))
    assert gate["checks"][0]["reason"] == "999999999999999 is not <= 1"
    gate = run(params(dict(name="q", type="promql", query="x", max=0.25)), FakePrometheus().add("x", 0.1234567))
    assert gate["checks"][0]["reason"] == "0.123457 <= 0.25"


def test_a_request_count_that_is_nan_is_low_traffic():
    prom = prometheus(good=20).add("istio_requests_total", float("nan"), response_code="500", reporter="destination", **CANARY)
    gate = run(params(SR), prom)
    assert gate["checks"][0]["requests"] == 0.0 and "low traffic: 0 requests" in gate["checks"][0]["reason"]


def test_series_without_labels_are_named_as_such():
    prom = FakePrometheus().add("a", 5).add("b", 1, pod="x")
    gate = run(params(dict(name="q", type="promql", query="sum(a) or sum by (pod) (b)", max=4)), prom)
    assert gate["checks"][0]["value"] == 5 and "(worst of 2 series: {})" in gate["checks"][0]["reason"]


def test_workload_ready_until_the_controller_observed_the_generation():
    dep = deployment()
    del dep["status"]["observedGeneration"]
    gate = run(params(READY), reader=FakeReader(dep))
    assert gate["verdict"] == "fail" and "has not observed generation 2 yet (observedGeneration None)" in gate["checks"][0]["reason"]
    dep = deployment(generation=None, observed=None)
    assert run(params(READY), reader=FakeReader(dep))["verdict"] == "pass"   # no generation to wait for
    gate = run(params(READY), reader=FakeReader(deployment(generation=3, observed=4)))
    assert gate["verdict"] == "pass" and gate["checks"][0]["threshold"] == "== 3 (spec.replicas)"


def test_workload_checks_without_a_connection_say_what_they_wanted():
    gate = run(params(READY, dict(RESTARTS, max=2)))
    assert [c["threshold"] for c in gate["checks"]] == ["all replicas available and updated", "<= 2 restarts"]
    gate = run(params(dict(READY, min_available=2)))
    assert gate["checks"][0]["threshold"] == ">= 2 available"


def test_a_deployment_without_a_selector_is_an_error_for_no_restarts():
    dep = deployment()
    dep["spec"]["selector"] = {}
    gate = run(params(dict(RESTARTS, on_error="fail")), reader=FakeReader(dep, [pod("a", 1)]))
    assert gate["verdict"] == "fail" and "Deployment shop/reviews-v2 has no spec.selector to find its pods (on_error: fail)" in gate["checks"][0]["reason"]


def test_without_the_kubernetes_library_workload_checks_follow_on_error(monkeypatch):
    monkeypatch.setattr(cc, "HAS_K8S", False)
    gate = run(params(dict(READY, on_error="fail")), reader=object())
    assert gate["verdict"] == "fail" and "the Python library 'kubernetes' is needed for workload_ready and no_restarts checks" in gate["checks"][0]["reason"]
    baseline = cc.take_baseline(params(RESTARTS), TARGET, k8s=None)
    assert baseline["error"] == "no Kubernetes connection was given for the no_restarts check"


@pytest.mark.parametrize("finished, counted", [
    ("2025-12-31T23:59:30.123456789Z", True),      # nanoseconds, as the API may write them
    ("2025-12-31T23:59:30+00:00", True),
    ("2025-12-31T23:59:30", True),                 # no zone: UTC
    ("2025-12-31T23:58:59.999Z", False),           # just before the window
    ("2025-12-31T23:59:00Z", True),                # at its start
    ("2025-12-31T23:50:00+00:00", False),          # before it, with an offset
    ("2025-12-31T23:50:00", False),                # before it, no zone
    ("yesterday", True),                           # not a time: a restart of unknown time counts
])
def test_restarts_without_a_baseline_count_when_the_last_one_ended_in_the_window(finished, counted):
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), [pod("p", 4, finished=finished)]), wall=lambda: 1767225600.0)
    assert gate["checks"][0]["value"] == (1 if counted else 0)


def test_restarts_of_init_containers_count_and_a_counter_that_went_down_is_no_restart():
    reader = FakeReader(deployment(), [pod("a", 5)])
    baseline = cc.take_baseline(params(RESTARTS), TARGET, k8s=reader)
    reader.pods = [pod("a", 2)]
    reader.pods[0]["status"]["initContainerStatuses"] = [{"name": "init", "restartCount": 1}]
    gate = run(params(RESTARTS), reader=reader, window_start=baseline)
    assert gate["checks"][0]["value"] == 1 and "a/init +1 (restartCount 1)" in gate["checks"][0]["reason"]


def test_a_new_pod_without_restarts_adds_none():
    now = 1767225600.0
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), [pod("fresh", 0, created="2025-12-31T23:59:50Z")]), wall=lambda: now)
    assert gate["verdict"] == "pass" and gate["checks"][0]["value"] == 0
    assert gate["checks"][0]["reason"].startswith("0 container restarts in 1 pods since 2025-12-31T23:59:00+00:00")


def test_http_json_body_keeps_the_checks_own_headers_untouched():
    seen = []
    headers = {"X-Token": "s"}
    check = dict(name="h", type="http", url="http://x/", method="POST", body=[1, 2], headers=headers, expect_json={"ok": True})
    gate = run(params(check), http=transport_answering(200, {"ok": True}, seen))
    assert gate["verdict"] == "pass" and gate["checks"][0]["threshold"] == "HTTP 2xx and JSON containing expect_json"
    assert seen[0]["data"] == b"[1, 2]" and seen[0]["headers"] == {"X-Token": "s", "Content-Type": "application/json"}
    assert headers == {"X-Token": "s"} and "requests" not in gate["checks"][0]


def test_http_failure_quotes_at_most_200_characters_of_the_answer():
    gate = run(params(dict(name="h", type="http", url="http://x/")), http=transport_answering(500, b"e" * 199 + b"XYZ"))
    assert gate["checks"][0]["reason"].endswith("answered HTTP 500: " + "e" * 199 + "X")


def test_by_default_an_inconclusive_check_is_retried_every_10_s_for_a_minute():
    clock = FakeClock()
    p = dict(prometheus_url="http://127.0.0.1:9", checks=[SR])   # no retry settings: the argument spec's defaults
    gate = cc.evaluate_gate(p, TARGET, clock=clock, sleep=clock.sleep, http=prometheus().transport)
    assert gate["checks"][0]["attempts"] == 7 and clock.sleeps == [10] * 6 and gate["verdict"] == "fail"
    clock = FakeClock()
    gate = cc.evaluate_gate(dict(p, retry_interval=61), TARGET, clock=clock, sleep=clock.sleep, http=prometheus().transport)
    assert gate["checks"][0]["attempts"] == 1 and clock.sleeps == []   # a retry after 61 s is past the minute


def test_times_from_a_reader_may_be_datetimes():
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    recent = pod("aware", 2, finished="x")
    recent["status"]["containerStatuses"][0]["lastState"]["terminated"]["finishedAt"] = now - datetime.timedelta(seconds=20)
    naive = pod("naive", 3, finished="x")
    naive["status"]["containerStatuses"][0]["lastState"]["terminated"]["finishedAt"] = datetime.datetime(2025, 12, 31, 23, 59, 40)
    old = pod("old", 4, finished="x")
    old["status"]["containerStatuses"][0]["lastState"]["terminated"]["finishedAt"] = now - datetime.timedelta(hours=2)
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), [recent, naive, old]), wall=now.timestamp)
    c = gate["checks"][0]
    assert c["value"] == 2 and "aware/app +1" in c["reason"] and "naive/app +1" in c["reason"] and "old/" not in c["reason"]


def test_a_canary_gate_without_the_kubernetes_library_reports_it_through_on_error(monkeypatch):
    monkeypatch.setattr(cc, "HAS_K8S", False)
    gate = cc.CanaryGate(params(dict(READY, on_error="fail")), TARGET, k8s=object())
    result = gate.evaluate(gate.start_window())
    assert result["verdict"] == "fail" and "the Python library 'kubernetes' is needed" in result["checks"][0]["reason"]


def test_fractions_in_reasons_are_rounded_for_reading():
    gate = run(params(SR), prometheus(good=3.456), clock=FakeClock())
    assert "low traffic: 3.46 requests to shop/reviews-v2" in gate["checks"][0]["reason"]
    clock = FakeClock()

    def a_little_late(seconds):
        clock.sleeps.append(seconds)
        clock.now += seconds + 0.0412

    gate = cc.evaluate_gate(params(SR, retry_inconclusive_for=30, retry_interval=10), TARGET, clock=clock, sleep=a_little_late,
                            http=prometheus().transport)
    assert gate["duration"] == 20.082 and "still inconclusive after 3 attempt(s) in 20.1s" in gate["checks"][0]["reason"]


def test_long_answers_are_cut_in_messages():
    long_list = list(range(100))
    assert cc.json_subset_mismatch({"a": 1}, long_list) == "$: expected an object, got " + json.dumps(long_list)[:100]
    assert cc.json_subset_mismatch([long_list], [1]) == "$[0]: no element matches " + json.dumps(long_list)[:100]
    assert cc.json_subset_mismatch([1], {"a": long_list}) == "$: expected a list, got " + json.dumps({"a": long_list})[:100]
    assert cc.json_subset_mismatch({"v": 1}, {"v": long_list}) == "$.v: expected 1, got " + json.dumps(long_list)[:100]
    gate = run(params(dict(name="h", type="http", url="http://x/", expect_json={"ok": True})), http=transport_answering(200, b"<" * 250))
    assert gate["checks"][0]["reason"] == "GET http://x/ answered HTTP 200 but not JSON: " + "<" * 200


def test_a_pod_created_at_the_start_of_the_window_counts_all_its_restarts():
    pods = [pod("new", 2, created="2025-12-31T23:59:00Z"), pod("older", 3, created="2025-12-31T23:58:59Z")]
    gate = run(params(RESTARTS), reader=FakeReader(deployment(), pods), wall=lambda: 1767225600.0)
    # "new" started in the window: both restarts are; "older" did not, and its last restart has no known time: one
    assert gate["checks"][0]["value"] == 3 and "new/app +2" in gate["checks"][0]["reason"] and "older/app +1" in gate["checks"][0]["reason"]


def test_the_gate_sleeps_only_between_attempts_even_on_a_clock_that_does_not_move():
    clock = FakeClock()
    sleeps = []
    gate = cc.evaluate_gate(params(SR, retry_inconclusive_for=30, retry_interval=10), TARGET, clock=clock, sleep=sleeps.append,
                            http=prometheus().transport)
    assert gate["checks"][0]["attempts"] == 4 and sleeps == [10, 10, 10]


def test_a_bound_that_is_not_a_number_lets_no_value_pass():
    gate = run(params(dict(name="q", type="promql", query="x", max=float("nan"))), FakePrometheus().add("x", 1))
    assert gate["verdict"] == "fail" and gate["checks"][0]["reason"] == "1 is not <= NaN"


@pytest.mark.skipif(not cc.HAS_K8S, reason="the kubernetes library is not installed")
def test_k8s_reader_when_a_proxy_answers_or_nothing_does():
    from kubernetes import client  # pylint: disable=import-outside-toplevel

    api_client = client.ApiClient()
    api_client.rest_client.pool_manager = FakeKubeAPI(down=(503, "upstream connect error"))
    gate = run(params(dict(READY, on_error="fail")), reader=api_client)
    assert "reading Deployment shop/reviews-v2: Kubernetes API answered 503: Service Unavailable (on_error: fail)" in gate["checks"][0]["reason"]
    api_client.rest_client.pool_manager = FakeKubeAPI(down=ConnectionRefusedError("[Errno 111] Connection refused"))
    gate = run(params(dict(READY, on_error="fail")), reader=api_client)
    assert "reading Deployment shop/reviews-v2: Kubernetes API unreachable: [Errno 111] Connection refused (on_error: fail)" in gate["checks"][0]["reason"]


def test_an_object_that_only_reads_deployments_is_not_a_reader():
    class OnlyReads:
        def read_deployment(self, namespace, name):
            return deployment()

    gate = run(params(dict(READY, on_error="fail")), reader=OnlyReads())   # taken for an API client, which it is not
    assert gate["verdict"] == "fail" and "Kubernetes API unreachable" in gate["checks"][0]["reason"]


def test_a_baseline_looks_past_items_that_are_not_checks():
    reader = FakeReader(deployment(), [pod("a", 2)])
    baseline = cc.take_baseline(dict(checks=["not a check", RESTARTS]), TARGET, k8s=reader)
    assert baseline["restarts"] == {"a-uid": {"name": "a", "containers": {"app": 2}}}
