# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""canary_rollout's preflight as Ansible runs it (issue 11): arguments in, exit_json/fail_json out, the API, Prometheus
and the canary's Deployment faked. A refusal writes nothing and returns not_started, the weights and the report."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

import pytest

from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks
from ansible_collections.onprem.mesh.plugins.module_utils.prometheus import TransportError
from ansible_collections.onprem.mesh.plugins.modules import canary_rollout
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import ExitJson, FailJson
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio, serve
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_prometheus import FakePrometheus
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.test_canary_checks import FakeReader, deployment
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.test_canary_rollout import OBJECTS

URL = "http://127.0.0.1:9"
SR = {"name": "success-rate", "type": "success_rate", "min": 99}
ERRORS = {"name": "5xx", "type": "promql", "max": 1,
          "query": 'sum(rate(istio_requests_total{destination_workload="{{ workload }}",response_code=~"5.."}[{{ window }}]))'}
ROLLOUT = dict(name="payment", namespace="shop", stable="v1", canary="v2", canary_workload="payment-v2", steps=[10, 50], interval="0s",
               prometheus_url=URL, checks=[SR], retry_inconclusive_for=0)
NOTHING = "; this run wrote nothing: traffic stays v1=100, v2=0 (canary v2 gets 0 % of it)"


def mesh(stable=600, canary=600, stable_workload="payment-v1"):
    """The stable's and the canary's requests in any window, all answered 200 (a 503 series counts none)."""
    prom = FakePrometheus(URL, other=lambda url, **kwargs: (200, b"ok"))
    for workload, version, count in ((stable_workload, "v1", stable), ("payment-v2", "v2", canary)):
        for code, n in (("200", count), ("503", 0)):
            prom.add("istio_requests_total", n, reporter="destination", response_code=code, destination_workload_namespace="shop",
                     destination_workload=workload, destination_version=version)
    return prom


class World:
    def __init__(self, monkeypatch):
        self.store = serve(monkeypatch, FakeIstio(OBJECTS), (canary_rollout,))
        self.prom = mesh()
        self.reader = FakeReader(deployment(replicas=2, available=2, updated=2))
        self.warnings = []
        monkeypatch.setattr(time, "sleep", lambda seconds: None)
        monkeypatch.setattr(canary_checks, "urls_transport", self.transport)
        monkeypatch.setattr(canary_checks, "K8sWorkloadReader", lambda api_client: self.reader)
        monkeypatch.setattr(basic.AnsibleModule, "warn", lambda module, warning, **kwargs: self.warnings.append(warning))

    def transport(self, url, **kwargs):
        """Prometheus as the test has it now (a test may replace it, or its transport)."""
        return self.prom.transport(url, **kwargs)

    def weights(self):
        return dict((d["destination"]["subset"], d["weight"]) for d in self.store.route("payment", "shop", 0)["route"])


@pytest.fixture
def world(monkeypatch):
    return World(monkeypatch)


def run(args, check_mode=False):
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    with patch_module_args(args):
        with pytest.raises((ExitJson, FailJson)) as outcome:
            canary_rollout.main()
    return outcome.value.args[0]


def assert_refused(world, out):
    assert out["failed"] and out["result"] == "not_started" and out["changed"] is False, out
    assert out["weights_before"] == out["weights_after"] == {"v1": 100, "v2": 0} and out["timeline"] == []
    assert world.store.calls["write"] == 0 and world.store.patches == [] and out["api_calls"] == {"read": 3, "write": 0}
    assert world.weights() == {"v1": 100, "v2": 0} and out["preflight"]["verdict"] == "fail"
    assert out["msg"].startswith("preflight failed, so canary v2 gets no traffic: ") and out["msg"].endswith(NOTHING)


def test_prometheus_down_refuses_with_no_write(world):
    def down(url, **kwargs):
        raise TransportError("[Errno 111] Connection refused")

    world.prom.transport = down
    out = run(ROLLOUT)
    assert_refused(world, out)
    assert out["msg"] == ("preflight failed, so canary v2 gets no traffic: prometheus (prometheus, %s): Prometheus at prometheus_url %s is"
                          " unreachable: [Errno 111] Connection refused; fix: start Prometheus or correct prometheus_url (and"
                          " prometheus_headers, prometheus_validate_certs), then rerun" % (URL, URL) + NOTHING)
    assert [(c["name"], c["verdict"]) for c in out["preflight"]["checks"]] == [("prometheus", "fail"), ("canary-pods", "pass")]


def test_a_promql_typo_refuses_naming_the_check(world):
    typo = dict(ERRORS, query=ERRORS["query"][:-1])
    out = run(dict(ROLLOUT, checks=[SR, typo]))
    assert_refused(world, out)
    assert ("5xx (promql, stable): Prometheus at %s rejected the query (HTTP 400 bad_data: parse error: " % URL) in out["msg"]
    assert "; fix: correct the PromQL of check 5xx (the query as sent is in this item's query)" + NOTHING in out["msg"]
    assert "success-rate" not in out["msg"]
    assert out["preflight"]["checks"][2]["query"] == 'sum(rate(istio_requests_total{destination_workload="payment-v1",response_code=~"5.."}[1m])'


def test_a_canary_without_ready_pods_refuses(world):
    world.reader.deployment = deployment(replicas=2, available=0, updated=2)
    out = run(ROLLOUT)
    assert_refused(world, out)
    assert out["msg"] == ("preflight failed, so canary v2 gets no traffic: canary-pods (workload_ready, canary): Deployment shop/payment-v2 has"
                          " 0/2 replicas available, 2 updated; fix: wait until the canary's pods are ready (kubectl -n shop rollout status"
                          " deployment/payment-v2), then rerun" + NOTHING)


def test_a_quiet_stable_refuses_unless_low_traffic_is_skipped(world):
    world.prom = mesh(stable=3)
    out = run(ROLLOUT)
    assert_refused(world, out)
    assert "success-rate (success_rate, stable): low traffic on the stable shop/payment-v1 (version v1): 3 requests in 1m" in out["msg"]
    out = run(dict(ROLLOUT, preflight_low_traffic="skip"))
    assert out["result"] == "promoted" and out["preflight"]["verdict"] == "pass" and world.weights() == {"v1": 0, "v2": 100}
    assert world.warnings == ["preflight: success-rate skipped: low traffic on the stable shop/payment-v1 (version v1): 3 requests in 1m,"
                              " min_requests is 10 (preflight_low_traffic: skip)"]


def test_a_healthy_rollout_reports_its_preflight_aimed_at_the_derived_stable(world):
    out = run(dict(ROLLOUT, checks=[SR, ERRORS]))
    assert out["result"] == "promoted" and world.store.calls["write"] == 3 and world.warnings == []
    assert [(c["name"], c["verdict"]) for c in out["preflight"]["checks"]] == [
        ("prometheus", "pass"), ("success-rate", "pass"), ("5xx", "pass"), ("canary-pods", "pass")]
    assert out["preflight"]["reason"] == "4 passed, 0 skipped"
    stable_queries = world.prom.queries[:4]   # reachability, success-rate (request count, query), 5xx (query)
    assert stable_queries[0] == "1" and all('destination_workload="payment-v1"' in q for q in stable_queries[1:])
    assert all('"payment-v1"' not in q for q in world.prom.queries[4:])   # the steps ask about the canary only


def test_the_stable_workload_option_wins_and_no_workload_checks_no_pods(world, monkeypatch):
    world.prom = mesh(stable_workload="payment-stable")
    out = run(dict(ROLLOUT, stable_workload="payment-stable"))
    assert out["result"] == "promoted" and 'destination_workload="payment-stable"' in out["preflight"]["checks"][1]["query"]
    world.store = serve(monkeypatch, FakeIstio(OBJECTS), (canary_rollout,))
    http = dict(name="hook", type="http", url="http://127.0.0.1:8/ok")
    out = run(dict(ROLLOUT, canary_workload=None, checks=[http]))
    assert out["result"] == "promoted" and out["preflight"] == {"verdict": "pass", "reason": "0 passed, 1 skipped (canary-pods)", "checks": [
        dict(name="canary-pods", type="workload_ready", target="canary", verdict="skipped",
             reason="no canary_workload was given, so the canary's pods were not checked; set it to have them checked")]}
    assert world.warnings == ["preflight: canary-pods skipped: no canary_workload was given, so the canary's pods were not checked;"
                              " set it to have them checked"]


def test_check_mode_runs_the_preflight(world):
    out = run(ROLLOUT, check_mode=True)
    assert out["result"] == "planned" and out["preflight"]["verdict"] == "pass" and world.store.calls["write"] == 0
    assert world.prom.queries[0] == "1" and len(world.prom.queries) == 3
    world.reader.deployment = deployment(replicas=2, available=1, updated=2)
    world.store.calls = {"read": 0, "write": 0}
    out = run(ROLLOUT, check_mode=True)
    assert_refused(world, out)
    assert "canary-pods (workload_ready, canary): Deployment shop/payment-v2 has 1/2 replicas available" in out["msg"]


def test_preflight_off_starts_the_first_step_even_with_prometheus_down(world):
    def down(url, **kwargs):
        raise TransportError("[Errno 111] Connection refused")

    world.prom.transport = down
    out = run(dict(ROLLOUT, preflight=False))
    assert out["failed"] and out["result"] == "rolled_back" and "preflight" not in out
    assert world.store.calls["write"] == 2 and [e["weight"] for e in out["timeline"]] == [10, 0]   # 10 % to a canary nobody could judge


def test_a_resumed_canary_with_traffic_skips_the_preflight(world):
    world.store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][0]["route"][0]["weight"] = 90
    world.store.objects[("virtualservices", "shop", "payment")]["spec"]["http"][0]["route"][1]["weight"] = 10

    def down(url, **kwargs):
        raise TransportError("[Errno 111] Connection refused")

    world.prom.transport = down
    out = run(ROLLOUT)
    assert out["result"] == "rolled_back" and out["preflight"] == {
        "verdict": "skipped", "checks": [], "reason": "canary v2 already gets 10 % of the traffic: the analysis of its step judges it"}
