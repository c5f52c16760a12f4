# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Issue 11: a step's analysis window never reaches back before the step's weight took effect. The engine with fakes
(fake_prometheus.py answers over the collection's real client)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks as cc
from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_prometheus import FakePrometheus
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_canary_checks import CANARY, FakeClock, params, run
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_rollout import Clock, Probe, make, objects

TARGET = dict(namespace="shop", workload="reviews-v2", version="v2", stable_version="v1", host="reviews.shop.svc")
SR = dict(name="errors", type="success_rate", min=99)
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


def traffic(prom, start, before=(100, 0), after=(80, 20), labels=CANARY, span=120):
    """Requests per second to ``labels`` (non-5xx, 5xx): ``before`` until ``start``, ``after`` from then on."""
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
    wall = lambda: NOW + clock.now   # noqa: E731  the wall clock moves with the retries' sleeps
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
