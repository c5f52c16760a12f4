"""traffic_split and canary_rollout through ansible-playbook against the test Kubernetes API.

The test double validates VirtualServices against Istio's real CRD schemas and answers patches,
conflicts and RBAC as kube-apiserver does. Objects come from Istio's Bookinfo samples. Health in
the canary_rollout tests comes from an ``http`` check against a local server the test switches;
the Prometheus-based checks are proven end to end in test_mesh_lab_canary.py.
"""
import copy
import http.server
import json
import os
import threading

import pytest
import yaml
from kubernetes import client

from k8s_double import istio_crds_path  # pylint: disable=import-error
from playbook_runner import ROOT, run_playbook  # pylint: disable=import-error

TARGET = os.path.join(ROOT, "tests", "integration", "targets", "canary_modules")
GROUP, VERSION = "networking.istio.io", "v1"


def samples(name):
    path = os.path.join(os.path.dirname(istio_crds_path() or ""), "samples", name)
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture
def api(k8s_double, k8s_double_client):  # pylint: disable=redefined-outer-name
    return client.CustomObjectsApi(k8s_double_client(k8s_double))


def create(api_, objs, namespace="default"):  # pylint: disable=redefined-outer-name
    for obj in objs:
        plural = obj["kind"].lower() + "s"
        api_.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)


def get_vs(api_, name="reviews", namespace="default"):  # pylint: disable=redefined-outer-name
    return api_.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualservices", name)


def weights(vs, index=0):
    return dict((d["destination"]["subset"], d.get("weight")) for d in vs["spec"]["http"][index]["route"])


def split(handle, tmp_path, check=False, diff=False, kubeconfig=None, **args):
    args.setdefault("kubeconfig", kubeconfig or handle.kubeconfig)
    return run_playbook(os.path.join(TARGET, "traffic_split.yml"), tmp_path, {"module_args": args}, check=check, diff=diff)


def test_traffic_split_changes_only_the_weights(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    before = get_vs(api)
    rc, result, out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 80, "v2": 20})
    assert rc == 0 and result["changed"], out
    assert result["weights_before"] == {"v1": 90, "v2": 10} and result["weights_after"] == {"v1": 80, "v2": 20}
    after = get_vs(api)
    expected = copy.deepcopy(before["spec"])
    expected["http"][0]["route"][0]["weight"], expected["http"][0]["route"][1]["weight"] = 80, 20
    assert after["spec"] == expected
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    # the patch was a JSON patch that starts with a test of the route as read
    assert result["patch"][0]["op"] == "test" and result["api_calls"] == {"read": 2, "write": 1}
    # idempotent
    rc, result, out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 80, "v2": 20})
    assert rc == 0 and result["changed"] is False, out
    assert get_vs(api)["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]


def test_check_mode_and_diff_change_nothing(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    rv = get_vs(api)["metadata"]["resourceVersion"]
    rc, result, out = split(k8s_double, tmp_path, check=True, diff=True, name="reviews", weights={"v1": 50, "v2": 50})
    assert rc == 0 and result["changed"] and result["diff"]["after"] == {"weights": {"v1": 50, "v2": 50}}, out
    assert get_vs(api)["metadata"]["resourceVersion"] == rv and weights(get_vs(api)) == {"v1": 90, "v2": 10}


def test_header_matched_route_stays_and_ambiguity_is_an_error(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-jason-v2-v3.yaml") + samples("destination-rule-all.yaml"))
    before = get_vs(api)
    rc, result, _out = split(k8s_double, tmp_path, name="reviews", weights={"v3": 50, "v1": 50})
    assert rc == 0 and result["failed"] and "ambiguous" in result["msg"] and "route_name or route_index" in result["msg"]
    rc, result, out = split(k8s_double, tmp_path, name="reviews", route_index=1, weights={"v3": 50, "v1": 50})
    assert rc == 0 and not result.get("failed"), out
    after = get_vs(api)
    assert after["spec"]["http"][0] == before["spec"]["http"][0]
    assert after["spec"]["http"][1]["route"] == [{"destination": {"host": "reviews", "subset": "v3"}, "weight": 50},
                                                 {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50}]


@pytest.mark.parametrize("args, message", [
    (dict(weights={"v1": 90, "v2": 20}), "weights must sum to 100, they sum to 110"),
    (dict(weights={"v1": 95.5, "v2": 4.5}), "weights.v1: weight must be a whole number"),
    (dict(weights={"v1": -10, "v2": 110}), "must be between 0 and 100"),
    (dict(weights={"v1": 90, "v7": 10}), "subset v7 is not defined in the DestinationRule"),
    (dict(name="nope", weights={"v1": 100}), "reading VirtualService default/nope: HTTP 404"),
    (dict(route_name="missing", weights={"v1": 100}), "no HTTP route named 'missing'"),
])
def test_bad_input_fails_and_leaves_the_object(k8s_double, api, tmp_path, args, message):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    rv = get_vs(api)["metadata"]["resourceVersion"]
    args = dict(dict(name="reviews"), **args)
    rc, result, out = split(k8s_double, tmp_path, **args)
    assert rc == 0 and result["failed"] and message in result["msg"], out
    assert get_vs(api)["metadata"]["resourceVersion"] == rv


def test_missing_destination_rule_is_named(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml"))
    _rc, result, _out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and "no DestinationRule in namespace default has host reviews" in result["msg"]


def test_forbidden_says_what_rbac_is_missing(k8s_double, api, k8s_double_kubeconfig, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    rules = [{"apiGroups": [GROUP], "resources": ["virtualservices", "destinationrules"], "verbs": ["get", "list"]}]
    k8s_double.add_token("reader-token", "canary-reader", rules=rules)
    kubeconfig = k8s_double_kubeconfig(k8s_double, token="reader-token")
    _rc, result, _out = split(k8s_double, tmp_path, kubeconfig=kubeconfig, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and "HTTP 403" in result["msg"] and 'cannot patch resource "virtualservices"' in result["msg"]
    assert "RBAC" in result["msg"] and weights(get_vs(api)) == {"v1": 90, "v2": 10}


def test_conflicts_are_retried_then_reported(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    k8s_double.inject({"kind": "conflict", "resource": "virtualservices", "name": "reviews", "count": 2})
    rc, result, out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 70, "v2": 30})
    assert rc == 0 and result["attempts"] == 3 and weights(get_vs(api)) == {"v1": 70, "v2": 30}, out
    k8s_double.inject({"kind": "conflict", "resource": "virtualservices", "name": "reviews", "count": None})
    _rc, result, _out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 60, "v2": 40}, conflict_retries=2)
    assert result["failed"] and "kept changing under us: 3 attempts" in result["msg"]
    assert weights(get_vs(api)) == {"v1": 70, "v2": 30}


def test_a_concurrent_writer_between_read_and_patch_is_caught_by_the_test_op(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))

    # the real kube-apiserver answers a failed JSON-patch test with 422; the module re-reads and retries
    k8s_double.inject({"kind": "bump", "resource": "virtualservices", "name": "reviews", "when": "before-write", "count": 1})
    rc, result, out = split(k8s_double, tmp_path, name="reviews", weights={"v1": 75, "v2": 25})
    assert rc == 0 and not result.get("failed") and weights(get_vs(api)) == {"v1": 75, "v2": 25}, out


def test_tls_is_verified_by_default(k8s_double_tls, k8s_double_client, tmp_path):  # pylint: disable=redefined-outer-name
    api_ = client.CustomObjectsApi(k8s_double_client(k8s_double_tls))
    create(api_, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    args = dict(name="reviews", weights={"v1": 85, "v2": 15}, api_key=k8s_double_tls.token, host=k8s_double_tls.url)
    run = os.path.join(TARGET, "traffic_split.yml")
    _rc, result, _out = run_playbook(run, tmp_path, {"module_args": args})
    assert result["failed"] and "could not be reached" in result["msg"] and "CERTIFICATE_VERIFY_FAILED" in result["msg"]
    rc, result, out = run_playbook(run, tmp_path, {"module_args": dict(args, ca_cert=k8s_double_tls.ca_file)})
    assert rc == 0 and result["changed"], out


class Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # pylint: disable=invalid-name
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b'{"healthy": %s}' % (b"true" if type(self).status == 200 else b"false"))

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def health():
    handler = type("HealthHandler", (Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.handler = handler
    server.url = "http://127.0.0.1:%d/healthz" % server.server_address[1]
    yield server
    server.shutdown()
    server.server_close()


def rollout(handle, tmp_path, health_url, check=False, **args):  # pylint: disable=redefined-outer-name
    base = dict(name="reviews", stable="v1", canary="v2", steps=[10, 50, 100], interval="1s", kubeconfig=handle.kubeconfig,
                checks=[{"name": "smoke", "type": "http", "url": health_url}], retry_inconclusive_for=0)
    base.update(args)
    return run_playbook(os.path.join(TARGET, "canary_rollout.yml"), tmp_path, {"module_args": base}, check=check)


def test_rollout_promotes_a_healthy_canary(k8s_double, api, health, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    k8s_double.reset()
    rc, result, out = rollout(k8s_double, tmp_path, health.url)
    assert rc == 0 and result["result"] == "promoted", out
    assert weights(get_vs(api)) == {"v1": 0, "v2": 100}
    assert [e["weight"] for e in result["timeline"]] == [10, 50, 100]
    assert result["timeline"][0]["checks"][0]["verdict"] == "pass"
    counters = k8s_double.counters()
    assert counters.get("patch virtualservices") == 3
    annotations = get_vs(api)["metadata"]["annotations"]
    assert json.loads(annotations["mesh.onprem.io/canary-rollout"])["phase"] == "promoted"
    assert "mesh.onprem.io/canary-lease" not in annotations


def test_rollout_rolls_back_an_unhealthy_canary(k8s_double, api, health, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    health.handler.status = 500
    rc, result, out = rollout(k8s_double, tmp_path, health.url)
    assert rc == 0 and result["failed"] and result["result"] == "rolled_back", out
    assert "canary v2 rolled back: step 1 (weight 10)" in result["msg"]
    assert weights(get_vs(api)) == {"v1": 100, "v2": 0}


def test_rollout_check_mode_plans_only(k8s_double, api, health, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    rv = get_vs(api)["metadata"]["resourceVersion"]
    rc, result, out = rollout(k8s_double, tmp_path, health.url, check=True, steps=[5, 10, 25, 50, 100], interval="2m")
    assert rc == 0 and result["result"] == "planned" and result["planned_seconds"] == 480, out
    assert [s["weight"] for s in result["schedule"]] == [5, 10, 25, 50, 100]
    assert get_vs(api)["metadata"]["resourceVersion"] == rv


def test_rollout_refuses_while_another_holds_the_lease_and_resumes_a_recorded_step(k8s_double, api, health, tmp_path):  # pylint: disable=redefined-outer-name
    create(api, samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"))
    vs = get_vs(api)
    import time  # pylint: disable=import-outside-toplevel
    state = {"canary": "v2", "stable": "v1", "plan": [10, 50], "step": 1, "phase": "progressing", "failures": 0}
    lease = {"holder": "awx-job-41", "expires": time.time() + 600}
    api.patch_namespaced_custom_object(GROUP, VERSION, "default", "virtualservices", "reviews",
                                       {"metadata": {"annotations": {"mesh.onprem.io/canary-rollout": json.dumps(state),
                                                                     "mesh.onprem.io/canary-lease": json.dumps(lease)}}})
    rc, result, out = rollout(k8s_double, tmp_path, health.url)
    assert rc == 0 and result["failed"] and "held by another rollout (awx-job-41)" in result["msg"], out
    assert get_vs(api)["spec"] == vs["spec"]
    rc, result, out = rollout(k8s_double, tmp_path, health.url, force=True)
    assert rc == 0 and result["result"] == "promoted", out
    assert "resuming progressing at step 2 (weight 50)" in result["note"]
    assert [e["weight"] for e in result["timeline"]] == [50, 100]
