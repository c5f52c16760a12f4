# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""canary_gate as Ansible runs it: arguments in, exit_json/fail_json out; Prometheus faked at the transport."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

import pytest

from ansible.module_utils.testing import patch_module_args
from ansible_collections.onprem.mesh.tests.unit.plugins.modules.module_exits import ExitJson, FailJson
from ansible_collections.onprem.mesh.plugins.module_utils import canary_checks
from ansible_collections.onprem.mesh.plugins.modules import canary_gate
from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_prometheus import FakePrometheus


def prometheus_answers(good=999, errors=1, p99=120):
    """Prometheus (the unit tests' FakePrometheus) holding the canary's Istio series: ``good`` non-5xx and ``errors`` 5xx
    requests in the window (None: no series), ``p99`` ms. The module reaches it through its own client;
    ``transport`` answers /api/v1/query, ``requests`` records what was sent."""
    prom = FakePrometheus(url="http://127.0.0.1:9090")
    labels = dict(reporter="destination", destination_workload_namespace="shop", destination_workload="reviews-v2", destination_version="v2")
    if good is not None:
        prom.add("istio_requests_total", good, response_code="200", **labels)
    if errors is not None:
        prom.add("istio_requests_total", errors, response_code="503", **labels)
    if p99 is not None:
        for le, count in ((repr(float(p99)), 98), ("+Inf", 100)):
            prom.add("istio_request_duration_milliseconds_bucket", count, le=le, **labels)
    return prom


ARGS = dict(prometheus_url="http://127.0.0.1:9090", namespace="shop", workload="reviews-v2", version="v2",
            retry_inconclusive_for=0,
            checks=[dict(name="errors", type="success_rate", min=99), dict(name="p99", type="latency", max=500)])


def run_module(monkeypatch, args, transport=None, check_mode=False, module=None):
    if transport is not None:
        monkeypatch.setattr(canary_checks, "urls_transport", transport)
    args = dict(args)
    if check_mode:
        args["_ansible_check_mode"] = True
    with patch_module_args(args):
        with pytest.raises((ExitJson, FailJson)) as res:
            canary_gate.main()
    if module is not None:
        module.append(res.value.module)
    return res.value.args[0], isinstance(res.value, FailJson)


def test_healthy_canary_passes(monkeypatch):
    prom = prometheus_answers()
    result, failed = run_module(monkeypatch, ARGS, prom.transport)
    assert not failed and result["changed"] is False and result["verdict"] == "pass"
    assert [(c["name"], c["value"]) for c in result["checks"]] == [("errors", 99.9), ("p99", 120.0)]
    assert 'destination_version%3D%22v2%22' in prom.requests[0]["url"]


def test_check_mode_runs_the_checks_too(monkeypatch):
    result, failed = run_module(monkeypatch, ARGS, prometheus_answers().transport, check_mode=True)
    assert not failed and result["verdict"] == "pass" and result["changed"] is False


def test_failing_verdict_fails_the_task_naming_checks_and_values(monkeypatch):
    result, failed = run_module(monkeypatch, ARGS, prometheus_answers(good=80, errors=20).transport)
    assert failed and result["verdict"] == "fail"
    assert result["msg"].startswith("canary gate verdict fail: errors (success_rate): fail - 80 % is not >= 99 %")
    assert "p99" not in result["msg"]
    assert result["checks"][1]["verdict"] == "pass"


def test_fail_on_verdict_false_returns_the_verdict(monkeypatch):
    result, failed = run_module(monkeypatch, dict(ARGS, fail_on_verdict=False), prometheus_answers(p99=900).transport)
    assert not failed and result["verdict"] == "fail" and result["checks"][1]["value"] == 900.0


def test_inconclusive_verdict_also_fails_the_task(monkeypatch):
    result, failed = run_module(monkeypatch, dict(ARGS, on_still_inconclusive="inconclusive"), prometheus_answers(good=None, errors=None, p99=None).transport)
    assert failed and result["verdict"] == "inconclusive" and "canary gate verdict inconclusive" in result["msg"]


def test_bad_promql_quotes_prometheus(monkeypatch):
    args = dict(ARGS, checks=[dict(name="q", type="promql", query="sum(x", max=1)])
    result, failed = run_module(monkeypatch, args, prometheus_answers().transport)
    assert failed and "rejected the query (HTTP 400 bad_data: parse error: " in result["msg"] and result["msg"].endswith("Fix the PromQL: sum(x")


def test_spec_error_is_a_clear_failure(monkeypatch):
    args = dict(ARGS, checks=[dict(name="errors", type="success_rate", min=99), dict(name="lat", type="latency")])
    result, failed = run_module(monkeypatch, args, prometheus_answers().transport)
    assert failed
    assert result["msg"] == ("invalid canary checks: checks[1].max: latency check needs max (milliseconds), e.g. max: 500")


def test_argument_spec_requires_a_name_and_a_type_for_every_check(monkeypatch):
    result, failed = run_module(monkeypatch, dict(ARGS, checks=[dict(type="success_rate", min=99)]), prometheus_answers().transport)
    assert failed and result["msg"] == "missing required arguments: name found in checks"
    result, failed = run_module(monkeypatch, dict(ARGS, checks=[dict(name="errors", min=99)]), prometheus_answers().transport)
    assert failed and result["msg"] == "missing required arguments: type found in checks"


def test_argument_spec_rejects_wrong_choice(monkeypatch):
    args = dict(ARGS, checks=[dict(name="x", type="nope")])
    result, failed = run_module(monkeypatch, args, prometheus_answers().transport)
    assert failed and "type" in result["msg"] and "nope" in result["msg"]


def test_prometheus_headers_are_sent_and_not_logged(monkeypatch):
    prom = prometheus_answers()
    args = dict(ARGS, prometheus_headers={"Authorization": "Bearer s3cr3t-token"}, prometheus_validate_certs=False)
    module = []
    result, failed = run_module(monkeypatch, args, prom.transport, module=module)
    assert not failed
    assert prom.requests[0]["headers"]["Authorization"] == "Bearer s3cr3t-token" and prom.requests[0]["validate_certs"] is False
    assert "s3cr3t-token" not in json.dumps(result) and "Bearer s3cr3t-token" in module[0].no_log_values


def test_http_check_headers_are_sent_and_kept_out_of_logs(monkeypatch):
    seen = []

    def transport(url, method="GET", headers=None, data=None, validate_certs=True, timeout=10):
        seen.append(dict(url=url, headers=headers, validate_certs=validate_certs))
        return 200, b"approved"

    module = []
    args = dict(ARGS, prometheus_url=None, checks=[dict(name="approval", type="http", url="https://deploy.example/approve",
                                                        headers={"Authorization": "Bearer hook-s3cr3t"})])
    result, failed = run_module(monkeypatch, args, transport, module=module)
    assert not failed and result["verdict"] == "pass"
    assert seen == [dict(url="https://deploy.example/approve", headers={"Authorization": "Bearer hook-s3cr3t"}, validate_certs=True)]
    assert "Bearer hook-s3cr3t" in module[0].no_log_values   # Ansible masks it in every output and log


def test_workload_checks_build_the_api_client(monkeypatch):
    built = []

    class Reader:
        def read_deployment(self, namespace, name):
            return {"metadata": {"generation": 1}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "r"}}},
                    "status": {"availableReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1}}

        def list_pods(self, namespace, selector):
            return []

    def build(params):
        built.append(params["host"])
        return Reader()

    monkeypatch.setattr(canary_gate, "build_api_client", build)
    monkeypatch.setattr(canary_gate, "HAS_K8S", True)
    args = dict(ARGS, host="https://127.0.0.1:6443", checks=[dict(name="ready", type="workload_ready")])
    result, failed = run_module(monkeypatch, args)
    assert not failed and result["verdict"] == "pass" and built == ["https://127.0.0.1:6443"]


def test_kubeconfig_problem_fails_before_checking(monkeypatch):
    def build(params):
        raise canary_gate.K8sError("could not load the kubeconfig /nope: no such file")

    monkeypatch.setattr(canary_gate, "build_api_client", build)
    monkeypatch.setattr(canary_gate, "HAS_K8S", True)
    result, failed = run_module(monkeypatch, dict(ARGS, kubeconfig="/nope", checks=[dict(name="r", type="no_restarts")]))
    assert failed and "could not load the kubeconfig /nope" in result["msg"]


def test_prometheus_only_gate_needs_no_kubernetes(monkeypatch):
    def build(params):
        raise AssertionError("no Kubernetes connection for Prometheus checks")

    monkeypatch.setattr(canary_gate, "build_api_client", build)
    result, failed = run_module(monkeypatch, ARGS, prometheus_answers().transport)
    assert not failed
