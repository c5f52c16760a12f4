# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Other writers of the VirtualService (issue 11): what a conflict is, the retry with a fresh read, and the rollout
stopping only when its own fields changed. The fake answers as kube-apiserver 1.35 does (fake_istio.py); the same
cases run against the real server in tests/integration/test_canary_modules.py."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy
import dataclasses
import json

import pytest
from urllib3.exceptions import ProtocolError

from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro
from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import K8sError
from ansible_collections.onprem.mesh.plugins.module_utils.traffic import TrafficError, WeightChange, current_weights
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import TEST_OP_REFUSED, FakeIstio, server_answer, refused_patch
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_rollout import (
    HEADER_ROUTE, MAIN_ROUTE, Gate, Killed, annotations, killed_in_window, make, objects, state)

VS = ("virtualservices", "shop", "payment")


def no_sleep(seconds):
    pass


def vs_of(store):
    return store.objects[VS]


def target(store):
    return current_weights(store.route("payment", "shop", 1))


# -- what a conflict is --------------------------------------------------------------------------------------------

def test_a_failed_test_op_is_a_conflict_only_on_a_guarded_patch():
    guarded = refused_patch("patching virtualservices shop/payment", verb="patch", resource="virtualservices", guarded=True)
    assert guarded.status == 422 and guarded.body["message"] == TEST_OP_REFUSED and guarded.body["details"] == {}
    assert guarded.is_conflict
    # the same generic 422 on a request that carried no test op is no conflict (nothing was guarded)
    assert not refused_patch("patching", guarded=False).is_conflict


def test_409_is_a_conflict_and_403_404_are_not():
    conflict = server_answer(409, "Conflict", {"message": "the object has been modified", "reason": "Conflict", "details": {}}, "patching")
    assert conflict.is_conflict
    assert not server_answer(403, "Forbidden", {"message": "forbidden", "reason": "Forbidden"}, "patching", guarded=True).is_conflict
    assert not server_answer(404, "Not Found", {"message": "not found", "reason": "NotFound"}, "patching", guarded=True).is_conflict
    assert not K8sError("no answer", guarded=True).is_conflict


def test_a_schema_error_with_causes_is_no_conflict_even_on_a_guarded_patch():
    store = FakeIstio(objects())
    ops = [{"op": "test", "path": "/spec/http/1/route", "value": MAIN_ROUTE["route"]},
           {"op": "replace", "path": "/spec/http/1/route/0/weight", "value": "ninety"}]
    with pytest.raises(K8sError) as err:
        store.json_patch(*VS, ops)
    assert err.value.status == 422 and err.value.guarded and not err.value.is_conflict
    assert err.value.body["details"]["causes"][0]["field"] == "spec.http[1].route[0].weight"
    # and a failed test op on the same object is one
    ops[0]["value"] = [dict(d, weight=1) for d in MAIN_ROUTE["route"]]
    with pytest.raises(K8sError) as err:
        store.json_patch(*VS, ops)
    assert err.value.status == 422 and err.value.is_conflict and TEST_OP_REFUSED in str(err.value)


def test_a_test_against_null_holds_an_annotation_to_its_absence_as_the_real_server_does():
    store = FakeIstio(objects())
    store.json_patch(*VS, [{"op": "test", "path": "/metadata/annotations", "value": None},
                           {"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}}])
    store.json_patch(*VS, [{"op": "test", "path": "/metadata/annotations/b", "value": None},
                           {"op": "add", "path": "/metadata/annotations/b", "value": "2"}])
    for path in ("/metadata/annotations", "/metadata/annotations/b"):
        with pytest.raises(K8sError) as err:
            store.json_patch(*VS, [{"op": "test", "path": path, "value": None}, {"op": "add", "path": "/metadata/annotations/c", "value": "3"}])
        assert err.value.is_conflict
    assert vs_of(store)["metadata"]["annotations"] == {"a": "1", "b": "2"}


# -- traffic_split: read again, rebuild, retry ----------------------------------------------------------------------

def test_traffic_split_rebuilds_its_patch_after_a_failed_test_op_and_keeps_the_other_writers_change():
    store = FakeIstio(objects())

    def other_writer(obj):
        obj["spec"]["http"][1]["route"][0]["weight"] = 60
        obj["spec"]["http"][1]["route"][1]["weight"] = 40
        obj["spec"]["http"][0]["timeout"] = "7s"

    store.interfere.append(other_writer)
    result = WeightChange(store, "shop", "payment", route_name="primary", sleep=no_sleep).apply({"v1": 90, "v2": 10})
    assert result["attempts"] == 2 and result["before"] == {"v1": 60, "v2": 40} and target(store) == {"v1": 90, "v2": 10}
    assert store.route("payment", "shop", 0)["timeout"] == "7s"
    assert store.calls == {"read": 3, "write": 2}   # the read, the rules, the read after the conflict


def test_a_conflict_answered_409_is_retried_the_same_way():
    store = FakeIstio(objects())
    patch = store.json_patch
    calls = []

    def first_meets_a_newer_object(plural, namespace, name, operations):
        calls.append(operations)
        if len(calls) == 1:
            store.rv += 1
            vs_of(store)["metadata"]["resourceVersion"] = str(store.rv)
            raise server_answer(409, "Conflict", {"message": "the object has been modified", "reason": "Conflict"}, "patching")
        return patch(plural, namespace, name, operations)

    store.json_patch = first_meets_a_newer_object
    result = WeightChange(store, "shop", "payment", route_name="primary", sleep=no_sleep).apply({"v1": 80, "v2": 20})
    assert result["attempts"] == 2 and target(store) == {"v1": 80, "v2": 20}


def test_a_schema_error_is_raised_at_once_not_retried():
    store = FakeIstio(objects())
    bad = [{"op": "add", "path": "/spec/http/0/route/0/weight", "value": "ninety"}]
    with pytest.raises(K8sError, match=r"HTTP 422 .*spec.http\[0\].route\[0\].weight"):
        WeightChange(store, "shop", "payment", route_name="primary", sleep=pytest.fail).apply({"v1": 90, "v2": 10}, extra_ops=lambda vs: bad)
    assert store.calls["write"] == 1 and target(store) == {"v1": 100, "v2": 0}


def test_a_guarded_patch_refused_although_nothing_changed_is_no_conflict():
    """A 422 without causes whose object is unchanged when read again: the patch itself cannot apply. Raised after
    one more read, not retried until conflict_retries runs out and then blamed on another writer."""
    store = FakeIstio(objects())
    broken = [{"op": "remove", "path": "/metadata/annotations/not-there"}]
    with pytest.raises(K8sError, match="HTTP 422 " + TEST_OP_REFUSED) as err:
        WeightChange(store, "shop", "payment", route_name="primary", sleep=no_sleep).apply({"v1": 90, "v2": 10}, extra_ops=lambda vs: broken)
    assert err.value.is_conflict and store.calls["write"] == 1 and target(store) == {"v1": 100, "v2": 0}


def test_conflicts_are_bounded_by_conflict_retries():
    store = FakeIstio(objects())
    counter = {"n": 0}

    def other_writer(obj):
        counter["n"] += 1
        obj["spec"]["http"][1]["route"][1]["weight"] = counter["n"]
        obj["spec"]["http"][1]["route"][0]["weight"] = 100 - counter["n"]

    store.interfere.extend([other_writer] * 3)
    with pytest.raises(TrafficError, match="kept changing under us: 3 attempts met a conflict .*HTTP 422.*raise conflict_retries"):
        WeightChange(store, "shop", "payment", route_name="primary", retries=2, sleep=no_sleep).apply({"v1": 50, "v2": 50})
    assert target(store) == {"v1": 97, "v2": 3}


# -- messages that name the right thing -----------------------------------------------------------------------------

def test_a_missing_namespace_is_named_not_the_virtualservice():
    store = FakeIstio(objects())
    with pytest.raises(TrafficError, match=r"^namespace: namespace nope does not exist \(reading VirtualService nope/payment answered HTTP 404\)"):
        WeightChange(store, "nope", "payment").apply({"v1": 90, "v2": 10})
    with pytest.raises(K8sError, match='reading VirtualService shop/other: HTTP 404 virtualservices.networking.istio.io "other" not found') as err:
        WeightChange(store, "shop", "other").apply({"v1": 90, "v2": 10})
    assert "does not exist" not in str(err.value)


def test_a_404_where_the_namespace_cannot_be_read_says_that_it_is_not_known():
    store = FakeIstio(objects())
    store.namespace_exists = lambda namespace: None
    with pytest.raises(K8sError, match="not found.*may not read namespaces, so it is not known whether namespace nope exists"):
        WeightChange(store, "nope", "payment").apply({"v1": 90, "v2": 10})


def test_a_read_refused_for_another_reason_than_404_comes_as_it_was_without_asking_about_the_namespace():
    store = FakeIstio(objects())
    asked = []
    store.namespace_exists = asked.append   # answers None ("may not read namespaces"), if it were asked

    def forbidden(plural, namespace, name):
        raise server_answer(403, "Forbidden", {"message": 'virtualservices.networking.istio.io "payment" is forbidden', "reason": "Forbidden"},
                            "reading VirtualService %s/%s" % (namespace, name), verb="get", resource=plural, namespace=namespace)

    store.get = forbidden
    with pytest.raises(K8sError) as err:
        WeightChange(store, "shop", "payment").apply({"v1": 90, "v2": 10})
    assert err.value.status == 403 and "namespaces" not in str(err.value) and asked == []


def test_a_404_from_a_store_that_cannot_look_up_namespaces_comes_as_it_was():
    store = FakeIstio(objects())

    class Reader:   # an IstioObjects-like store without namespace_exists
        def get(self, plural, namespace, name):
            return store.get(plural, namespace, name)

    with pytest.raises(K8sError, match='^reading VirtualService shop/other: HTTP 404 virtualservices.networking.istio.io "other" not found'):
        WeightChange(Reader(), "shop", "other").read()


def test_an_unknown_canary_is_reported_under_canary_not_weights():
    store = FakeIstio(objects())
    change = WeightChange(store, "shop", "payment", route_name="primary")
    with pytest.raises(TrafficError) as err:
        ro.Rollout(change, Gate(store), "v1", "v9", ro.plan_steps([5])).run()
    message = str(err.value)
    assert message.startswith("canary: subset v9 is not defined in the DestinationRule for host payment (defined: v1, v2)"), message
    assert "weights" not in message.split(";", maxsplit=1)[0] and "this run wrote nothing: traffic stays v1=100, v2=0" in message
    assert message.count("this run wrote nothing") == 1   # said once, although run() passes the refusal on as well
    assert err.value.result["result"] == "not_started" and store.calls["write"] == 0
    with pytest.raises(TrafficError, match=r"^stable: subset v0 is not defined.*; canary: subset v9 is not defined"):
        ro.Rollout(change, Gate(store), "v0", "v9", ro.plan_steps([5])).run()


def test_a_forbidden_write_names_the_verb_and_the_resource():
    store = FakeIstio(objects())
    store.forbidden = True
    with pytest.raises(K8sError) as err:
        WeightChange(store, "shop", "payment", route_name="primary").apply({"v1": 90, "v2": 10})
    assert err.value.status == 403 and not err.value.is_conflict
    assert ('User "system:serviceaccount:shop:canary" cannot patch resource "virtualservices" in API group "networking.istio.io"'
            in str(err.value))
    assert "lacks RBAC permission to patch virtualservices.networking.istio.io in namespace shop" in str(err.value)


# -- canary_rollout: other clients' changes are kept, changes to its own fields stop it ------------------------------

def test_a_change_to_another_route_between_read_and_step_write_is_kept_and_the_rollout_promotes():
    store, _gate, _clock, rollout = make()

    def someone_else(obj):   # another route's timeout; the VirtualService had no annotations, now it has one
        obj["spec"]["http"][0]["timeout"] = "9s"
        obj["metadata"]["annotations"] = {"example.com/owner": "team-b"}

    store.interfere.append(someone_else)
    result = rollout.run()
    assert result["result"] == "promoted" and target(store) == {"v1": 0, "v2": 100}
    # the first write tested the absence of annotations and met theirs: read again, rebuilt, sent once more
    assert result["timeline"][0]["conflicts"] == 1 and result["timeline"][0]["api_calls"] == {"read": 2, "write": 2}
    assert all("conflicts" not in e for e in result["timeline"][1:])
    assert store.route("payment", "shop", 0) == dict(HEADER_ROUTE, timeout="9s")
    assert annotations(store)["example.com/owner"] == "team-b" and state(store)["phase"] == "promoted"


def test_other_annotations_and_other_routes_never_conflict():
    """Once the VirtualService has annotations, the rollout tests only its own two: a writer of other annotations
    and of another route before every write costs no retry at all."""
    objs = objects()
    objs[0]["metadata"]["annotations"] = {"example.com/writer": "0"}
    store, _gate, _clock, rollout = make(store=FakeIstio(objs))
    counter = {"n": 0}

    def busy_writer(obj):
        counter["n"] += 1
        obj["spec"]["http"][0]["timeout"] = "%ds" % counter["n"]
        obj["metadata"]["annotations"]["example.com/writer"] = str(counter["n"])

    store.interfere.extend([busy_writer] * 5)   # before every write: four steps and the promotion
    result = rollout.run()
    assert result["result"] == "promoted" and all("conflicts" not in e for e in result["timeline"])
    assert store.calls["write"] == 5
    assert annotations(store)["example.com/writer"] == "5" and store.route("payment", "shop", 0)["timeout"] == "5s"


def test_a_change_inside_the_target_route_that_leaves_its_weights_is_kept():
    store, _gate, _clock, rollout = make()

    def adds_a_header(obj):
        obj["spec"]["http"][1]["route"][1]["headers"] = {"request": {"set": {"x-canary": "1"}}}

    store.interfere.extend([lambda obj: None, adds_a_header])   # the second write (step 2) meets it
    result = rollout.run()
    assert result["result"] == "promoted" and result["timeline"][1].get("conflicts") == 1
    assert store.route("payment", "shop", 1)["route"][1] == {"destination": {"host": "payment", "subset": "v2"}, "weight": 100,
                                                             "headers": {"request": {"set": {"x-canary": "1"}}}}


def sets_weights(stable, canary):
    def operator(obj):
        obj["spec"]["http"][1]["route"][0]["weight"] = stable
        obj["spec"]["http"][1]["route"][1]["weight"] = canary
    return operator


TARGET_FIELD = "the weights of the target route http[1] (name: primary) (spec.http[1].route[].weight)"


def test_another_writer_of_the_target_weights_between_read_and_write_stops_the_rollout_which_rolls_back():
    store, gate, _clock, rollout = make()
    store.interfere.extend([lambda obj: None, sets_weights(50, 50)])
    result = rollout.run()
    assert result["result"] == "rolled_back" and target(store) == {"v1": 100, "v2": 0} and gate.seen == [5]
    assert result["reason"] == ("another client changed VirtualService shop/payment while the rollout ran: %s: found v1=50, v2=50,"
                                " the rollout had written v1=95, v2=5" % TARGET_FIELD)
    step2 = result["timeline"][1]
    assert step2["step"] == 2 and step2["action"] == "rollback" and "verdict" not in step2
    assert step2["concurrent_change"] == [{"field": TARGET_FIELD, "found": "v1=50, v2=50", "expected": "v1=95, v2=5"}]
    assert [e["action"] for e in result["timeline"]] == ["advance", "rollback", "rolled_back"]
    assert state(store)["phase"] == "rolled_back" and state(store)["reason"] == result["reason"]
    assert ro.LEASE_ANNOTATION not in annotations(store)
    # step 1, step 2 refused (its test op met the operator's weights), the rollback; nothing mixed
    assert store.calls["write"] == 3 and ro.outcome_message(result, "v2").endswith("; traffic now v1=100, v2=0")


def test_with_hold_the_other_writers_weights_stay():
    store, _gate, _clock, rollout = make(on_failure="hold")
    store.interfere.extend([lambda obj: None, sets_weights(50, 50)])
    result = rollout.run()
    assert result["result"] == "held" and result["weights_after"] == {"v1": 50, "v2": 50} and target(store) == {"v1": 50, "v2": 50}
    assert "found v1=50, v2=50, the rollout had written v1=95, v2=5" in result["reason"]
    assert state(store)["phase"] == "held" and state(store)["step"] == 1


def test_target_weights_changed_during_the_analysis_window_stop_the_next_write():
    store, gate, _clock, rollout = make()
    evaluate = gate.evaluate

    def operator_during_window(token):
        verdict = evaluate(token)
        if gate.windows == 2:
            sets_weights(80, 20)(vs_of(store))
        return verdict

    gate.evaluate = operator_during_window
    result = rollout.run()
    assert result["result"] == "rolled_back" and gate.seen == [5, 10]
    assert "found v1=80, v2=20, the rollout had written v1=90, v2=10" in result["reason"]
    # no write of step 3 was sent: step 1, step 2, the rollback
    assert store.calls["write"] == 3 and [e["action"] for e in result["timeline"]] == ["advance", "advance", "rollback", "rolled_back"]


def test_a_failed_analysis_after_someone_changed_the_weights_says_so_too():
    store, gate, _clock, rollout = make()
    evaluate = gate.evaluate
    gate.verdicts = ["pass", "fail"]

    def operator_during_window(token):
        verdict = evaluate(token)
        if gate.windows == 2:
            sets_weights(70, 30)(vs_of(store))
        return verdict

    gate.evaluate = operator_during_window
    result = rollout.run()
    assert result["result"] == "rolled_back" and result["reason"].startswith("step 2 (weight 10): success-rate fail")
    assert "; meanwhile another client had changed %s: found v1=70, v2=30, the rollout had written v1=90, v2=10" % TARGET_FIELD in result["reason"]


def test_the_rollouts_annotation_changed_by_someone_else_stops_it_naming_the_annotation():
    store, gate, _clock, rollout = make()
    evaluate = gate.evaluate

    def someone_removes_the_record(token):
        if gate.windows == 1:
            del vs_of(store)["metadata"]["annotations"][ro.STATE_ANNOTATION]
        return evaluate(token)

    gate.evaluate = someone_removes_the_record
    result = rollout.run()
    assert result["result"] == "rolled_back"
    assert result["reason"].startswith("another client changed VirtualService shop/payment while the rollout ran: the annotation"
                                       " mesh.onprem.io/canary-rollout (metadata.annotations): found no annotation, ")
    assert 'found no annotation, the rollout had written {"canary": "v2"' in result["reason"]


def test_a_takeover_of_the_lease_stops_the_run_without_touching_the_traffic():
    store, gate, clock, rollout = make()
    evaluate = gate.evaluate

    def another_run_forces_its_way_in(token):
        if gate.windows == 1:
            vs_of(store)["metadata"]["annotations"][ro.LEASE_ANNOTATION] = json.dumps({"holder": "awx-job-7", "expires": clock.t + 600})
        return evaluate(token)

    gate.evaluate = another_run_forces_its_way_in
    with pytest.raises(ro.LeaseHeld, match=r"VirtualService shop/payment is now held by another rollout \(awx-job-7\), which took it over .*"
                                           r"traffic in force: v1=95, v2=5 \(canary v2 gets 5 % of the traffic\)") as err:
        rollout.run()
    assert err.value.result["result"] == "stopped" and err.value.result["weights_after"] == {"v1": 95, "v2": 5}
    assert err.value.result["changed"] is True   # this run's first step is on the VirtualService
    assert err.value.result["reason"].startswith("VirtualService shop/payment is now held by another rollout (awx-job-7)")   # and nothing more
    assert [(e["step"], e["action"]) for e in err.value.result["timeline"]] == [(1, "advance"), (2, "stopped")]   # stopped before step 2's write
    assert store.calls["write"] == 1 and target(store) == {"v1": 95, "v2": 5}


def test_a_forced_run_that_another_run_takes_over_in_turn_does_not_roll_back_over_it():
    # force lets a run start over a live lease; once it has written, another holder's lease stops it like any run
    store, gate, clock, rollout = make(force=True, verdicts=["fail"])
    evaluate = gate.evaluate

    def another_run_forces_its_way_in(token):
        vs_of(store)["metadata"]["annotations"][ro.LEASE_ANNOTATION] = json.dumps({"holder": "awx-job-8", "expires": clock.t + 600})
        return evaluate(token)

    gate.evaluate = another_run_forces_its_way_in
    with pytest.raises(ro.LeaseHeld, match=r"now held by another rollout \(awx-job-8\)") as err:
        rollout.run()
    assert err.value.result["result"] == "stopped" and store.calls["write"] == 1 and target(store) == {"v1": 95, "v2": 5}
    assert json.loads(annotations(store)[ro.LEASE_ANNOTATION])["holder"] == "awx-job-8"


def test_conflicts_past_conflict_retries_mid_rollout_are_an_error_that_follows_on_failure():
    store = FakeIstio(objects())
    _s, gate, _clock, rollout = make(store=store)
    rollout.change.retries = 2

    def header_churn(obj):
        obj["spec"]["http"][1]["route"][0]["headers"] = {"request": {"set": {"x-n": str(store.rv)}}}

    store.interfere.extend([lambda obj: None] + [header_churn] * 3)
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    message = str(err.value)
    assert "stopped on an error at step 2 (weight 10): VirtualService shop/payment kept changing under us: 3 attempts met a conflict" in message
    assert message.endswith("rolled back: traffic now v1=100, v2=0 (canary v2 gets 0 % of the traffic)")
    assert err.value.result["result"] == "rolled_back" and target(store) == {"v1": 100, "v2": 0}


def revoke_after_window(gate, store, window):
    """From the analysis of window `window` on, the API refuses every write (HTTP 403), as after a revoked Role."""
    evaluate = gate.evaluate

    def revoking(token):
        if gate.windows == window:
            store.forbidden = True
        return evaluate(token)

    gate.evaluate = revoking


def test_a_permission_revoked_mid_rollout_says_the_canary_keeps_its_share_and_what_is_missing():
    store, gate, _clock, rollout = make()
    revoke_after_window(gate, store, 1)
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    message = str(err.value)
    assert message.startswith("canary v2 still gets 5 % of the traffic (weights in force: v1=95, v2=5): the rollout stopped on an error at"
                              " step 2 (weight 10): patching virtualservices shop/payment: HTTP 403 "), message
    assert "lacks RBAC permission to patch virtualservices.networking.istio.io in namespace shop" in message
    assert "the rollback that should have followed was not written: it was refused the same way (HTTP 403)" in message
    assert "rerun with the same options" in message and "onprem.mesh.traffic_split" in message
    result = err.value.result
    assert result["result"] == "stopped" and result["changed"] is True and result["weights_after"] == {"v1": 95, "v2": 5}
    assert [(e["step"], e["action"]) for e in result["timeline"]] == [(1, "advance"), (2, "stopped")] and target(store) == {"v1": 95, "v2": 5}
    assert state(store)["phase"] == "progressing" and state(store)["step"] == 0   # a rerun resumes there


def test_a_rollback_that_cannot_be_written_after_a_failed_analysis_keeps_the_analysis_as_the_reason():
    store, gate, _clock, rollout = make(verdicts=["pass", "fail"])
    revoke_after_window(gate, store, 2)
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    message = str(err.value)
    assert message.startswith("canary v2 still gets 10 % of the traffic (weights in force: v1=90, v2=10): step 2 (weight 10): success-rate fail"
                              " (value 80.0, threshold >= 99); the rollback that should have followed was not written: patching"), message
    assert err.value.result["result"] == "stopped" and err.value.result["reason"].startswith("step 2 (weight 10)")
    assert store.calls["write"] == 3   # step 1, step 2, the refused rollback; not a second rollback


def test_weights_in_force_when_the_virtualservice_cannot_be_read_either():
    store, gate, _clock, rollout = make()
    evaluate = gate.evaluate

    def unreachable(plural, namespace, name):
        raise K8sError("reading VirtualService %s/%s: the API server could not be reached" % (namespace, name))

    def lose_the_api(token):
        if gate.windows == 1:
            store.get = unreachable
        return evaluate(token)

    gate.evaluate = lose_the_api
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    assert str(err.value).startswith("canary v2 still gets 5 % of the traffic (weights as this run last wrote them (the VirtualService could not"
                                     " be read): v1=95, v2=5)")
    assert err.value.result["weights_after"] == {"v1": 95, "v2": 5}


def test_a_refusal_before_the_first_write_carries_the_result_and_says_traffic_stays():
    store, _gate, clock, first = make()
    first._write(5, "progressing", 0, 0, interval=600)
    _s, _g, _c, second = make(store=store, clock=clock)
    with pytest.raises(ro.LeaseHeld) as err:
        second.run()
    assert str(err.value).endswith("; this run wrote nothing: traffic stays v1=95, v2=5 (canary v2 gets 5 % of it)")
    assert err.value.result["result"] == "not_started" and err.value.result["weights_after"] == {"v1": 95, "v2": 5}
    assert err.value.result["changed"] is False


def test_a_refusal_on_a_route_without_the_canary_says_it_gets_nothing():
    store, gate, clock, first = make()
    killed_in_window(gate, 1)                          # another run, killed in its first step: its lease stands
    with pytest.raises(Killed):
        first.run()
    removes_the_canary(store)                          # then someone set the route back to the stable alone
    _s, _g, _c, second = make(store=store, clock=clock)
    with pytest.raises(ro.LeaseHeld) as err:
        second.run()
    assert str(err.value).endswith("; this run wrote nothing: traffic stays v1=100 (canary v2 gets 0 % of it)")


def test_a_change_of_the_target_weights_before_the_first_write_refuses_without_writing():
    store, _gate, _clock, rollout = make()
    store.interfere.append(sets_weights(60, 40))
    with pytest.raises(ro.ConcurrentChange, match="as this run began: .*found v1=60, v2=40, read v1=100, v2=0 when this run started") as err:
        rollout.run()
    assert err.value.result["result"] == "not_started" and target(store) == {"v1": 60, "v2": 40}
    assert ro.STATE_ANNOTATION not in annotations(store) and store.calls["write"] == 1


def test_the_record_tests_the_rollouts_annotations_not_the_resource_version():
    store, _gate, _clock, rollout = make(steps=(5,))
    rollout.run()
    first, second = store.patches
    assert {"op": "test", "path": "/metadata/annotations", "value": None} in first
    assert not any(op["path"] == "/metadata/resourceVersion" for op in first + second)
    tested = [op["path"] for op in second if op["op"] == "test"]
    assert tested == ["/spec/http/1/route", "/metadata/annotations/mesh.onprem.io~1canary-lease",
                      "/metadata/annotations/mesh.onprem.io~1canary-rollout"]
    assert copy.deepcopy(store.route("payment", "shop", 0)) == HEADER_ROUTE


# -- the promotion's write: conflicts, errors and other writers there ------------------------------------------------

def in_last_window(gate, action):
    """Do ``action()`` while the last step (window 4 of make()'s four steps) is analysed: it meets the promotion's write."""
    evaluate = gate.evaluate

    def evaluate_then(token):
        verdict = evaluate(token)
        if gate.windows == 4:
            action()
        return verdict

    gate.evaluate = evaluate_then


def test_a_conflict_on_the_promotion_write_is_counted_on_the_promotion():
    store, _gate, _clock, rollout = make()

    def adds_a_header(obj):   # inside the target route, its weights left alone: a retry, not a stop
        obj["spec"]["http"][1]["route"][1]["headers"] = {"request": {"set": {"x-canary": "1"}}}

    store.interfere.extend([lambda obj: None] * 4 + [adds_a_header])
    result = rollout.run()
    assert result["result"] == "promoted" and target(store) == {"v1": 0, "v2": 100}
    assert result["timeline"][-1]["action"] == "promoted" and result["timeline"][-1]["conflicts"] == 1
    assert all("conflicts" not in e for e in result["timeline"][:-1])


@pytest.mark.parametrize("on_failure", ["hold", "rollback"])
def test_an_error_on_the_promotion_write_follows_on_failure_recording_the_last_step_of_the_plan(on_failure):
    store, gate, clock, rollout = make(on_failure=on_failure)
    in_last_window(gate, lambda: store.refuse.append(K8sError("patching virtualservices shop/payment: HTTP 500 etcdserver: request timed out",
                                                              status=500)))
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    after = "v1=50, v2=50" if on_failure == "hold" else "v1=100, v2=0"
    assert str(err.value) == ("the rollout stopped on an error at step 5 (weight 100): patching virtualservices shop/payment: HTTP 500 etcdserver:"
                              " request timed out; %s: traffic now %s" % ("held" if on_failure == "hold" else "rolled back", after)
                              + " (canary v2 gets %d %% of the traffic)" % (50 if on_failure == "hold" else 0))
    assert state(store)["step"] == 3 and err.value.result["timeline"][-1]["step"] == 4   # the last analysed step, inside the plan
    if on_failure == "hold":   # a rerun resumes the held rollout at its last step, and promotes
        _s, gate, _c, rerun = make(store=store, clock=clock, on_failure="hold")
        result = rerun.run()
        assert "resuming held at step 4 (weight 50)" in result["note"] and result["result"] == "promoted" and gate.seen == [50]


def test_another_writer_of_the_target_weights_before_the_promotion_holds_at_the_last_step_of_the_plan():
    store, gate, clock, rollout = make(on_failure="hold")
    in_last_window(gate, lambda: sets_weights(40, 60)(vs_of(store)))
    result = rollout.run()
    assert result["result"] == "held" and target(store) == {"v1": 40, "v2": 60}
    assert [(e["step"], e["action"]) for e in result["timeline"][-2:]] == [(5, "hold"), (4, "held")]
    assert state(store)["step"] == 3 and state(store)["phase"] == "held"
    _s, _g, _c, rerun = make(store=store, clock=clock, on_failure="hold")
    assert "resuming held at step 4 (weight 50)" in rerun.run(check_mode=True)["note"]


@pytest.mark.parametrize("length, shown", [(300, "x" * 300), (301, "x" * 300 + "...")])
def test_a_long_annotation_another_client_wrote_is_cut_at_300_characters_in_the_reason(length, shown):
    store, gate, _clock, rollout = make()
    evaluate = gate.evaluate

    def someone_overwrites_the_record(token):
        if gate.windows == 1:
            vs_of(store)["metadata"]["annotations"][ro.STATE_ANNOTATION] = "x" * length
        return evaluate(token)

    gate.evaluate = someone_overwrites_the_record
    result = rollout.run()
    assert result["result"] == "rolled_back"
    assert "(metadata.annotations): found %s, the rollout had written {" % shown in result["reason"]


# -- errors of every shape before the first write, and the rollback's own refusal -------------------------------------

def test_a_dropped_connection_on_the_first_write_keeps_its_cause_and_says_traffic_stays():
    # urllib3's error when the API server drops the connection: a message and the cause, as two arguments
    store, gate, _clock, rollout = make()
    cause = ConnectionResetError(104, "Connection reset by peer")
    store.refuse.append(ProtocolError("Connection aborted.", cause))
    with pytest.raises(ProtocolError) as err:
        rollout.run()
    assert err.value.args == ("Connection aborted.; this run wrote nothing: traffic stays v1=100, v2=0 (canary v2 gets 0 % of it)", cause)
    assert err.value.result["result"] == "not_started" and gate.windows == 0


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), ConnectionResetError()],
                         ids=["errno-first", "no-arguments"])
def test_an_error_whose_first_argument_is_no_message_is_left_as_it_came(error):
    store, _gate, _clock, rollout = make()
    args = error.args
    store.refuse.append(error)
    with pytest.raises(ConnectionResetError) as err:
        rollout.run()
    assert err.value is error and err.value.args == args
    assert err.value.result["result"] == "not_started" and err.value.result["weights_after"] == {"v1": 100, "v2": 0}


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception type that takes no attributes (a frozen dataclass, as some clients define their errors)."""
    message: str


def test_an_error_that_takes_no_attributes_is_raised_as_it_came():
    store, _gate, _clock, rollout = make()
    store.refuse.append(FrozenError("the client gave up"))
    with pytest.raises(FrozenError) as err:
        rollout.run()
    assert err.value.message == "the client gave up" and not hasattr(err.value, "result") and store.patches == []


def test_a_rollback_refused_with_an_error_of_its_own_names_that_error():
    # after a failed analysis the rollback meets an error that carries a status but no verb: it is told as it is,
    # not as "refused the same way" (there was no earlier refusal)
    store, gate, _clock, rollout = make(verdicts=["pass", "fail"])
    evaluate = gate.evaluate

    def etcd_times_out(token):
        if gate.windows == 2:
            store.refuse.append(K8sError("patching virtualservices shop/payment: HTTP 500 etcdserver: request timed out", status=500))
        return evaluate(token)

    gate.evaluate = etcd_times_out
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    assert ("the rollback that should have followed was not written: patching virtualservices shop/payment: HTTP 500 etcdserver:"
            " request timed out. Fix the cause") in str(err.value)
    assert "refused the same way" not in str(err.value) and target(store) == {"v1": 90, "v2": 10}


def removes_the_canary(store):
    vs_of(store)["spec"]["http"][1]["route"] = [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100}]


def test_a_crash_after_someone_removed_the_canary_from_the_route_holds_and_says_it_gets_nothing():
    store, gate, _clock, rollout = make(on_failure="hold")

    def edit_then_crash(token):
        removes_the_canary(store)
        raise RuntimeError("prometheus client crashed")

    gate.evaluate = edit_then_crash
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    assert str(err.value).endswith("; held: traffic now v1=100 (canary v2 gets 0 % of the traffic)")


def test_a_refused_rollback_after_someone_removed_the_canary_says_it_gets_nothing():
    store, gate, _clock, rollout = make()

    def edit_revoke_and_crash(token):
        removes_the_canary(store)
        store.forbidden = True
        raise RuntimeError("prometheus client crashed")

    gate.evaluate = edit_revoke_and_crash
    with pytest.raises(ro.RolloutError) as err:
        rollout.run()
    assert str(err.value).startswith("canary v2 still gets 0 % of the traffic (weights in force: v1=100): ")
