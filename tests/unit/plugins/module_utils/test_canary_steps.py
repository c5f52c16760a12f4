# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Steps beyond weights (issue 11) in the rollout: plans with match and mirror steps, the VirtualService exactly as
each step leaves it, promotion and rollback putting it back (other routes byte-identical), hold, resume after a kill,
and the refusals before anything is written. The VirtualService operations themselves: test_step_routes.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import json

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import TrafficError, WeightChange
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_rollout import Clock, Killed, killed_in_window

VS = ("virtualservices", "shop", "payment")
V1 = {"host": "payment", "subset": "v1"}
V2 = {"host": "payment", "subset": "v2"}
HEADER_ROUTE = {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": dict(V2)}]}
TAIL_ROUTE = {"name": "legacy", "match": [{"uri": {"prefix": "/v0"}}], "route": [{"destination": {"host": "legacy"}}], "timeout": "1s"}
TARGET = {"name": "primary", "timeout": "2s", "route": [{"destination": dict(V1), "weight": 100}, {"destination": dict(V2), "weight": 0}]}
X_CANARY = {"headers": {"x-canary": {"exact": "true"}}}
COOKIE = {"headers": {"cookie": {"regex": r"^(.*?;\s*)?(canary=always)(;.*)?$"}}}
OWN_NAME = "onprem-mesh-canary-match-primary"


def target(stable=100, canary=0, **extra):
    route = copy.deepcopy(TARGET)
    route["route"][0]["weight"], route["route"][1]["weight"] = stable, canary
    route.update(copy.deepcopy(extra))
    return route


def own(match=None, **extra):
    route = {"name": OWN_NAME, "match": [copy.deepcopy(match or X_CANARY)], "timeout": "2s", "route": [{"destination": dict(V2)}]}
    route.update(extra)
    return route


def objects(route=None):
    return [{"kind": "VirtualService", "metadata": {"name": "payment", "namespace": "shop"},
             "spec": {"hosts": ["payment"], "http": [copy.deepcopy(HEADER_ROUTE), route or target(), copy.deepcopy(TAIL_ROUTE)]}},
            {"kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
             "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}]


class Gate:
    """Verdicts in order; keeps the routes as they are when each window ends (what the analysis judged)."""

    def __init__(self, store, verdicts=None):
        self.store = store
        self.verdicts = list(verdicts or [])
        self.seen = []
        self.windows = 0

    def start_window(self):
        self.windows += 1
        return self.windows

    def evaluate(self, token):
        self.seen.append(copy.deepcopy(self.store.objects[VS]["spec"]["http"]))
        verdict = self.verdicts.pop(0) if self.verdicts else "pass"
        check = {"name": "success-rate", "verdict": verdict, "value": 99.9 if verdict == "pass" else 50.0, "threshold": ">= 99"}
        return {"verdict": verdict, "checks": [check]}


def make(steps, store=None, verdicts=None, clock=None, route_name="primary", route_index=None, **kwargs):
    store = store or FakeIstio(objects())
    clock = clock or Clock()
    gate = Gate(store, verdicts)
    change = WeightChange(store, "shop", "payment", route_name=route_name, route_index=route_index, sleep=lambda s: None)
    plan = ro.plan_steps(list(steps), interval="30s")
    return store, gate, ro.Rollout(change, gate, "v1", "v2", plan, now=clock.now, sleep=clock.sleep, **kwargs)


def http(store):
    return store.objects[VS]["spec"]["http"]


def state(store):
    return json.loads(store.objects[VS]["metadata"]["annotations"][ro.STATE_ANNOTATION])


def dumped(routes):
    """Byte for byte, as a client would see the JSON."""
    return [json.dumps(r) for r in routes]


def canonical(routes):
    """As kube-apiserver returns a custom resource: its objects' keys in order (it stores them as maps), so a field put
    back by a JSON patch ``add`` reads the same as before wherever it was in the original document."""
    return [json.dumps(r, sort_keys=True) for r in routes]


MIRROR_THEN_MATCH = [{"mirror": 20}, {"match": {"headers": {"x-canary": {"exact": "true"}}}}, 10, 50, 100]


# -- plans ----------------------------------------------------------------------------------------------------------------------

def test_plans_with_match_and_mirror_steps():
    plan = ro.plan_steps([{"mirror": "12.5"}, {"match": {"cookie": "canary=always"}, "interval": "2m"}, {"mirror": 100}, 10, 100], interval="30s")
    assert plan == [{"weight": 0, "interval": 30, "mirror": 12.5}, {"weight": 0, "interval": 120, "match": COOKIE},
                    {"weight": 0, "interval": 30, "mirror": 100}, {"weight": 10, "interval": 30}]
    # a plan of early steps only: promotion follows them
    assert ro.plan_steps([{"match": X_CANARY}, 100]) == [{"weight": 0, "interval": 60.0, "match": X_CANARY}]
    assert [ro.step_kind(s) for s in plan] == ["mirror", "match", "mirror", "weight"]
    assert [ro.step_key(s) for s in plan] == [{"mirror": 12.5}, {"match": COOKIE}, {"mirror": 100}, 10]
    assert [ro.describe_step(s) for s in plan] == ["mirror 12.5 %", r"match headers cookie regex ^(.*?;\s*)?(canary=always)(;.*)?$",
                                                   "mirror 100 %", "weight 10"]
    two = {"weight": 0, "interval": 1, "match": {"headers": {"x-b": {"prefix": "q"}, "x-a": {"exact": "1"}}}}
    assert ro.describe_step(two) == "match headers x-a exact 1, x-b prefix q"


@pytest.mark.parametrize("steps, message", [
    ([{"mirror": 0}, 10], r"^steps\[0\]\.mirror: a percentage 0 < x <= 100 of the target route's requests to copy to the canary, e\.g\. mirror: 10; got 0$"),
    ([{"mirror": 101}, 10], r"^steps\[0\]\.mirror: a percentage 0 < x <= 100 .*; got 101$"),
    ([5, {"mirror": "lots"}], r"^steps\[1\]: a mirror step comes before the weight steps \(it is analysed while the canary gets no share of the route\);"
                              r" here it follows weight 5: move it to the front$"),
    ([{"match": X_CANARY}, 5, 10, {"match": X_CANARY}], r"^steps\[3\]: a match step comes before the weight steps .* here it follows weight 10: "),
    ([{"match": {"headers": {"x-canary": {"exact": True}}}}], r'^steps\[0\]\.match\.headers\.x-canary\.exact: True is a YAML boolean; quote it'),
    ([{"match": X_CANARY, "mirror": 10}], r"^steps\[0\]: match and mirror in one step; a step is a weight, a match or a mirror: give each its own step$"),
    ([{"weight": 5, "mirror": 10}], r"^steps\[0\]: weight and mirror in one step; "),
    ([{"weight": 5, "match": X_CANARY, "mirror": 10}], r"^steps\[0\]: weight and match and mirror in one step; "),
    ([{"mirror": 10, "pause": "1m"}], r"^steps\[0\]: unknown key pause; a step has one of weight, match or mirror, and an interval$"),
    ([{"mirror": 10, "interval": "soon"}], r"^steps\[0\]\.interval: expected a duration"),
    ([{"match": X_CANARY, "interval": -1}], r"^steps\[0\]\.interval: a duration cannot be negative"),
    ([{"interval": "1m"}], r"^steps\[0\]: weight must be a whole number from 1 to 100, got None$"),
    ([{"match": X_CANARY}], None),
])
def test_bad_step_forms_name_the_field_and_the_fix(steps, message):
    if message is None:  # a match step alone is a plan (promotion follows)
        assert ro.plan_steps(steps)[0]["match"] == X_CANARY
        return
    with pytest.raises(ro.RolloutError, match=message):
        ro.plan_steps(steps)


def test_the_recorded_plan_names_the_step_kinds_and_another_plan_is_refused():
    store, gate, first = make(MIRROR_THEN_MATCH)
    killed_in_window(gate, 2)
    with pytest.raises(Killed):
        first.run()
    assert state(store)["plan"] == [{"mirror": 20}, {"match": X_CANARY}, 10, 50] and state(store)["step"] == 1
    for other in ([{"mirror": 30}, {"match": X_CANARY}, 10, 50, 100], [{"mirror": 20}, {"match": {"cookie": "x=1"}}, 10, 50, 100],
                  [{"match": X_CANARY}, {"mirror": 20}, 10, 50, 100], [10, 50, 100]):
        _s, _g, rerun = make(other, store=store, force=True)
        with pytest.raises(ro.RolloutError, match=r"records an unfinished rollout \(canary v2, stable v1, steps \[\{'mirror': 20\}, \{'match': "
                                                  r"\{'headers': \{'x-canary': \{'exact': 'true'\}\}\}\}, 10, 50\], progressing at step 2\)"):
            rerun.run()
    assert store.calls["write"] == 2  # none of the refused reruns wrote


# -- the VirtualService at each step -------------------------------------------------------------------------------------------

def test_mirror_then_match_then_weights_then_promotion_exactly():
    store, gate, rollout = make(MIRROR_THEN_MATCH)
    original = copy.deepcopy(http(store))
    result = rollout.run()
    assert result["result"] == "promoted"
    mirrored = target(mirror=V2, mirrorPercentage={"value": 20})
    assert gate.seen == [
        # the mirror step: 20 % of the route's requests copied to the canary, users all on stable
        [HEADER_ROUTE, mirrored, TAIL_ROUTE],
        # the match step: the mirror gone, x-canary: true to the canary in front of the target
        [HEADER_ROUTE, own(), target(), TAIL_ROUTE],
        # weight steps keep the match route, so testers keep reaching the canary
        [HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE],
        [HEADER_ROUTE, own(), target(50, 50), TAIL_ROUTE],
    ]
    # promotion: the match route removed, no mirror; everything else byte-identical to before the rollout
    assert dumped(http(store)) == dumped([original[0], target(0, 100), original[2]])
    assert [(e["step"], e["weight"], e.get("mirror"), e.get("match"), e["action"]) for e in result["timeline"]] == [
        (1, 0, 20, None, "advance"), (2, 0, None, X_CANARY, "advance"), (3, 10, None, None, "advance"), (4, 50, None, None, "promote"),
        (5, 100, None, None, "promoted")]
    assert result["timeline"][0]["weights"] == {"v1": 100, "v2": 0}
    assert [(r["step"], r["weight"], r.get("mirror"), r.get("match")) for r in result["schedule"]] == [
        (1, 0, 20, None), (2, 0, None, X_CANARY), (3, 10, None, None), (4, 50, None, None), (5, 100, None, None)]
    assert state(store) == {"canary": "v2", "stable": "v1", "plan": [{"mirror": 20}, {"match": X_CANARY}, 10, 50], "step": 4, "phase": "promoted",
                            "failures": 0, "updated": result["timeline"][-1]["started"], "holder": rollout.holder, "mirror_saved": {}}
    assert store.calls["write"] == 5  # still one write per step


def test_each_step_is_one_guarded_write_with_tests_on_what_it_changes():
    store, _gate, rollout = make(MIRROR_THEN_MATCH)
    rollout.run()
    shapes = [[(op["op"], op["path"]) for op in patch if not op["path"].startswith("/metadata")] for patch in store.patches]
    assert shapes == [
        [("test", "/spec/http/1/route"), ("test", "/spec/http/1/mirror"), ("add", "/spec/http/1/mirror"),
         ("test", "/spec/http/1/mirrorPercentage"), ("add", "/spec/http/1/mirrorPercentage")],
        [("test", "/spec/http/1/route"), ("test", "/spec/http/1/mirror"), ("remove", "/spec/http/1/mirror"),
         ("test", "/spec/http/1/mirrorPercentage"), ("remove", "/spec/http/1/mirrorPercentage"), ("test", "/spec/http/1/name"), ("add", "/spec/http/1")],
        [("test", "/spec/http/2/route"), ("replace", "/spec/http/2/route/0/weight"), ("replace", "/spec/http/2/route/1/weight")],
        [("test", "/spec/http/2/route"), ("replace", "/spec/http/2/route/0/weight"), ("replace", "/spec/http/2/route/1/weight")],
        [("test", "/spec/http/2/route"), ("replace", "/spec/http/2/route/0/weight"), ("replace", "/spec/http/2/route/1/weight"),
         ("test", "/spec/http/1"), ("remove", "/spec/http/1")],
    ]


def test_match_on_a_route_with_its_own_match_and_by_route_index():
    route = target(match=[{"uri": {"prefix": "/pay"}}, {"uri": {"prefix": "/checkout"}}])
    store, gate, rollout = make([{"match": {"cookie": "canary=always"}}, 25, 100], store=FakeIstio(objects(route)),
                                route_name=None, route_index=1)
    assert rollout.run()["result"] == "promoted"
    both = [{"uri": {"prefix": "/pay"}, "headers": COOKIE["headers"]}, {"uri": {"prefix": "/checkout"}, "headers": COOKIE["headers"]}]
    assert gate.seen[0][1] == {"name": OWN_NAME, "match": both, "timeout": "2s", "route": [{"destination": V2}]}
    # route_index 1 is the user's route all along, the match route in front of it not counted
    assert gate.seen[1][2]["route"] == target(75, 25)["route"] and gate.seen[1][2]["match"] == route["match"]
    assert dumped(http(store)) == dumped([HEADER_ROUTE, dict(route, route=target(0, 100)["route"]), TAIL_ROUTE])


def test_a_failed_match_step_rolls_back_to_the_routes_as_they_were():
    store, gate, rollout = make([{"match": X_CANARY}, 10, 100], verdicts=["fail"])
    original = dumped(http(store))
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["reason"].startswith("step 1 (match headers x-canary exact true): success-rate fail")
    assert gate.seen == [[HEADER_ROUTE, own(), target(), TAIL_ROUTE]]
    assert dumped(http(store)) == original
    assert state(store)["phase"] == "rolled_back" and "mirror_saved" not in state(store)


def test_a_failed_weight_step_after_a_match_removes_the_match_route_too():
    store, _gate, rollout = make([{"match": X_CANARY}, 10, 50, 100], verdicts=["pass", "pass", "fail"])
    original = dumped(http(store))
    assert rollout.run()["result"] == "rolled_back"
    assert dumped(http(store)) == original


def test_a_failed_mirror_step_puts_the_users_own_mirror_back_byte_for_byte():
    theirs = target(mirror={"host": "audit", "port": {"number": 80}}, mirrorPercent=5)
    store, gate, rollout = make([{"mirror": 40}, 10, 100], store=FakeIstio(objects(theirs)), verdicts=["fail"])
    original = dumped(http(store))
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["reason"].startswith("step 1 (mirror 40 %): ")
    # during the step: the user's mirror and the canary's, as Istio's mirrors (it allows no mirror next to mirrors)
    assert gate.seen[0][1] == target(mirrors=[{"destination": {"host": "audit", "port": {"number": 80}}, "percentage": {"value": 5}},
                                              {"destination": V2, "percentage": {"value": 40}}])
    assert dumped(http(store)) == original
    assert state(store)["mirror_saved"] == {"mirror": {"host": "audit", "port": {"number": 80}}, "mirrorPercent": 5}


def test_the_users_mirrors_get_the_canary_appended_and_back_on_promotion():
    theirs = target(mirrors=[{"destination": {"host": "audit"}}])
    store, gate, rollout = make([{"mirror": 5}, 100], store=FakeIstio(objects(theirs)))
    assert rollout.run()["result"] == "promoted"
    assert gate.seen[0][1]["mirrors"] == [{"destination": {"host": "audit"}}, {"destination": V2, "percentage": {"value": 5}}]
    assert dumped(http(store)) == dumped([HEADER_ROUTE, target(0, 100, mirrors=[{"destination": {"host": "audit"}}]), TAIL_ROUTE])


def test_the_match_route_keeps_the_users_mirror_not_the_canarys():
    theirs = target(mirror={"host": "audit"})
    store, gate, rollout = make([{"mirror": 10}, {"match": X_CANARY}, 100], store=FakeIstio(objects(theirs)))
    assert rollout.run()["result"] == "promoted"
    assert gate.seen[1][1:3] == [own(mirror={"host": "audit"}), theirs]
    assert dumped(http(store)) == dumped([HEADER_ROUTE, target(0, 100, mirror={"host": "audit"}), TAIL_ROUTE])


def test_a_hold_keeps_the_match_route_and_a_rerun_resumes_with_it():
    store, gate, rollout = make([{"match": X_CANARY}, 10, 100], verdicts=["pass", "fail"], on_failure="hold")
    result = rollout.run()
    assert result["result"] == "held"
    assert http(store) == [HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE]
    _s, gate, rerun = make([{"match": X_CANARY}, 10, 100], store=store)
    result = rerun.run()
    assert result["result"] == "promoted" and result["note"] == "resuming held at step 2 (weight 10), as recorded"
    assert gate.seen == [[HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE]]
    assert http(store) == [HEADER_ROUTE, target(0, 100), TAIL_ROUTE]


def test_a_hold_in_a_mirror_step_keeps_mirroring_and_a_rerun_puts_the_users_mirror_back():
    theirs = target(mirror={"host": "audit"}, mirrorPercentage={"value": 1})
    store, _gate, rollout = make([{"mirror": 30}, 100], store=FakeIstio(objects(theirs)), verdicts=["fail"], on_failure="hold")
    assert rollout.run()["result"] == "held"
    during = target(mirrors=[{"destination": {"host": "audit"}, "percentage": {"value": 1}}, {"destination": V2, "percentage": {"value": 30}}])
    assert http(store)[1] == during
    # a new run takes the user's mirror from the record, not from the route as it finds it
    _s, gate, rerun = make([{"mirror": 30}, 100], store=store)
    assert rerun.run()["result"] == "promoted"
    assert gate.seen == [[HEADER_ROUTE, during, TAIL_ROUTE]]
    assert dumped(http(store)) == dumped([HEADER_ROUTE, target(0, 100, mirror={"host": "audit"}, mirrorPercentage={"value": 1}), TAIL_ROUTE])


def test_a_killed_mirror_step_is_undone_by_the_rerun_that_rolls_back():
    theirs = target(mirror={"host": "audit"})
    store, gate, first = make([{"mirror": 50}, 10, 100], store=FakeIstio(objects(theirs)))
    original = dumped(http(store))
    killed_in_window(gate, 1)
    with pytest.raises(Killed):
        first.run()
    assert state(store)["mirror_saved"] == {"mirror": {"host": "audit"}} and state(store)["phase"] == "progressing"
    assert http(store)[1]["mirrors"][1] == {"destination": V2, "percentage": {"value": 50}}
    _s, gate, rerun = make([{"mirror": 50}, 10, 100], store=store, verdicts=["fail"], force=True)
    result = rerun.run()
    assert result["result"] == "rolled_back" and result["note"] == "resuming progressing at step 1 (mirror 50 %), as recorded"
    assert dumped(http(store)) == original


def test_a_killed_match_step_resumes_and_the_promotion_removes_its_route():
    store, gate, first = make([{"match": X_CANARY}, 10, 100])
    killed_in_window(gate, 2)
    with pytest.raises(Killed):
        first.run()
    assert http(store) == [HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE]
    _s, gate, rerun = make([{"match": X_CANARY}, 10, 100], store=store, force=True)
    assert rerun.run()["result"] == "promoted"
    assert gate.seen == [[HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE]]
    assert http(store) == [HEADER_ROUTE, target(0, 100), TAIL_ROUTE]


def test_a_restart_with_a_plain_plan_clears_what_a_killed_run_left():
    store, gate, first = make([{"mirror": 10}, {"match": X_CANARY}, 10, 100])
    killed_in_window(gate, 3)
    with pytest.raises(Killed):
        first.run()
    assert http(store) == [HEADER_ROUTE, own(), target(90, 10), TAIL_ROUTE]
    _s, gate, rerun = make([25, 100], store=store, force=True, restart=True)
    assert rerun.run()["result"] == "promoted"
    assert gate.seen == [[HEADER_ROUTE, target(75, 25), TAIL_ROUTE]]
    assert http(store) == [HEADER_ROUTE, target(0, 100), TAIL_ROUTE]


def test_a_restart_after_a_killed_mirror_step_restores_the_users_mirror_from_the_record():
    theirs = target(mirrorPercentage={"value": 3}, mirror={"host": "audit"})
    store, gate, first = make([{"mirror": 10}, 100], store=FakeIstio(objects(theirs)))
    original = dumped(http(store))
    killed_in_window(gate, 1)
    with pytest.raises(Killed):
        first.run()
    _s, gate, rerun = make([{"mirror": 60}, 100], store=store, force=True, restart=True, verdicts=["fail"])
    assert rerun.run()["result"] == "rolled_back"
    assert gate.seen[0][1]["mirrors"] == [{"destination": {"host": "audit"}, "percentage": {"value": 3}},
                                          {"destination": V2, "percentage": {"value": 60}}]
    assert dumped(http(store)) != original  # mirrorPercentage came first in the user's route; put back, it comes after mirror
    assert canonical(http(store)) == canonical(json.loads(r) for r in original)
    assert dumped(http(store))[0::2] == original[0::2]


def test_a_route_that_mirrors_to_the_canary_itself_keeps_that_mirror_without_a_record():
    theirs = target(mirror=dict(V2), mirrorPercentage={"value": 2})
    store, gate, rollout = make([{"mirror": 10}, 100], store=FakeIstio(objects(theirs)))
    assert rollout.run()["result"] == "promoted"
    assert http(store)[1] == target(0, 100, mirror=dict(V2), mirrorPercentage={"value": 2})


def test_a_plain_weight_plan_writes_exactly_what_it_did_before():
    store, _gate, rollout = make([10, 100])
    assert rollout.run()["result"] == "promoted"
    assert [[(op["op"], op["path"]) for op in p if not op["path"].startswith("/metadata")] for p in store.patches] == [
        [("test", "/spec/http/1/route"), ("replace", "/spec/http/1/route/0/weight"), ("replace", "/spec/http/1/route/1/weight")]] * 2
    assert "mirror_saved" not in state(store) and state(store)["plan"] == [10]


def test_a_hold_changes_no_route_beyond_the_record():
    store, _gate, rollout = make([{"mirror": 10}, {"match": X_CANARY}, 100], verdicts=["pass", "fail"], on_failure="hold")
    assert rollout.run()["result"] == "held"
    last = store.patches[-1]
    assert [op["path"] for op in last if not op["path"].startswith("/metadata")] == ["/spec/http/2/route"]


# -- refused before anything is written ---------------------------------------------------------------------------------------

def test_a_source_reporter_check_cannot_judge_a_mirror_step():
    plan = ro.plan_steps([{"match": X_CANARY}, {"mirror": 10}, 50])
    checks = [{"name": "ready", "type": "workload_ready"}, {"name": "sr", "type": "success_rate", "min": 99, "reporter": "source"}]
    store = FakeIstio(objects())
    change = WeightChange(store, "shop", "payment", route_name="primary")
    vs = change.read()
    with pytest.raises(ro.RolloutError, match=r"^steps\[1\]\.mirror: check sr reads reporter: source, which never counts mirrored requests \(Istio "
                                              r"reports a mirrored request on the canary's inbound side only, reporter: destination\); drop reporter: "
                                              r"source from the check, or the mirror step; this run wrote nothing: traffic stays v1=100, v2=0 "
                                              r"\(canary v2 gets 0 % of it\)$") as err:
        ro.check_plan(plan, checks, change, vs, "v2")
    assert err.value.result == {"canary": "v2", "weights_before": {"v1": 100, "v2": 0}, "timeline": [], "changed": False,
                                "result": "not_started", "weights_after": {"v1": 100, "v2": 0}}
    assert store.calls["write"] == 0
    # reporter destination (or none), other check types, or no mirror step: fine
    ro.check_plan(plan, [{"name": "sr", "type": "success_rate", "reporter": "destination"}, {"name": "l", "type": "latency"},
                         {"name": "h", "type": "http", "reporter": "source"}], change, vs, "v2")
    ro.check_plan(ro.plan_steps([{"match": X_CANARY}, 50]), checks, change, vs, "v2")
    # the first mirror step is named
    with pytest.raises(ro.RolloutError, match=r"^steps\[0\]\.mirror: check sr reads reporter: source"):
        ro.check_plan(ro.plan_steps([{"mirror": 5}, {"mirror": 50}, 50]), checks)
    for kind in ("latency", "promql"):
        with pytest.raises(ro.RolloutError, match=r"^steps\[1\]\.mirror: check c reads reporter: source"):
            ro.check_plan(plan, [{"name": "c", "type": kind, "reporter": "source"}])


def test_a_match_step_whose_header_the_route_matches_otherwise_is_refused():
    route = target(match=[{"headers": {"x-canary": {"exact": "false"}}}])
    store = FakeIstio(objects(route))
    change = WeightChange(store, "shop", "payment", route_name="primary")
    plan = ro.plan_steps([{"mirror": 5}, {"match": X_CANARY}, 50])
    with pytest.raises(ro.RolloutError, match=r'^steps\[1\]\.match\.headers\.x-canary: the target route already matches header x-canary with '
                                              r'\{"exact": "false"\}, the step with \{"exact": "true"\}; no request meets both: match another header;'
                                              r" this run wrote nothing: traffic stays v1=100, v2=0") as err:
        ro.check_plan(plan, [], change, change.read(), "v2")
    assert err.value.result["result"] == "not_started"
    ro.check_plan(ro.plan_steps([{"match": {"headers": {"x-canary": {"exact": "false"}}}}, 50]), [], change, change.read(), "v2")
    ro.check_plan(plan)  # nothing to check against without the route


def test_a_conflicting_match_met_inside_a_run_stops_before_any_write():
    route = target(match=[{"headers": {"x-canary": {"prefix": "f"}}}])
    store, _gate, rollout = make([{"match": X_CANARY}, 50, 100], store=FakeIstio(objects(route)))
    with pytest.raises(TrafficError, match=r"steps\[0\]\.match\.headers\.x-canary: the target route already matches") as err:
        rollout.run()
    assert err.value.result["result"] == "not_started" and store.calls["write"] == 0


def test_a_rerun_after_a_kill_in_a_match_step_says_which_step_it_resumes_and_keeps_its_route():
    store, gate, first = make([{"match": X_CANARY}, 10, 100])
    killed_in_window(gate, 1)
    with pytest.raises(Killed):
        first.run()
    _s, gate, rerun = make([{"match": X_CANARY}, 10, 100], store=store, force=True)
    result = rerun.run()
    assert result["note"] == "resuming progressing at step 1 (match headers x-canary exact true), as recorded"
    # the resumed step's write finds its match route in place: it changes no route, only the record
    assert [op["path"] for op in store.patches[1] if not op["path"].startswith("/metadata")] == ["/spec/http/2/route"]
    assert gate.seen[0] == [HEADER_ROUTE, own(), target(), TAIL_ROUTE] and result["result"] == "promoted"


def test_a_restart_with_a_plain_plan_after_a_killed_mirror_step_puts_the_users_mirror_back():
    theirs = target(mirror={"host": "audit"})
    store, gate, first = make([{"mirror": 50}, 10, 100], store=FakeIstio(objects(theirs)))
    killed_in_window(gate, 1)
    with pytest.raises(Killed):
        first.run()
    _s, gate, rerun = make([10, 100], store=store, force=True, restart=True)
    assert rerun.run()["result"] == "promoted"
    assert gate.seen == [[HEADER_ROUTE, target(90, 10, mirror={"host": "audit"}), TAIL_ROUTE]]
    assert "mirror_saved" not in state(store)
