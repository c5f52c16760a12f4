# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""traffic_split and canary_rollout as Ansible runs them, with another writer and refusals (issue 11): the task's
message and the results it returns on every failure."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

import pytest

from ansible.module_utils.testing import patch_module_args
from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks
from ansible_collections.onprem.mesh.plugins.modules import canary_rollout, traffic_split
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import ExitJson, FailJson
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, serve

ROUTE = {"name": "primary", "route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100},
                                      {"destination": {"host": "payment", "subset": "v2"}, "weight": 0}]}
OTHER = {"name": "beta", "match": [{"headers": {"x-beta": {"exact": "1"}}}], "route": [{"destination": {"host": "payment", "subset": "v2"}}]}
OBJECTS = [{"kind": "VirtualService", "metadata": {"name": "payment", "namespace": "shop"}, "spec": {"hosts": ["payment"], "http": [OTHER, ROUTE]}},
           {"kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}]
ROLLOUT = dict(name="payment", namespace="shop", route_name="primary", stable="v1", canary="v2", steps=[10, 50], interval="0s",
               checks=[{"name": "approval", "type": "http", "url": "http://127.0.0.1:9/approve"}], retry_inconclusive_for=0)


@pytest.fixture
def store(monkeypatch):
    fake = serve(monkeypatch, FakeIstio(OBJECTS), (traffic_split, canary_rollout))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)   # the steps' intervals and the retries' back-off
    monkeypatch.setattr(canary_checks, "urls_transport", lambda url, **kwargs: (200, b"approved"))
    return fake


def run(module, args):
    with patch_module_args(args):
        with pytest.raises((ExitJson, FailJson)) as outcome:
            module.main()
    return outcome.value.args[0]


def weights(store):
    return dict((d["destination"]["subset"], d["weight"]) for d in store.route("payment", "shop", 1)["route"])


def test_traffic_split_reads_again_and_retries_after_a_failed_test_op(store):
    def other_writer(obj):
        obj["spec"]["http"][1]["route"][0]["weight"] = 70
        obj["spec"]["http"][1]["route"][1]["weight"] = 30
        obj["spec"]["http"][0]["timeout"] = "3s"

    store.interfere.append(other_writer)
    out = run(traffic_split, dict(name="payment", namespace="shop", route_name="primary", weights={"v1": 90, "v2": 10}))
    assert not out.get("failed") and out["attempts"] == 2 and out["weights_before"] == {"v1": 70, "v2": 30}, out
    assert weights(store) == {"v1": 90, "v2": 10} and store.route("payment", "shop", 0)["timeout"] == "3s"
    assert out["api_calls"] == {"read": 3, "write": 2}


def test_traffic_split_names_a_missing_namespace(store):
    out = run(traffic_split, dict(name="payment", namespace="nope", weights={"v1": 90, "v2": 10}))
    assert out["failed"] and out["msg"].startswith("namespace: namespace nope does not exist"), out["msg"]


def test_rollout_with_an_unknown_canary_names_the_option_and_returns_the_weights(store):
    out = run(canary_rollout, dict(ROLLOUT, canary="v9"))
    assert out["failed"] and out["msg"].startswith("canary: subset v9 is not defined in the DestinationRule for host payment"), out["msg"]
    assert out["msg"].endswith("this run wrote nothing: traffic stays v1=100, v2=0 (canary v9 gets 0 % of it)")
    assert out["result"] == "not_started" and out["weights_after"] == {"v1": 100, "v2": 0} and out["timeline"] == []
    assert store.calls["write"] == 0


def test_rollout_promotes_past_a_writer_of_another_route(store):
    store.interfere.append(lambda obj: obj["spec"]["http"][0].update(timeout="5s"))
    out = run(canary_rollout, ROLLOUT)
    assert not out.get("failed") and out["result"] == "promoted", out
    assert store.route("payment", "shop", 0)["timeout"] == "5s" and weights(store) == {"v1": 0, "v2": 100}


def test_rollout_stopped_by_a_writer_of_its_weights_fails_naming_the_field_with_its_results(store):
    def operator(obj):
        obj["spec"]["http"][1]["route"][0]["weight"] = 100
        obj["spec"]["http"][1]["route"][1]["weight"] = 0

    store.interfere.extend([lambda obj: None, operator])   # between the read and the write of step 2
    out = run(canary_rollout, ROLLOUT)
    assert out["failed"] and out["result"] == "rolled_back", out
    assert out["msg"] == ("canary v2 rolled back: another client changed VirtualService shop/payment while the rollout ran: the weights"
                          " of the target route http[1] (name: primary) (spec.http[1].route[].weight): found v1=100, v2=0, the rollout"
                          " had written v1=90, v2=10; traffic now v1=100, v2=0")
    assert [e["action"] for e in out["timeline"]] == ["advance", "rollback", "rolled_back"]
    assert out["weights_after"] == {"v1": 100, "v2": 0} and out["api_calls"] == store.calls


def test_rollout_that_loses_its_patch_permission_fails_with_the_weights_in_force(store, monkeypatch):
    def approve_then_revoke(url, **kwargs):
        store.forbidden = True
        return 200, b"approved"

    monkeypatch.setattr(canary_checks, "urls_transport", approve_then_revoke)
    out = run(canary_rollout, ROLLOUT)
    assert out["failed"] and out["result"] == "stopped" and out["weights_after"] == {"v1": 90, "v2": 10}, out
    assert out["msg"].startswith("canary v2 still gets 10 % of the traffic (weights in force: v1=90, v2=10)")
    assert "lacks RBAC permission to patch virtualservices.networking.istio.io in namespace shop" in out["msg"]
    assert [e["action"] for e in out["timeline"]] == ["advance", "stopped"]


def test_rollout_with_the_same_subset_as_stable_and_canary_is_refused_as_such(store):
    out = run(canary_rollout, dict(ROLLOUT, stable="v1", canary="v1"))
    assert out["failed"] and out["msg"].startswith("stable and canary name the same subset 'v1'"), out["msg"]
    assert store.calls["write"] == 0
