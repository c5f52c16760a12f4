# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""canary_rollout with match and mirror steps as Ansible runs it: the plan in check mode, refusals before any write."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.onprem.mesh.plugins.modules import canary_rollout
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, serve
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.test_canary_rollout import OBJECTS, run

HOOK = [{"name": "hook", "type": "http", "url": "http://127.0.0.1:9/approve"}]
ARGS = dict(name="payment", namespace="shop", stable="v1", canary="v2", interval="1m", checks=HOOK)


@pytest.fixture
def store(monkeypatch):
    return serve(monkeypatch, FakeIstio(OBJECTS), (canary_rollout,))


def test_check_mode_plans_the_match_and_mirror_steps(store):
    steps = [{"mirror": 10, "interval": "30s"}, {"match": {"headers": {"x-canary": {"exact": "true"}}}}, 25, 100]
    out = run(canary_rollout, dict(ARGS, steps=steps), check_mode=True)
    assert out["result"] == "planned" and store.calls["write"] == 0
    assert out["schedule"] == [
        {"step": 1, "weight": 0, "weights": {"v1": 100, "v2": 0}, "interval": 30, "mirror": 10},
        {"step": 2, "weight": 0, "weights": {"v1": 100, "v2": 0}, "interval": 60, "match": {"headers": {"x-canary": {"exact": "true"}}}},
        {"step": 3, "weight": 25, "weights": {"v1": 75, "v2": 25}, "interval": 60},
        {"step": 4, "weight": 100, "weights": {"v1": 0, "v2": 100}, "interval": 0, "promotion": True}]
    assert out["planned_seconds"] == 150


def test_a_bad_step_is_refused_before_the_api_is_asked(store):
    out = run(canary_rollout, dict(ARGS, steps=[{"mirror": 0}, 50]))
    assert out["failed"] and out["msg"].startswith("steps[0].mirror: a percentage 0 < x <= 100")
    assert store.calls == {"read": 0, "write": 0}


def test_a_mirror_step_with_a_source_reporter_check_is_refused_with_nothing_written(store):
    checks = [{"name": "sr", "type": "success_rate", "min": 99, "reporter": "source"}]
    out = run(canary_rollout, dict(ARGS, steps=[{"mirror": 10}, 50], checks=checks, prometheus_url="http://127.0.0.1:9", canary_workload="payment-v2"))
    assert out["failed"] and out["msg"].startswith("steps[0].mirror: check sr reads reporter: source, which never counts mirrored requests")
    assert out["msg"].endswith("this run wrote nothing: traffic stays v1=100, v2=0 (canary v2 gets 0 % of it)")
    assert out["result"] == "not_started" and out["weights_after"] == {"v1": 100, "v2": 0} and store.calls["write"] == 0
    # also in check mode: the plan would not work
    out = run(canary_rollout, dict(ARGS, steps=[{"mirror": 10}, 50], checks=checks, prometheus_url="http://127.0.0.1:9", canary_workload="payment-v2"),
              check_mode=True)
    assert out["failed"] and out["result"] == "not_started"


def test_a_match_header_the_route_matches_otherwise_is_refused(monkeypatch):
    objects = [dict(OBJECTS[0], spec={"hosts": ["payment"], "http": [dict(OBJECTS[0]["spec"]["http"][0], match=[{"headers": {"x-canary": {"exact": "no"}}}])]}),
               OBJECTS[1]]
    store = serve(monkeypatch, FakeIstio(objects), (canary_rollout,))
    out = run(canary_rollout, dict(ARGS, steps=[{"match": {"headers": {"x-canary": {"exact": "yes"}}}}, 50]))
    assert out["failed"] and out["msg"].startswith("steps[0].match.headers.x-canary: the target route already matches header x-canary")
    assert out["result"] == "not_started" and store.calls["write"] == 0
