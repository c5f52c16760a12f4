# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest

from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import K8sError
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio

HEADER_ROUTE = {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "payment", "subset": "v2"}}]}
MAIN_ROUTE = {"name": "primary", "timeout": "2s",
              "route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100}, {"destination": {"host": "payment", "subset": "v2"}, "weight": 0}]}


def objects(stable=100, canary=0):
    route = dict(MAIN_ROUTE, route=[{"destination": {"host": "payment", "subset": "v1"}, "weight": stable},
                                    {"destination": {"host": "payment", "subset": "v2"}, "weight": canary}])
    return [{"kind": "VirtualService", "metadata": {"name": "payment", "namespace": "shop"},
             "spec": {"hosts": ["payment"], "http": [HEADER_ROUTE, route]}},
            {"kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
             "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}]


class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0
        self.slept = []

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.t += seconds


class Gate:
    """Verdicts in order; records the weights live on the object when each window ends."""

    def __init__(self, store, verdicts=None, default="pass"):
        self.store = store
        self.verdicts = list(verdicts or [])
        self.default = default
        self.seen = []
        self.windows = 0

    def start_window(self):
        self.windows += 1
        return {"window": self.windows}

    def evaluate(self, token):
        self.seen.append(current_weights(self.store.route("payment", "shop", 1))["v2"])
        verdict = self.verdicts.pop(0) if self.verdicts else self.default
        value = 99.9 if verdict == "pass" else 80.0
        return {"verdict": verdict, "checks": [{"name": "success-rate", "verdict": verdict, "value": value, "threshold": ">= 99"}]}


def make(store=None, verdicts=None, clock=None, steps=(5, 10, 25, 50), **kwargs):
    store = store or FakeIstio(objects())
    clock = clock or Clock()
    gate = Gate(store, verdicts)
    change = WeightChange(store, "shop", "payment", route_name="primary", sleep=lambda s: None)
    plan = ro.plan_steps(list(steps), interval=kwargs.pop("interval", "30s"))
    rollout = ro.Rollout(change, gate, "v1", "v2", plan, now=clock.now, sleep=clock.sleep, **kwargs)
    return store, gate, clock, rollout


def state(store):
    return json.loads(store.objects[("virtualservices", "shop", "payment")]["metadata"]["annotations"][ro.STATE_ANNOTATION])


def annotations(store):
    return store.objects[("virtualservices", "shop", "payment")]["metadata"].get("annotations", {})


def test_plan_from_list_and_from_step_max():
    assert [s["weight"] for s in ro.plan_steps([5, 10, 25, 50, 100])] == [5, 10, 25, 50]
    assert [s["weight"] for s in ro.plan_steps(step_weight=10, max_weight=30)] == [10, 20, 30]
    assert [s["weight"] for s in ro.plan_steps(step_weight=25)] == [25, 50]   # max_weight 50 by default
    assert [s["weight"] for s in ro.plan_steps(step_weight=17)] == [17, 34]
    assert [s["weight"] for s in ro.plan_steps(step_weight=50, max_weight=50)] == [50]
    assert [s["weight"] for s in ro.plan_steps(step_weight=1, max_weight=1)] == [1]
    assert ro.plan_steps(["5", "99"]) == [{"weight": 5, "interval": 60.0}, {"weight": 99, "interval": 60.0}]   # 1m by default
    plan = ro.plan_steps([{"weight": 5, "interval": "2m"}, 50], interval="30s")
    assert plan == [{"weight": 5, "interval": 120.0}, {"weight": 50, "interval": 30.0}]


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=[10, 5]), r"steps\[1\]: weights must increase"),
    (dict(steps=[0, 5]), r"steps\[0\]: weight must be from 1 to 100"),
    (dict(steps=[5, 101]), r"steps\[1\]: weight must be from 1 to 100, got 101"),
    (dict(steps=[5, 5]), r"steps\[1\]: weights must increase step by step; 5 follows 5"),
    (dict(steps=[5, 10, 7]), r"steps\[2\]: weights must increase step by step; 7 follows 10"),
    (dict(step_weight=1, max_weight=0), "max_weight: a whole number from 1 to 100, got 0"),
    (dict(steps=[True]), r"steps\[0\]: weight must be a whole number from 1 to 100, got True"),
    (dict(steps=[{"weight": 5, "interval": "soon"}]), r"steps\[0\]\.interval: expected a duration"),
    (dict(steps=[5], step_weight=10), "mutually exclusive"),
    (dict(steps=[5], max_weight=50), "mutually exclusive"),
    (dict(step_weight=-10), "step_weight: a whole number from 1 to 100, got -10"),
    (dict(step_weight=True), "step_weight: a whole number from 1 to 100, got True"),
    (dict(step_weight=10, max_weight=101), "max_weight: a whole number from 1 to 100, got 101"),
    (dict(step_weight=100, max_weight=100), "at least one weight below 100"),
    (dict(steps=[5, 100, 50]), r"steps\[1\]: 100 is the promotion"),
    (dict(steps=[5.5]), r"steps\[0\]: weight must be a whole number"),
    (dict(steps=[100]), "at least one weight below 100"),
    (dict(steps=[5], interval="soon"), "interval: expected a duration"),
    (dict(step_weight=60, max_weight=50), "step_weight .60. is larger than max_weight"),
    (dict(steps=[{"weight": 5, "pause": 1}]), r"steps\[0\]: unknown key pause"),
    (dict(), "steps: give the weights"),
])
def test_bad_schedules_name_the_field(kwargs, message):
    with pytest.raises(ro.RolloutError, match=message):
        ro.plan_steps(**kwargs)


def test_healthy_rollout_walks_every_step_and_promotes():
    store, gate, clock, rollout = make()
    result = rollout.run()
    assert result["result"] == "promoted" and result["changed"] is True
    assert gate.seen == [5, 10, 25, 50]
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 0, "v2": 100}
    assert [e.get("action") for e in result["timeline"]] == ["advance", "advance", "advance", "promote", "promoted"]
    assert [(e["step"], e["weight"], e["seconds"]) for e in result["timeline"][:4]] == [(1, 5, 30.0), (2, 10, 30.0), (3, 25, 30.0), (4, 50, 30.0)]
    assert result["timeline"][4] == dict(step=5, weight=100, weights={"v1": 0, "v2": 100}, started="2023-11-14T22:15:20.000Z",
                                         ended="2023-11-14T22:15:20.000Z", action="promoted")
    assert result["timeline"][0]["started"] == "2023-11-14T22:13:20.000Z" and result["timeline"][0]["ended"] == "2023-11-14T22:13:50.000Z"
    assert result["weights_before"] == {"v1": 100, "v2": 0} and result["weights_after"] == {"v1": 0, "v2": 100} and result["failures"] == 0
    assert sum(clock.slept) == pytest.approx(120.0)
    # one write per step and one for the promotion; the lease is gone at the end
    assert store.calls["write"] == 5
    assert ro.LEASE_ANNOTATION not in annotations(store)
    assert state(store) == {"canary": "v2", "stable": "v1", "plan": [5, 10, 25, 50], "step": 4, "phase": "promoted", "failures": 0,
                            "updated": "2023-11-14T22:15:20.000Z", "holder": rollout.holder}
    # other routes untouched
    assert store.route("payment", "shop", 0) == HEADER_ROUTE
    assert store.route("payment", "shop", 1)["timeout"] == "2s"


def test_each_step_costs_one_write_and_one_read():
    _store, _gate, _clock, rollout = make()
    result = rollout.run()
    for entry in result["timeline"][:4]:
        assert entry["api_calls"] == {"read": 1, "write": 1}


def test_failed_check_rolls_back_to_stable():
    store, gate, _clock, rollout = make(verdicts=["pass", "pass", "fail"])
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["changed"] is True
    assert "step 3 (weight 25)" in result["reason"] and "success-rate fail (value 80.0" in result["reason"]
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}
    assert state(store)["phase"] == "rolled_back" and ro.LEASE_ANNOTATION not in annotations(store)
    assert state(store)["reason"] == result["reason"] and state(store)["step"] == 2 and state(store)["failures"] == 1
    assert result["timeline"][-1] == dict(step=3, weight=0, weights={"v1": 100, "v2": 0}, started="2023-11-14T22:14:50.000Z",
                                          ended="2023-11-14T22:14:50.000Z", action="rolled_back", reason=result["reason"])
    assert gate.seen == [5, 10, 25]


def test_hold_freezes_at_the_failing_weight_and_a_rerun_resumes_there():
    store, gate, _clock, rollout = make(verdicts=["pass", "fail"], on_failure="hold")
    result = rollout.run()
    assert result["result"] == "held" and result["changed"] is True and result["weights_after"] == {"v1": 90, "v2": 10}
    assert result["timeline"][-1] == dict(step=2, weight=10, weights={"v1": 90, "v2": 10}, started="2023-11-14T22:14:20.000Z",
                                          ended="2023-11-14T22:14:20.000Z", action="held", reason=result["reason"])
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 90, "v2": 10}
    assert state(store)["phase"] == "held" and state(store)["step"] == 1
    _s, gate2, _c, rerun = make(store=store, on_failure="hold")
    result = rerun.run()
    assert result["result"] == "promoted" and "resuming held at step 2 (weight 10)" in result["note"]
    assert gate2.seen == [10, 25, 50]


def test_inconclusive_is_never_a_pass():
    store, _gate, _clock, rollout = make(verdicts=["inconclusive"])
    assert rollout.run()["result"] == "rolled_back"
    assert current_weights(store.route("payment", "shop", 1))["v2"] == 0


def test_failure_limit_tolerates_failed_analyses_at_the_same_weight():
    _store, gate, _clock, rollout = make(verdicts=["pass", "fail", "pass", "fail", "pass"], failure_limit=2)
    result = rollout.run()
    assert result["result"] == "promoted" and result["failures"] == 2
    assert gate.seen == [5, 10, 10, 25, 25, 50]
    _store, gate, _clock, rollout = make(verdicts=["fail", "fail", "fail"], failure_limit=2)
    assert rollout.run()["result"] == "rolled_back" and gate.seen == [5, 5, 5]


def test_resume_after_a_killed_run_neither_restarts_nor_skips():
    store, _gate, clock, first = make(lease_seconds=60)

    class Killed(BaseException):  # like SIGTERM or Ctrl-C: no rollback, the record stays for a rerun
        pass

    def kill_on_third(token):
        if first.gate.windows == 3:
            raise Killed()
        return Gate.evaluate(first.gate, token)

    first.gate.evaluate = kill_on_third
    with pytest.raises(Killed):
        first.run()
    assert state(store)["step"] == 2 and current_weights(store.route("payment", "shop", 1))["v2"] == 25
    # the dead run's lease still holds
    _s, _g, _c, blocked = make(store=store, clock=clock)
    with pytest.raises(ro.LeaseHeld, match="held by another rollout .*force: true"):
        blocked.run()
    clock.t += 61
    _s, gate, _c, rerun = make(store=store, clock=clock)
    result = rerun.run()
    assert "resuming progressing at step 3 (weight 25)" in result["note"]
    assert gate.seen == [25, 50] and result["result"] == "promoted"


def test_force_takes_over_a_live_lease():
    store, _gate, clock, first = make()
    first._write(5, "progressing", 0, 0, interval=600)
    _s, gate, _c, forced = make(store=store, clock=clock, force=True)
    assert forced.run()["result"] == "promoted" and gate.seen == [5, 10, 25, 50]


def test_two_rollouts_at_once_the_second_refuses():
    store, _gate, clock, first = make()
    results = {}

    def second_starts_during_first_window(token):
        _s, _g, _c, second = make(store=store, clock=clock)
        with pytest.raises(ro.LeaseHeld) as err:
            second.run()
        results["second"] = str(err.value)
        first.gate.evaluate = lambda t: Gate.evaluate(first.gate, t)
        return Gate.evaluate(first.gate, token)

    first.gate.evaluate = second_starts_during_first_window
    assert first.run()["result"] == "promoted"
    assert "held by another rollout (%s)" % first.holder in results["second"]


def test_a_different_plan_does_not_resume_someone_elses_rollout():
    store, _gate, _clock, first = make(verdicts=["pass", "fail"], on_failure="hold")
    first.run()
    _s, _g, _c, other = make(store=store, steps=(20, 40))
    with pytest.raises(ro.RolloutError, match="unfinished rollout .*steps \\[5, 10, 25, 50\\].*restart: true"):
        other.run()
    _s, gate, _c, restart = make(store=store, steps=(20, 40), restart=True)
    assert restart.run()["result"] == "promoted" and gate.seen == [20, 40]


def test_promoted_rerun_changes_nothing():
    store, _gate, _clock, rollout = make()
    rollout.run()
    writes = store.calls["write"]
    _s, gate, _c, rerun = make(store=store)
    result = rerun.run()
    assert result["changed"] is False and result["result"] == "promoted" and store.calls["write"] == writes and gate.seen == []


def test_check_mode_plans_and_writes_nothing():
    store, gate, _clock, rollout = make()
    result = rollout.run(check_mode=True)
    assert result["result"] == "planned" and result["changed"] is True and store.calls["write"] == 0 and gate.seen == []
    assert result["schedule"] == [dict(step=1, weight=5, weights={"v1": 95, "v2": 5}, interval=30.0),
                                  dict(step=2, weight=10, weights={"v1": 90, "v2": 10}, interval=30.0),
                                  dict(step=3, weight=25, weights={"v1": 75, "v2": 25}, interval=30.0),
                                  dict(step=4, weight=50, weights={"v1": 50, "v2": 50}, interval=30.0),
                                  dict(step=5, weight=100, weights={"v1": 0, "v2": 100}, interval=0, promotion=True)]
    assert result["planned_seconds"] == 120.0 and result["weights_after"] == {"v1": 0, "v2": 100}


def test_check_mode_of_a_held_rollout_plans_from_where_it_stopped():
    store, _gate, _clock, rollout = make(verdicts=["pass", "pass", "fail"], on_failure="hold")
    rollout.run()
    writes = store.calls["write"]
    _s, _g, _c, rerun = make(store=store, on_failure="hold")
    result = rerun.run(check_mode=True)
    assert [row["step"] for row in result["schedule"]] == [3, 4, 5] and result["planned_seconds"] == 60.0
    assert "resuming held at step 3 (weight 25)" in result["note"] and store.calls["write"] == writes


def test_wait_for_mesh_times_out_into_rollback():
    store, gate, _clock, rollout = make(wait_for_mesh=True, mesh_timeout=5, poll_interval=1)
    result = rollout.run()
    assert result["result"] == "rolled_back" and "did not report generation" in result["reason"]
    assert gate.seen == []


class LaggingMesh:
    """istiod's status on the VirtualService: status.observedGeneration reaches a new generation only after
    ``lag`` reads of it (until then it still names the previous one), as a mesh that is busy programming."""

    def __init__(self, store, lag):
        self.store = store
        self.lag = lag
        self.reads = {}
        self.get = store.get
        store.get = self.read

    def read(self, plural, namespace, name):
        obj = self.store.objects[(plural, namespace, name)]
        generation = obj["metadata"]["generation"]
        self.reads[generation] = self.reads.get(generation, 0) + 1
        obj["status"] = {"observedGeneration": generation if self.reads[generation] > self.lag else generation - 1}
        return self.get(plural, namespace, name)


def test_wait_for_mesh_starts_the_window_once_the_generation_is_observed():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=30, poll_interval=1)
    LaggingMesh(store, lag=2)
    at_window_start = []
    start_window = gate.start_window

    def note_what_the_mesh_reports():
        obj = store.objects[("virtualservices", "shop", "payment")]
        at_window_start.append((obj["status"]["observedGeneration"], obj["metadata"]["generation"]))
        return start_window()

    gate.start_window = note_what_the_mesh_reports
    result = rollout.run()
    assert result["result"] == "promoted" and all("mesh_ready" in e for e in result["timeline"][:4])
    assert at_window_start == [(2, 2), (3, 3), (4, 4), (5, 5)]   # never a window on a generation the mesh has not programmed
    # the write, then three polls a second apart: two stale answers and the one that names the new generation
    assert [e["api_calls"] for e in result["timeline"][:4]] == [{"read": 4, "write": 1}] * 4
    assert clock.slept[:4] == [1, 1, 1, 27]   # the step's 30 s interval counts from its write


def test_wait_for_mesh_gives_up_on_a_mesh_that_stays_a_generation_behind():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=5, poll_interval=1)
    LaggingMesh(store, lag=1000)
    result = rollout.run()
    assert clock.slept == [1] * 5   # polls for mesh_timeout, then the rollback
    assert result["result"] == "rolled_back" and "did not report generation 2 within 5s" in result["reason"]
    assert gate.windows == 0 and current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}


def test_unknown_canary_subset_is_refused_before_any_write():
    store = FakeIstio(objects())
    change = WeightChange(store, "shop", "payment", route_name="primary")
    rollout = ro.Rollout(change, Gate(store), "v1", "v3", ro.plan_steps([5]))
    with pytest.raises(ro.TrafficError, match="subset v3 is not defined"):
        rollout.run()
    assert store.calls["write"] == 0


def test_same_stable_and_canary_is_refused():
    with pytest.raises(ro.RolloutError, match="same subset"):
        ro.Rollout(None, None, "v1", "v1", ro.plan_steps([5]))


def test_an_api_error_mid_rollout_rolls_back_and_says_so():
    store, gate, _clock, rollout = make()

    def crash(token):
        if gate.windows == 2:
            raise RuntimeError("prometheus client crashed")
        return Gate.evaluate(gate, token)

    gate.evaluate = crash
    with pytest.raises(ro.RolloutError,
                       match=r"stopped on an error at step 2 \(weight 10\): prometheus client crashed; rolled back: traffic now v1=100, v2=0") as err:
        rollout.run()
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}
    assert err.value.result["result"] == "rolled_back" and err.value.result["weights_after"] == {"v1": 100, "v2": 0}
    assert [e["action"] for e in err.value.result["timeline"]] == ["advance", "rolled_back"]


def test_forbidden_before_any_write_changes_nothing():
    store, gate, _clock, rollout = make()
    store.forbidden = True
    with pytest.raises(K8sError, match="403") as err:
        rollout.run()
    assert not isinstance(err.value, ro.RolloutError)   # the API's answer as it came, not a rollback's story
    assert store.calls["write"] == 1 and store.patches == []   # the refused write, and no rollback write after it
    assert gate.windows == 0 and current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}


def test_an_error_on_the_first_write_leaves_someone_elses_split_alone():
    store = FakeIstio(objects(stable=70, canary=30))   # weights another tool set; this run has not written yet
    store.refuse.append(K8sError("patching: HTTP 500 etcdserver: request timed out", status=500))
    _s, gate, _clock, rollout = make(store=store)
    with pytest.raises(K8sError, match="HTTP 500"):
        rollout.run()
    assert store.calls["write"] == 1 and store.patches == []
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 70, "v2": 30} and ro.STATE_ANNOTATION not in annotations(store)


def test_a_crash_in_the_first_window_rolls_back_the_first_step():
    store, gate, _clock, rollout = make()

    def crash(token):
        raise RuntimeError("prometheus client crashed")

    gate.evaluate = crash
    with pytest.raises(ro.RolloutError, match=r"^the rollout stopped on an error at step 1 \(weight 5\): prometheus client crashed;"
                                              r" rolled back: traffic now v1=100, v2=0 \(canary v2 gets 0 % of the traffic\)$"):
        rollout.run()
    assert store.calls["write"] == 2 and current_weights(store.route("payment", "shop", 1)) == {"v1": 100, "v2": 0}
    assert state(store)["phase"] == "rolled_back" and ro.LEASE_ANNOTATION not in annotations(store)


def test_a_failed_rollback_after_an_error_says_to_check_by_hand():
    store, gate, _clock, rollout = make()

    def crash_and_lose_the_api(token):
        store.forbidden = True
        raise RuntimeError("prometheus client crashed")

    gate.evaluate = crash_and_lose_the_api
    with pytest.raises(ro.RolloutError, match=r"^canary v2 still gets 5 % of the traffic \(weights in force: v1=95, v2=5\): the rollout stopped on an"
                                              r" error at step 1 \(weight 5\): prometheus client crashed; the rollback that should have followed"
                                              r" was not written: patching virtualservices shop/payment: HTTP 403 .*Fix the cause and rerun"):
        rollout.run()
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 95, "v2": 5}


class Killed(BaseException):
    """Like SIGTERM or Ctrl-C: no rollback, the record and the lease stay on the VirtualService."""


def killed_in_window(gate, window):
    evaluate = gate.evaluate

    def evaluate_or_die(token):
        if gate.windows == window:
            raise Killed()
        return evaluate(token)

    gate.evaluate = evaluate_or_die


def lease_written(store, patch=0):
    """The lease the given write set (its annotation operations)."""
    for op in store.patches[patch]:
        if op["op"] == "test":
            continue
        if op["path"] == "/metadata/annotations":
            return json.loads(op["value"][ro.LEASE_ANNOTATION])
        if op["path"].endswith(ro.LEASE_ANNOTATION.replace("/", "~1")):
            return json.loads(op["value"])
    raise AssertionError("write %d set no lease: %s" % (patch, store.patches[patch]))


def test_the_lease_covers_the_interval_the_tolerated_failures_and_two_minutes():
    store, _gate, clock, rollout = make(failure_limit=2, interval="30s")
    start = clock.t
    rollout.run()
    assert lease_written(store) == {"holder": rollout.holder, "expires": start + 30 * (1 + 2) + 120}
    store, _gate, clock, rollout = make(failure_limit=0, interval="45s", wait_for_mesh=True, mesh_timeout=20)
    rollout.run()
    assert lease_written(store)["expires"] == start + 45 + 20 + 120   # and the time the mesh may take
    store, _gate, clock, rollout = make(failure_limit=2, lease_seconds=600)
    rollout.run()
    assert lease_written(store)["expires"] == start + 600


def test_a_lease_stops_other_runs_until_it_expires_not_after():
    store, gate, clock, first = make(failure_limit=1, interval="30s")
    killed_in_window(gate, 1)
    start = clock.t
    with pytest.raises(Killed):
        first.run()
    expires = json.loads(annotations(store)[ro.LEASE_ANNOTATION])["expires"]
    assert expires == start + 30 * 2 + 120
    # what kubectl shows: JSON with its keys in order, as every run writes it
    assert annotations(store)[ro.LEASE_ANNOTATION] == '{"expires": %r, "holder": "%s"}' % (expires, first.holder)
    assert annotations(store)[ro.STATE_ANNOTATION] == ('{"canary": "v2", "failures": 0, "holder": "%s", "phase": "progressing", "plan": [5, 10, 25, 50],'
                                                       ' "stable": "v1", "step": 0, "updated": "2023-11-14T22:13:20.000Z"}' % first.holder)
    clock.t = expires - 0.5
    _s, _g, _c, early = make(store=store, clock=clock)
    with pytest.raises(ro.LeaseHeld, match="until .*, 0 s from now"):
        early.run()
    clock.t = expires
    _s, gate, _c, later = make(store=store, clock=clock)
    assert later.run()["result"] == "promoted" and gate.seen == [5, 10, 25, 50]


def test_two_runs_that_read_at_the_same_moment_cannot_both_take_the_lease():
    # The route already has the first step's weights, so the two runs' first writes differ only in the
    # rollout's record: the resourceVersion test is what makes the server refuse the later write.
    store = FakeIstio(objects(stable=95, canary=5))
    _s, _g, clock, first = make(store=store)
    _s, second_gate, _c, second = make(store=store, clock=clock)
    killed_in_window(second_gate, 1)   # the second run stops inside its first window, holding the lease
    patch = store.json_patch

    def second_writes_between_the_first_ones_read_and_write(plural, namespace, name, operations):
        store.json_patch = patch
        with pytest.raises(Killed):
            second.run()
        return patch(plural, namespace, name, operations)

    store.json_patch = second_writes_between_the_first_ones_read_and_write
    with pytest.raises(ro.LeaseHeld, match=r"held by another rollout \(%s\)" % second.holder):
        first.run()
    assert json.loads(annotations(store)[ro.LEASE_ANNOTATION])["holder"] == second.holder
    assert state(store)["holder"] == second.holder and len(store.patches) == 2


class Probe:
    """Probe verdicts in order (then inconclusive); records when it was asked."""

    def __init__(self, clock, verdicts):
        self.clock = clock
        self.verdicts = list(verdicts)
        self.asked = []

    def evaluate(self, token):
        self.asked.append(self.clock.t)
        verdict = self.verdicts.pop(0) if self.verdicts else "inconclusive"
        return {"verdict": verdict, "reason": "probe %s" % verdict, "checks": [{"name": "success-rate", "verdict": verdict, "value": 70.0}]}


def test_a_probe_breach_rolls_back_before_the_step_ends():
    clock = Clock()
    probe = Probe(clock, ["inconclusive", "pass", "fail"])
    store, gate, clock, rollout = make(clock=clock, probe=probe, probe_every=5)
    start = clock.t
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["timeline"][0]["failed_early"]
    assert [t - start for t in probe.asked] == [5, 10, 15]   # three probes in the first 30 s step, the third failed
    assert gate.seen == [] and current_weights(store.route("payment", "shop", 1))["v2"] == 0
    assert "probe fail" in result["reason"]


def test_probes_that_never_fail_leave_the_decision_to_the_full_analysis():
    clock = Clock()
    probe = Probe(clock, ["pass", "inconclusive", "pass"] * 10)
    _store, gate, clock, rollout = make(clock=clock, probe=probe, probe_every=10)
    start = clock.t
    assert rollout.run()["result"] == "promoted" and gate.seen == [5, 10, 25, 50]
    assert clock.t - start == pytest.approx(120.0)   # probing does not stretch the schedule
    # every 10 s inside each 30 s step, none at the step's end: the full analysis is there
    assert [t - start for t in probe.asked] == [10, 20, 40, 50, 70, 80, 100, 110]


def test_probe_params_keep_only_prometheus_checks_and_never_pass_on_missing_data():
    params = {"checks": [{"name": "sr", "type": "success_rate", "min": 99, "on_no_data": "pass"}, {"name": "hook", "type": "http", "url": "x"}],
              "on_no_data": "pass", "on_low_traffic": "fail", "retry_inconclusive_for": 60}
    probe = ro.probe_checks(params)
    assert probe["checks"] == [{"name": "sr", "type": "success_rate", "min": 99}]
    assert probe["on_no_data"] == probe["on_low_traffic"] == "inconclusive" and probe["retry_inconclusive_for"] == 0
    assert probe["on_still_inconclusive"] == "inconclusive"


@pytest.mark.parametrize("text, seconds", [(30, 30.0), ("45", 45.0), ("30s", 30.0), ("2m", 120.0), ("1m30s", 90.0), ("500ms", 0.5),
                                           ("2h", 7200.0), ("1d", 86400.0), ("1w", 604800.0), ("1y", 31536000.0), (2.5, 2.5)])
def test_intervals_take_the_same_durations_as_analysis_window(text, seconds):
    assert ro.parse_duration(text, "interval") == seconds


@pytest.mark.parametrize("value, message", [(True, "interval: expected a duration such as 30s, 2m or 1h, got True"),
                                            (-5, "interval: a duration cannot be negative, got -5"), (-0.5, "cannot be negative, got -0.5"),
                                            ("5 minutes", "got '5 minutes'")])
def test_bad_durations_are_refused(value, message):
    with pytest.raises(ro.RolloutError, match=message):
        ro.parse_duration(value, "interval")
    assert ro.parse_duration(0, "interval") == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(on_failure="pause"), "on_failure: rollback or hold, got 'pause'"),
    (dict(failure_limit=-1), "failure_limit: .* got -1"),
    (dict(failure_limit=True), "failure_limit: .* got True"),
    (dict(failure_limit="2"), "failure_limit: .* got '2'"),
])
def test_bad_rollout_options_are_refused(kwargs, message):
    with pytest.raises(ro.RolloutError, match=message):
        make(**kwargs)


def test_a_run_without_a_holder_gets_a_unique_name():
    _s, _g, _c, one = make()
    _s, _g, _c, two = make()
    assert one.holder.startswith("onprem.mesh-") and len(one.holder) == len("onprem.mesh-") + 12 and one.holder != two.holder


def test_a_run_with_the_same_holder_takes_its_own_lease_back():
    store, gate, clock, first = make(holder="ci-pipeline-42")
    killed_in_window(gate, 2)
    with pytest.raises(Killed):
        first.run()
    _s, gate, _c, again = make(store=store, clock=clock, holder="ci-pipeline-42")
    result = again.run()
    assert result["result"] == "promoted" and gate.seen == [10, 25, 50] and "resuming progressing at step 2" in result["note"]


def test_a_run_that_another_forced_run_took_over_stops_without_rolling_back():
    store, gate, clock, first = make()
    _s, forced_gate, _c, forced = make(store=store, clock=clock, force=True, steps=(20, 40), restart=True)
    killed_in_window(forced_gate, 1)

    def forced_run_takes_over(token):
        with pytest.raises(Killed):
            forced.run()   # it now holds the lease, at 20 %
        return Gate.evaluate(gate, token)

    gate.evaluate = forced_run_takes_over
    with pytest.raises(ro.LeaseHeld, match=r"held by another rollout \(%s\)" % forced.holder):
        first.run()
    assert current_weights(store.route("payment", "shop", 1)) == {"v1": 80, "v2": 20}   # the forced run's step, no rollback over it
    assert state(store)["holder"] == forced.holder and state(store)["phase"] == "progressing"


def test_an_annotation_that_is_not_json_is_named_with_the_command_that_removes_it():
    store = FakeIstio(objects())
    store.objects[("virtualservices", "shop", "payment")]["metadata"]["annotations"] = {ro.STATE_ANNOTATION: "{not json"}
    _s, _g, _c, rollout = make(store=store)
    with pytest.raises(ro.RolloutError, match="annotation mesh.onprem.io/canary-rollout on VirtualService payment is not valid JSON;"
                                              " remove it .kubectl annotate virtualservice payment mesh.onprem.io/canary-rollout-. and rerun"):
        rollout.run()
    assert store.calls["write"] == 0


def test_an_annotation_that_is_json_but_not_an_object_is_no_record():
    store = FakeIstio(objects())
    store.objects[("virtualservices", "shop", "payment")]["metadata"]["annotations"] = {ro.STATE_ANNOTATION: "[1, 2]", ro.LEASE_ANNOTATION: "7"}
    _s, gate, _c, rollout = make(store=store)
    assert rollout.run()["result"] == "promoted" and gate.seen == [5, 10, 25, 50]


def record(store, **state_fields):
    obj = store.objects[("virtualservices", "shop", "payment")]
    fields = dict(canary="v2", stable="v1", plan=[5, 10, 25, 50], step=1, phase="progressing", failures=0)
    fields.update(state_fields)
    obj["metadata"]["annotations"] = {ro.STATE_ANNOTATION: json.dumps(fields)}


def test_a_recorded_step_outside_the_plan_is_refused():
    store = FakeIstio(objects())
    record(store, step=4)
    with pytest.raises(ro.RolloutError, match="the recorded step 4 is outside the plan; set restart: true"):
        make(store=store)[3].run()
    record(store, step=-1)
    with pytest.raises(ro.RolloutError, match="the recorded step -1 is outside the plan"):
        make(store=store)[3].run()
    record(store, step=3)
    assert make(store=store)[3].run()["note"] == "resuming progressing at step 4 (weight 50), as recorded"


def test_an_unfinished_rollout_of_other_subsets_is_not_resumed():
    store = FakeIstio(objects())
    record(store, canary="v1", stable="v2", phase="held")
    with pytest.raises(ro.RolloutError, match=r"records an unfinished rollout \(canary v1, stable v2, steps \[5, 10, 25, 50\], held at step 2\)"):
        make(store=store)[3].run()
    record(store, canary="v1", stable="v2", phase="rolled_back")
    assert make(store=store)[3].run()["note"] == "starting"   # a finished one is no obstacle


def test_resumed_runs_keep_counting_the_recorded_failures():
    store = FakeIstio(objects())
    record(store, step=1, phase="held", failures=1)
    _s, gate, _c, rerun = make(store=store, verdicts=["fail"], failure_limit=1, on_failure="hold")
    result = rerun.run()
    assert result["result"] == "held" and result["failures"] == 2 and gate.seen == [10]


def test_a_promoted_record_whose_weights_were_moved_back_starts_over():
    store, _gate, _clock, rollout = make()
    rollout.run()
    WeightChange(store, "shop", "payment", route_name="primary").apply({"v1": 100, "v2": 0})   # someone undid it
    _s, gate, _c, rerun = make(store=store)
    result = rerun.run()
    assert result["note"] == "starting" and result["result"] == "promoted" and gate.seen == [5, 10, 25, 50]


def test_restart_starts_a_promoted_rollout_over():
    store, _gate, _clock, rollout = make()
    rollout.run()
    _s, gate, _c, rerun = make(store=store, restart=True)
    result = rerun.run()
    assert result["note"] == "starting" and result["changed"] is True and gate.seen == [5, 10, 25, 50]


def test_the_run_logs_where_it_starts_and_each_tolerated_failure():
    logged = []
    _store, _gate, _clock, rollout = make(verdicts=["fail"], failure_limit=1, log=logged.append)
    rollout.run()
    assert logged[0] == "starting"
    assert logged[1].startswith("failed analysis 1 of 1 tolerated: step 1 (weight 5): success-rate fail (value 80.0, threshold >= 99)")


def test_a_verdict_without_checks_is_named_in_the_reason():
    store, gate, _clock, rollout = make()
    gate.evaluate = lambda token: {"verdict": "inconclusive"}
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["reason"] == "step 1 (weight 5): verdict inconclusive"


def test_only_the_checks_that_did_not_pass_make_the_reason():
    store, gate, _clock, rollout = make()
    checks = [{"name": "p99", "verdict": "pass", "value": 10, "threshold": "<= 500 ms"},
              {"name": "errors", "verdict": "fail", "value": 97.5, "threshold": ">= 99 %"}]
    gate.evaluate = lambda token: {"verdict": "fail", "checks": checks}
    assert rollout.run()["reason"] == "step 1 (weight 5): errors fail (value 97.5, threshold >= 99 %)"


def test_a_rollback_reports_every_destination_of_the_route_as_written():
    store = FakeIstio(objects())
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"].append(
        {"destination": {"host": "payment", "subset": "v3"}, "weight": 0})
    _s, _g, _c, rollout = make(store=store, verdicts=["fail"])
    assert rollout.run()["weights_after"] == {"v1": 100, "v2": 0, "v3": 0}


def test_the_lease_expiry_is_kept_to_the_millisecond():
    clock = Clock()
    clock.t += 0.123456
    store, _gate, clock, rollout = make(clock=clock)
    rollout.run()
    assert lease_written(store)["expires"] == round(1_700_000_000.123456 + 30 + 120, 3)


def test_an_observed_generation_that_is_not_a_number_is_not_yet():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=30, poll_interval=1)
    mesh = LaggingMesh(store, lag=1)
    read = mesh.read

    def garbled_until_observed(plural, namespace, name):
        obj = read(plural, namespace, name)
        if obj["status"]["observedGeneration"] != obj["metadata"]["generation"]:
            obj["status"]["observedGeneration"] = "pending"
        return obj

    store.get = garbled_until_observed
    result = rollout.run()
    assert result["result"] == "promoted" and [e["api_calls"]["read"] for e in result["timeline"][:4]] == [3] * 4


def test_a_mesh_that_takes_the_whole_interval_starts_the_analysis_at_once():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=30, poll_interval=1, interval="3s")
    LaggingMesh(store, lag=2)
    assert rollout.run()["result"] == "promoted" and gate.seen == [5, 10, 25, 50]
    assert clock.slept == [1] * 12   # the three polls of each step, no sleep after them


def test_a_mesh_timeout_rolls_back_at_once_whatever_the_failure_limit():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=2, poll_interval=1, failure_limit=3)
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["failures"] == 1 and state(store)["failures"] == 1


def test_a_probe_without_an_interval_is_not_asked():
    clock = Clock()
    probe = Probe(clock, ["fail"])
    _store, gate, clock, rollout = make(clock=clock, probe=probe)   # probe_every: 0 by default
    assert rollout.run()["result"] == "promoted" and probe.asked == []


def test_a_hold_keeps_destinations_the_destination_rule_does_not_know():
    store = FakeIstio(objects())
    store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]["route"].append(
        {"destination": {"host": "payment", "subset": "legacy"}, "weight": 0})
    _s, _g, _c, rollout = make(store=store, verdicts=["pass", "fail"], on_failure="hold")
    result = rollout.run()
    assert result["result"] == "held" and result["weights_after"] == {"v1": 90, "v2": 10, "legacy": 0}


def test_by_default_the_mesh_is_polled_twice_a_second_for_a_minute():
    store, gate, clock, rollout = make(wait_for_mesh=True)
    result = rollout.run()
    assert result["result"] == "rolled_back" and clock.slept == [0.5] * 120 and "within 60.0s" in result["reason"]


def test_a_steps_duration_is_kept_to_the_millisecond():
    store, gate, clock, rollout = make(steps=(5,), interval="0s", wait_for_mesh=True, mesh_timeout=30, poll_interval=0.0003)
    LaggingMesh(store, lag=2)
    result = rollout.run()
    assert result["timeline"][0]["seconds"] == 0.001   # three polls of 0.3 ms before an analysis of no length


def test_a_hold_after_someone_removed_the_canary_from_the_route_reports_it_at_zero():
    store, gate, _clock, rollout = make(on_failure="hold")

    def someone_edits_the_route(token):
        route = store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][1]
        route["route"] = [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100}]
        return {"verdict": "fail", "checks": []}

    gate.evaluate = someone_edits_the_route
    result = rollout.run()
    assert result["result"] == "held" and result["weights_after"] == {"v1": 100}
    assert result["timeline"][-1]["weight"] == 0 and result["timeline"][-1]["step"] == 1


def test_a_record_without_step_or_failures_counts_from_zero():
    store = FakeIstio(objects())
    record(store, phase="held")
    state_fields = json.loads(annotations(store)[ro.STATE_ANNOTATION])
    del state_fields["step"], state_fields["failures"]
    annotations(store)[ro.STATE_ANNOTATION] = json.dumps(state_fields)
    _s, gate, _c, rerun = make(store=store, verdicts=["fail"], failure_limit=1, on_failure="hold")
    result = rerun.run()
    assert result["note"] == "resuming held at step 1 (weight 5), as recorded"
    assert result["result"] == "promoted" and result["failures"] == 1 and gate.seen == [5, 5, 10, 25, 50]
    annotations(store)[ro.STATE_ANNOTATION] = json.dumps(state_fields)
    with pytest.raises(ro.RolloutError, match=r"steps \[5, 10, 25, 50\], held at step 1\)"):
        make(store=store, steps=(20, 40))[3].run()


def test_what_is_left_of_an_interval_after_the_mesh_is_waited_for_to_the_end():
    store, gate, clock, rollout = make(wait_for_mesh=True, mesh_timeout=30, poll_interval=0.5, interval="3s")
    LaggingMesh(store, lag=4)
    assert rollout.run()["result"] == "promoted"
    assert clock.slept == [0.5] * 24   # each step: five polls (2.5 s), then the half second left of its 3 s
