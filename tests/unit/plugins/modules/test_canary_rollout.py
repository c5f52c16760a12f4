# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""traffic_split and canary_rollout as Ansible runs them: arguments in, exit_json/fail_json out, the API faked."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

import pytest

from ansible.module_utils.testing import patch_module_args
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import ExitJson, FailJson
from ansible_collections.onprem.mesh.plugins.modules import canary_rollout, traffic_split
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, serve

ROUTE = {"name": "primary", "route": [{"destination": {"host": "payment", "subset": "v1"}, "weight": 100},
                                      {"destination": {"host": "payment", "subset": "v2"}, "weight": 0}]}
OBJECTS = [{"kind": "VirtualService", "metadata": {"name": "payment", "namespace": "shop"}, "spec": {"hosts": ["payment"], "http": [ROUTE]}},
           {"kind": "DestinationRule", "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {"host": "payment", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}]


@pytest.fixture
def store(monkeypatch):
    fake = serve(monkeypatch, FakeIstio(OBJECTS), (traffic_split, canary_rollout))
    return fake


def run(module, args, check_mode=False, diff=False):
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    if diff:
        args = dict(args, _ansible_diff=True)
    with patch_module_args(args):
        with pytest.raises((ExitJson, FailJson)) as outcome:
            module.main()
    return outcome.value.args[0]


def test_traffic_split_check_mode_with_diff(store):
    out = run(traffic_split, dict(name="payment", namespace="shop", weights={"v1": 95, "v2": 5}), check_mode=True, diff=True)
    assert out["changed"] and out["diff"]["before"] == {"weights": {"v1": 100, "v2": 0}} and out["diff"]["after"] == {"weights": {"v1": 95, "v2": 5}}
    assert store.calls["write"] == 0


def test_traffic_split_route_name_and_index_are_exclusive(store):
    out = run(traffic_split, dict(name="payment", namespace="shop", route_name="primary", route_index=0, weights={"v1": 100}))
    # refused by the argument spec, before any call to the API (the engine's own check is in test_traffic)
    assert out["failed"] and out["msg"] == "parameters are mutually exclusive: route_name|route_index"
    assert store.calls == {"read": 0, "write": 0}


def test_canary_rollout_needs_a_check(store):
    out = run(canary_rollout, dict(name="payment", namespace="shop", stable="v1", canary="v2", steps=[5, 50]))
    assert out["failed"] and out["msg"].startswith("checks: a rollout needs at least one health check")
    assert store.calls["write"] == 0


def test_canary_rollout_check_mode_plans_from_step_max(store):
    args = dict(name="payment", namespace="shop", stable="v1", canary="v2", step_weight=20, max_weight=60, interval="1m",
                checks=[{"name": "hook", "type": "http", "url": "http://127.0.0.1:9/approve"}])
    out = run(canary_rollout, args, check_mode=True)
    assert out["result"] == "planned" and [s["weight"] for s in out["schedule"]] == [20, 40, 60, 100]
    assert out["planned_seconds"] == 180.0 and store.calls["write"] == 0


def test_canary_rollout_bad_schedule_names_the_field(store):
    args = dict(name="payment", namespace="shop", stable="v1", canary="v2", steps=[50, 25],
                checks=[{"name": "hook", "type": "http", "url": "http://127.0.0.1:9/approve"}])
    out = run(canary_rollout, args)
    assert out["failed"] and "steps[1]: weights must increase step by step; 25 follows 50" in out["msg"]


def test_canary_rollout_bad_check_names_the_field(store):
    args = dict(name="payment", namespace="shop", stable="v1", canary="v2", steps=[10], checks=[{"name": "p99", "type": "latency"}],
                prometheus_url="http://127.0.0.1:9")
    out = run(canary_rollout, args)
    assert out["failed"] and out["msg"].startswith("invalid canary checks: checks[0].max")


def test_the_virtualservice_name_is_required(store):
    out = run(traffic_split, dict(namespace="shop", weights={"v1": 100}))
    assert out["failed"] and out["msg"] == "missing required arguments: name" and store.calls == {"read": 0, "write": 0}


def test_traffic_split_retries_five_conflicts_by_default(store, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    counter = {"n": 0}

    def other_writer(obj):
        counter["n"] += 1
        obj["spec"]["http"][0]["route"][0]["weight"] = 100 - counter["n"]
        obj["spec"]["http"][0]["route"][1]["weight"] = counter["n"]

    store.interfere.extend([other_writer] * 6)
    out = run(traffic_split, dict(name="payment", namespace="shop", weights={"v1": 50, "v2": 50}))
    assert out["failed"] and "6 attempts met a conflict" in out["msg"]
