"""traffic_split and canary_rollout through ansible-playbook against the lab's real control plane.

kube-apiserver 1.35 with Istio 1.30's CRDs and istiod's validating webhook (tests/support/cluster_fixtures.py): every
answer, resourceVersion, 403, 404 and 422 below is the real server's. Objects come from Istio's Bookinfo samples, in a
fresh namespace per test. The modules run as a ServiceAccount bound to exactly the Role that README.md documents
("RBAC the canary modules need"), so these tests also prove that Role is enough; what they cost is counted in the
API server's audit log under that ServiceAccount's name. Health in the canary_rollout tests comes from an ``http``
check against a local server the test switches (plus workload checks on a real Deployment that KWOK runs); the
Prometheus-based checks are proven end to end in test_mesh_lab_canary.py.
"""
import copy
import http.server
import json
import os
import threading
import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from ansible_collections.onprem.mesh.plugins.module_utils.k8s_client import IstioObjects, K8sError
from canary_cluster import ApiRelay, deployment, readme_role_rules, wait_for_deployment, without_verb  # pylint: disable=import-error
from cluster_fixtures import samples  # pylint: disable=import-error
from playbook_runner import ROOT, run_playbook  # pylint: disable=import-error

TARGET = os.path.join(ROOT, "tests", "integration", "targets", "canary_modules")
GROUP, VERSION = "networking.istio.io", "v1"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
ACCOUNT = "canary"  # the ServiceAccount the modules run as
# What kube-apiserver answers when a JSON patch's `test` operation fails (the object changed since it was read).
TEST_OP_REFUSED = "the server rejected our request due to an error in our request"


@pytest.fixture
def api(cluster):
    """Istio objects as the lab's admin (the tests' own reads and writes, not the module's)."""
    return client.CustomObjectsApi(cluster.api_client())


@pytest.fixture
def module_kubeconfig(cluster, ns, tmp_path):
    """A kubeconfig of ServiceAccount `canary` in ns, bound to exactly the README's Role."""
    return cluster.service_account_kubeconfig(ns, ACCOUNT, readme_role_rules(), str(tmp_path / "canary.kubeconfig"))


def module_user(ns):
    return "system:serviceaccount:%s:%s" % (ns, ACCOUNT)


def create(api_, objs, namespace):  # pylint: disable=redefined-outer-name
    for obj in objs:
        plural = obj["kind"].lower() + "s"
        api_.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj)


def bookinfo(api_, namespace, vs="virtual-service-reviews-90-10.yaml", rules=True):  # pylint: disable=redefined-outer-name
    """The Service reviews (a VirtualService for a host without one is what istiod's analysis reports on the object's
    status, again and again after every change; with it istiod leaves the status alone) and the samples."""
    core = client.CoreV1Api(api_.api_client)
    core.create_namespaced_service(namespace, {"metadata": {"name": "reviews", "labels": {"app": "reviews"}}, "spec": {
        "selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
    create(api_, samples(vs) + (samples("destination-rule-all.yaml") if rules else []), namespace)


def get_vs(api_, namespace, name="reviews"):  # pylint: disable=redefined-outer-name
    return api_.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualservices", name)


def weights(vs, index=0):
    return dict((d["destination"]["subset"], d.get("weight")) for d in vs["spec"]["http"][index]["route"])


def unchanged(now, before):
    """Spec, generation and annotations as before. (Not resourceVersion: istiod writes the status too.)"""
    return (now["spec"], now["metadata"]["generation"], now["metadata"].get("annotations")) == (
        before["spec"], before["metadata"]["generation"], before["metadata"].get("annotations"))


def module_calls(cluster, ns, mark):
    """{"get virtualservices": n, "patch virtualservices": n, ...}: what the module's ServiceAccount asked, per the
    API server's audit log, since `mark`."""
    return cluster.audit.counts(cluster.audit.events(since=mark, user=module_user(ns), namespace=ns))


def assert_calls_match(calls, api_calls):
    """The module's own count of its calls (api_calls: read, write) is what the server saw."""
    reads = calls.get("get virtualservices", 0) + calls.get("list destinationrules", 0)
    assert (reads, calls.get("patch virtualservices", 0)) == (api_calls["read"], api_calls["write"]), (calls, api_calls)


def split(kubeconfig, tmp_path, namespace, check=False, diff=False, **args):
    args = dict(args, kubeconfig=kubeconfig, namespace=namespace)
    return run_playbook(os.path.join(TARGET, "traffic_split.yml"), tmp_path, {"module_args": args}, check=check, diff=diff)


def test_traffic_split_changes_only_the_weights(cluster, ns, api, module_kubeconfig, tmp_path):
    bookinfo(api, ns)
    before = get_vs(api, ns)
    mark = cluster.audit.mark()
    rc, result, out = split(module_kubeconfig, tmp_path, ns, name="reviews", weights={"v1": 80, "v2": 20})
    assert rc == 0 and result["changed"], out
    assert result["weights_before"] == {"v1": 90, "v2": 10} and result["weights_after"] == {"v1": 80, "v2": 20}
    after = get_vs(api, ns)
    expected = copy.deepcopy(before["spec"])
    expected["http"][0]["route"][0]["weight"], expected["http"][0]["route"][1]["weight"] = 80, 20
    assert after["spec"] == expected
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    # the patch was a JSON patch that starts with a test of the route as read
    assert result["patch"][0]["op"] == "test" and result["api_calls"] == {"read": 2, "write": 1}
    # what the API server saw from the module's ServiceAccount: one read of each, one patch
    calls = module_calls(cluster, ns, mark)
    assert calls == {"get virtualservices": 1, "list destinationrules": 1, "patch virtualservices": 1,
                     "get": 1, "list": 1, "patch": 1, "total": 3}, calls
    # idempotent: reads only, the object untouched
    mark = cluster.audit.mark()
    rc, result, out = split(module_kubeconfig, tmp_path, ns, name="reviews", weights={"v1": 80, "v2": 20})
    assert rc == 0 and result["changed"] is False, out
    assert unchanged(get_vs(api, ns), after)
    calls = module_calls(cluster, ns, mark)
    assert "patch" not in calls and calls["total"] == 2, calls
    assert_calls_match(calls, result["api_calls"])


def test_check_mode_and_diff_change_nothing(cluster, ns, api, module_kubeconfig, tmp_path):
    bookinfo(api, ns)
    before = get_vs(api, ns)
    mark = cluster.audit.mark()
    rc, result, out = split(module_kubeconfig, tmp_path, ns, check=True, diff=True, name="reviews", weights={"v1": 50, "v2": 50})
    assert rc == 0 and result["changed"] and result["diff"]["after"] == {"weights": {"v1": 50, "v2": 50}}, out
    assert unchanged(get_vs(api, ns), before) and weights(get_vs(api, ns)) == {"v1": 90, "v2": 10}
    calls = module_calls(cluster, ns, mark)
    assert "patch" not in calls and calls["get virtualservices"] == 1, calls


def test_header_matched_route_stays_and_ambiguity_is_an_error(ns, api, module_kubeconfig, tmp_path):
    bookinfo(api, ns, "virtual-service-reviews-jason-v2-v3.yaml")
    before = get_vs(api, ns)
    rc, result, _out = split(module_kubeconfig, tmp_path, ns, name="reviews", weights={"v3": 50, "v1": 50})
    assert rc == 0 and result["failed"] and "ambiguous" in result["msg"] and "route_name or route_index" in result["msg"]
    rc, result, out = split(module_kubeconfig, tmp_path, ns, name="reviews", route_index=1, weights={"v3": 50, "v1": 50})
    assert rc == 0 and not result.get("failed"), out
    after = get_vs(api, ns)
    assert after["spec"]["http"][0] == before["spec"]["http"][0]
    assert after["spec"]["http"][1]["route"] == [{"destination": {"host": "reviews", "subset": "v3"}, "weight": 50},
                                                 {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50}]


@pytest.mark.parametrize("args, message", [
    (dict(weights={"v1": 90, "v2": 20}), "weights must sum to 100, they sum to 110"),
    (dict(weights={"v1": 95.5, "v2": 4.5}), "weights.v1: weight must be a whole number"),
    (dict(weights={"v1": -10, "v2": 110}), "must be between 0 and 100"),
    (dict(weights={"v1": 90, "v7": 10}), "subset v7 is not defined in the DestinationRule"),
    (dict(name="nope", weights={"v1": 100}), 'reading VirtualService {ns}/nope: HTTP 404 virtualservices.networking.istio.io "nope" not found'),
    (dict(route_name="missing", weights={"v1": 100}), "no HTTP route named 'missing'"),
], ids=["sum", "fraction", "range", "unknown-subset", "no-such-vs", "no-such-route"])
def test_bad_input_fails_and_leaves_the_object(cluster, ns, api, module_kubeconfig, tmp_path, args, message):
    bookinfo(api, ns)
    before = get_vs(api, ns)
    args = dict(dict(name="reviews"), **args)
    mark = cluster.audit.mark()
    rc, result, out = split(module_kubeconfig, tmp_path, ns, **args)
    assert rc == 0 and result["failed"] and message.format(ns=ns) in result["msg"], out
    assert unchanged(get_vs(api, ns), before)
    assert "patch" not in module_calls(cluster, ns, mark)


def test_missing_destination_rule_is_named(ns, api, module_kubeconfig, tmp_path):
    bookinfo(api, ns, rules=False)
    _rc, result, _out = split(module_kubeconfig, tmp_path, ns, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and "no DestinationRule in namespace %s has host reviews" % ns in result["msg"]


# -- RBAC: the README's Role is enough (every test here runs with it); one verb less says what is missing --------------

@pytest.mark.parametrize("group, resource, verb", [
    (GROUP, "virtualservices", "get"),
    (GROUP, "virtualservices", "patch"),
    (GROUP, "destinationrules", "list"),
])
def test_traffic_split_without_one_verb_of_the_readme_role_names_it(cluster, ns, api, tmp_path, group, resource, verb):
    bookinfo(api, ns)
    rules = without_verb(readme_role_rules(), resource, verb)
    kubeconfig = cluster.service_account_kubeconfig(ns, ACCOUNT, rules, str(tmp_path / "kc"))
    mark = cluster.audit.mark()
    _rc, result, out = split(kubeconfig, tmp_path, ns, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and "HTTP 403" in result["msg"], out
    # the server's own words name the user, the verb and the resource; the module adds where the verbs are listed
    assert ('User "%s" cannot %s resource "%s" in API group "%s" in the namespace "%s"'
            % (module_user(ns), verb, resource, group, ns)) in result["msg"], result["msg"]
    assert "lacks RBAC permission" in result["msg"] and "README" in result["msg"]
    assert weights(get_vs(api, ns)) == {"v1": 90, "v2": 10}
    refused = [e for e in cluster.audit.events(since=mark, user=module_user(ns), namespace=ns)
               if e["responseStatus"]["code"] == 403]
    assert [(e["verb"], e["objectRef"]["resource"]) for e in refused] == [(verb, resource)]


@pytest.mark.parametrize("resource, verb, check", [
    ("deployments", "get", "ready"),
    ("pods", "list", "restarts"),
])
def test_rollout_workload_checks_without_one_verb_of_the_readme_role_name_it(
        cluster, ns, api, health, tmp_path, resource, verb, check):
    bookinfo(api, ns)
    reviews_v2(cluster, ns)
    rules = without_verb(readme_role_rules(), resource, verb)
    kubeconfig = cluster.service_account_kubeconfig(ns, ACCOUNT, rules, str(tmp_path / "kc"))
    rc, result, out = rollout(kubeconfig, tmp_path, ns, health.url, canary_workload="reviews-v2", checks=WORKLOAD_CHECKS)
    assert rc == 0 and result["failed"] and result["result"] == "rolled_back", out
    failed = dict((c["name"], c) for c in result["timeline"][0]["checks"])[check]
    assert failed["verdict"] != "pass" and "Kubernetes API answered 403" in failed["reason"], failed
    assert 'User "%s" cannot %s resource "%s"' % (module_user(ns), verb, resource) in failed["reason"], failed
    assert weights(get_vs(api, ns)) == {"v1": 100, "v2": 0}


# -- concurrent writers ------------------------------------------------------------------------------------------

class Writer:
    """Another client (the lab's admin) patching the VirtualService in a bounded loop: an annotation and the timeout
    of the header-matched route http[0], never the route the module changes."""

    def __init__(self, api_, namespace, pause=0.05, max_writes=2000, max_seconds=180):  # pylint: disable=redefined-outer-name
        self.api = api_
        self.namespace = namespace
        self.pause, self.max_writes, self.max_seconds = pause, max_writes, max_seconds
        self.writes = 0
        self.errors = []
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="vs-writer", daemon=True)

    def _run(self):
        deadline = time.monotonic() + self.max_seconds
        for i in range(1, self.max_writes + 1):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            ops = [{"op": "add", "path": "/metadata/annotations", "value": {"example.com/writer": str(i)}},
                   {"op": "add", "path": "/spec/http/0/timeout", "value": "%ds" % i}]
            try:
                self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "virtualservices", "reviews", ops,
                                                        _content_type=JSON_PATCH)
            except ApiException as exc:
                self.errors.append((exc.status, exc.body))
                break
            with self.changed:
                self.writes = i
                self.changed.notify_all()
            self.stop.wait(self.pause)

    def wait_for_next_write(self, timeout=30):
        """Block until the writer has written once more (bounded)."""
        with self.changed:
            seen = self.writes
            self.changed.wait_for(lambda: self.writes > seen or not self.thread.is_alive(), timeout=timeout)
            assert self.writes > seen, "the writer did not write again within %d s" % timeout

    def __enter__(self):
        self.thread.start()
        with self.changed:
            self.changed.wait_for(lambda: self.writes >= 1 or not self.thread.is_alive(), timeout=30)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        return False


def ordered(events, user, verb, resource="virtualservices"):
    """Positions (in the audit log's order) of `user`'s `verb` requests on `resource`."""
    return [i for i, e in enumerate(events)
            if e["user"]["username"] == user and e["verb"] == verb and e["objectRef"].get("resource") == resource]


def test_a_concurrent_writer_of_other_fields_neither_conflicts_nor_is_lost(cluster, ns, api, module_kubeconfig, tmp_path):
    """A writer thread changes an annotation and another route's timeout all the time, and (through the relay) once
    exactly between the module's read and its patch. The module's test op covers only its own route, so the real
    server takes its patch at the first attempt, and applies it to the object as it is then: nothing is lost."""
    bookinfo(api, ns, "virtual-service-reviews-jason-v2-v3.yaml")
    before = get_vs(api, ns)
    with ApiRelay(cluster.url, cluster.ca_file) as relay, Writer(api, ns) as writer:
        relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, writer.wait_for_next_write)
        kubeconfig = relay.kubeconfig(module_kubeconfig, tmp_path / "relayed.kubeconfig")
        mark = cluster.audit.mark()
        rc, result, out = split(kubeconfig, tmp_path, ns, name="reviews", route_index=1, weights={"v3": 60, "v1": 40})
        writer.wait_for_next_write()  # still writing after the module finished
    assert relay.fired == 1 and not relay.errors and not writer.errors, (relay.errors, writer.errors)
    assert rc == 0 and result["changed"] and result["attempts"] == 1, out
    after = get_vs(api, ns)
    assert after["spec"]["http"][1]["route"] == [{"destination": {"host": "reviews", "subset": "v3"}, "weight": 60},
                                                 {"destination": {"host": "reviews", "subset": "v1"}, "weight": 40}]
    # the writer's last values, and the header route otherwise as it was
    assert after["metadata"]["annotations"]["example.com/writer"] == str(writer.writes)
    assert after["spec"]["http"][0] == dict(before["spec"]["http"][0], timeout="%ds" % writer.writes)
    # the audit log shows the writer's patches before, between the module's read and its patch, and after
    events = cluster.audit.events(since=mark, namespace=ns)
    reads, patches = ordered(events, module_user(ns), "get"), ordered(events, module_user(ns), "patch")
    theirs = ordered(events, "lab-admin", "patch")
    assert len(reads) == 1 and len(patches) == 1 and events[patches[0]]["responseStatus"]["code"] == 200, events
    assert any(reads[0] < i < patches[0] for i in theirs) and any(i > patches[0] for i in theirs), (reads, patches, theirs)


def test_a_change_to_the_route_between_read_and_patch_is_refused_then_retried_on_a_fresh_read(cluster, ns, api, module_kubeconfig, tmp_path):
    """Another client sets the weights between the module's read and its patch: the server refuses the module's
    patch (its test of the route as read fails, HTTP 422 without causes), so nothing is mixed; the module takes that
    for a conflict, reads again, rebuilds its patch from what it finds and sends it once more."""
    bookinfo(api, ns)

    def operator_sets_85_15():
        ops = [{"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 85},
               {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 15}]
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", ops, _content_type=JSON_PATCH)

    with ApiRelay(cluster.url, cluster.ca_file) as relay:
        relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, operator_sets_85_15)
        kubeconfig = relay.kubeconfig(module_kubeconfig, tmp_path / "relayed.kubeconfig")
        mark = cluster.audit.mark()
        rc, result, out = split(kubeconfig, tmp_path, ns, name="reviews", weights={"v1": 75, "v2": 25})
    assert relay.fired == 1 and not relay.errors, relay.errors
    assert rc == 0 and not result.get("failed") and result["changed"] and result["attempts"] == 2, out
    # the second attempt was built on the operator's weights, and set the module's
    assert result["weights_before"] == {"v1": 85, "v2": 15} and weights(get_vs(api, ns)) == {"v1": 75, "v2": 25}
    assert result["patch"][0] == {"op": "test", "path": "/spec/http/0/route", "value": [
        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 85}, {"destination": {"host": "reviews", "subset": "v2"}, "weight": 15}]}
    events = cluster.audit.events(since=mark, user=module_user(ns), namespace=ns)
    assert [(e["verb"], e["responseStatus"]["code"]) for e in events if e["objectRef"].get("resource") == "virtualservices"] == [
        ("get", 200), ("patch", 422), ("get", 200), ("patch", 200)], events
    assert_calls_match(module_calls(cluster, ns, mark), result["api_calls"])


def test_the_real_answer_to_a_failed_test_op_and_to_a_stale_resource_version(cluster, ns, api):
    """What the modules' guards meet on kube-apiserver 1.35: a failed JSON-patch `test` is HTTP 422 with reason
    Invalid, a generic message and no causes; a schema error is 422 with causes; a stale metadata.resourceVersion in a
    patch is 409. The modules' client (IstioObjects) takes the first and the last for conflicts, the schema error not."""
    bookinfo(api, ns)
    vs = get_vs(api, ns)
    stale_route = copy.deepcopy(vs["spec"]["http"][0]["route"])
    stale_route[0]["weight"] = 91
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", [
            {"op": "test", "path": "/spec/http/0/route", "value": stale_route},
            {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 80}], _content_type=JSON_PATCH)
    body = json.loads(err.value.body)
    assert err.value.status == 422 and body["reason"] == "Invalid" and body["message"] == TEST_OP_REFUSED, body
    assert not (body.get("details") or {}).get("causes"), body
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", [
            {"op": "test", "path": "/metadata/resourceVersion", "value": str(int(vs["metadata"]["resourceVersion"]) - 1)},
            {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}], _content_type=JSON_PATCH)
    assert err.value.status == 422 and json.loads(err.value.body)["message"] == TEST_OP_REFUSED
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", [
            {"op": "replace", "path": "/metadata/resourceVersion", "value": str(int(vs["metadata"]["resourceVersion"]) - 1)},
            {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}], _content_type=JSON_PATCH)
    assert err.value.status == 409 and "the object has been modified" in json.loads(err.value.body)["message"]
    assert unchanged(get_vs(api, ns), vs)

    # the same answers through the modules' own client
    store = IstioObjects(cluster.api_client())
    route = vs["spec"]["http"][0]["route"]
    with pytest.raises(K8sError) as err:
        store.json_patch("virtualservices", ns, "reviews", [{"op": "test", "path": "/spec/http/0/route", "value": stale_route},
                                                            {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 80}])
    assert err.value.status == 422 and err.value.guarded and err.value.is_conflict, err.value.body
    with pytest.raises(K8sError) as err:  # a schema error on a guarded patch (the test passes): causes, no conflict
        store.json_patch("virtualservices", ns, "reviews", [{"op": "test", "path": "/spec/http/0/route", "value": route},
                                                            {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": "ninety"}])
    causes = err.value.body["details"]["causes"]
    assert err.value.status == 422 and err.value.guarded and not err.value.is_conflict, err.value.body
    assert causes[0]["field"] == "spec.http[0].route[0].weight" and "must be of type integer" in causes[0]["message"], causes
    with pytest.raises(K8sError) as err:
        store.json_patch("virtualservices", ns, "reviews", [
            {"op": "replace", "path": "/metadata/resourceVersion", "value": str(int(vs["metadata"]["resourceVersion"]) - 1)},
            {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}])
    assert err.value.status == 409 and err.value.is_conflict
    assert unchanged(get_vs(api, ns), vs)


def test_a_test_against_null_holds_an_annotation_to_its_absence(ns, api):
    """How the rollout tests its annotations (traffic.annotation_tests), on the real server: a `test` against null
    passes for a missing key and fails for a present one; with no annotations at all, for the missing map."""
    bookinfo(api, ns)
    vs = get_vs(api, ns)
    assert "annotations" not in vs["metadata"], vs["metadata"]

    def patch(ops):
        return api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", ops, _content_type=JSON_PATCH)

    patch([{"op": "test", "path": "/metadata/annotations", "value": None}, {"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}}])
    for path in ("/metadata/annotations", "/metadata/annotations/a"):
        with pytest.raises(ApiException) as err:
            patch([{"op": "test", "path": path, "value": None}, {"op": "add", "path": "/metadata/annotations/b", "value": "2"}])
        assert err.value.status == 422 and json.loads(err.value.body)["message"] == TEST_OP_REFUSED
    patch([{"op": "test", "path": "/metadata/annotations/b", "value": None}, {"op": "test", "path": "/metadata/annotations/a", "value": "1"},
           {"op": "add", "path": "/metadata/annotations/b", "value": "2"}])
    assert get_vs(api, ns)["metadata"]["annotations"] == {"a": "1", "b": "2"}


def test_a_missing_namespace_is_named_not_the_virtualservice(cluster, ns, api, module_kubeconfig, tmp_path):
    """With credentials that may read namespaces (the lab's admin), a missing namespace is said to be missing. The
    README's Role is a Role in one namespace: elsewhere it grants nothing, so the server answers 403, and the message
    says to check that the namespace exists too."""
    bookinfo(api, ns)
    missing = ns + "-gone"
    _rc, result, out = split(cluster.kubeconfig, tmp_path, missing, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and result["msg"].startswith("namespace: namespace %s does not exist" % missing), out
    assert "VirtualService %s/reviews answered HTTP 404" % missing in result["msg"]
    _rc, result, out = split(cluster.kubeconfig, tmp_path, ns, name="nope", weights={"v1": 50, "v2": 50})
    assert result["failed"] and 'HTTP 404 virtualservices.networking.istio.io "nope" not found' in result["msg"], out
    assert "does not exist" not in result["msg"] and "not known" not in result["msg"]
    _rc, result, out = split(module_kubeconfig, tmp_path, missing, name="reviews", weights={"v1": 50, "v2": 50})
    assert result["failed"] and "HTTP 403" in result["msg"] and "check that the namespace exists" in result["msg"], out
    assert "lacks RBAC permission to get virtualservices.networking.istio.io in namespace %s" % missing in result["msg"]


def test_tls_is_verified_by_default(cluster, ns, api, tmp_path):
    bookinfo(api, ns)
    args = dict(name="reviews", namespace=ns, weights={"v1": 85, "v2": 15}, api_key=cluster.admin_token, host=cluster.url)
    run = os.path.join(TARGET, "traffic_split.yml")
    _rc, result, _out = run_playbook(run, tmp_path, {"module_args": args})
    assert result["failed"] and "could not be reached" in result["msg"] and "CERTIFICATE_VERIFY_FAILED" in result["msg"]
    assert weights(get_vs(api, ns)) == {"v1": 90, "v2": 10}
    rc, result, out = run_playbook(run, tmp_path, {"module_args": dict(args, ca_cert=cluster.ca_file)})
    assert rc == 0 and result["changed"], out
    assert weights(get_vs(api, ns)) == {"v1": 85, "v2": 15}


# -- canary_rollout ----------------------------------------------------------------------------------------------

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


WORKLOAD_CHECKS = [{"name": "ready", "type": "workload_ready"}, {"name": "restarts", "type": "no_restarts"}]


def reviews_v2(cluster, ns):
    """The canary's Deployment, rolled out by the controller-manager and run by KWOK (2/2 available)."""
    apps = client.AppsV1Api(cluster.api_client())
    apps.create_namespaced_deployment(ns, deployment("reviews-v2", replicas=2, labels={"version": "v2"}))
    return wait_for_deployment(apps, ns, "reviews-v2", available=2, updated=2)


def rollout(kubeconfig, tmp_path, namespace, health_url, check=False, checks=(), **args):
    base = dict(name="reviews", namespace=namespace, stable="v1", canary="v2", steps=[10, 50, 100], interval="1s",
                kubeconfig=kubeconfig, checks=[{"name": "smoke", "type": "http", "url": health_url}] + list(checks),
                retry_inconclusive_for=0)
    base.update(args)
    return run_playbook(os.path.join(TARGET, "canary_rollout.yml"), tmp_path, {"module_args": base}, check=check)


def test_rollout_promotes_a_healthy_canary(cluster, ns, api, module_kubeconfig, health, tmp_path):
    bookinfo(api, ns)
    reviews_v2(cluster, ns)
    mark = cluster.audit.mark()
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url, canary_workload="reviews-v2", checks=WORKLOAD_CHECKS)
    assert rc == 0 and result["result"] == "promoted", out
    assert weights(get_vs(api, ns)) == {"v1": 0, "v2": 100}
    assert [e["weight"] for e in result["timeline"]] == [10, 50, 100]
    checks = dict((c["name"], c) for c in result["timeline"][0]["checks"])
    assert [checks[n]["verdict"] for n in ("smoke", "ready", "restarts")] == ["pass"] * 3, checks
    assert checks["ready"]["value"] == 2 and "2/2 replicas available" in checks["ready"]["reason"]
    # one write per step and the promotion, as the audit log of the module's ServiceAccount shows
    calls = module_calls(cluster, ns, mark)
    assert calls["patch virtualservices"] == 3 and calls["patch"] == 3, calls
    assert_calls_match(calls, result["api_calls"])
    # the workload checks read with the Role's apps and core rules, once per step or more
    assert calls["get deployments"] >= 2 and calls["list pods"] >= 2, calls
    annotations = get_vs(api, ns)["metadata"]["annotations"]
    assert json.loads(annotations["mesh.onprem.io/canary-rollout"])["phase"] == "promoted"
    assert "mesh.onprem.io/canary-lease" not in annotations


def test_rollout_rolls_back_an_unhealthy_canary(cluster, ns, api, module_kubeconfig, health, tmp_path):
    bookinfo(api, ns)
    health.handler.status = 500
    mark = cluster.audit.mark()
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url)
    assert rc == 0 and result["failed"] and result["result"] == "rolled_back", out
    assert "canary v2 rolled back: step 1 (weight 10)" in result["msg"]
    assert weights(get_vs(api, ns)) == {"v1": 100, "v2": 0}
    calls = module_calls(cluster, ns, mark)
    assert calls["patch virtualservices"] == 2, calls  # step 1, then the rollback
    assert_calls_match(calls, result["api_calls"])


def test_rollout_check_mode_plans_only(cluster, ns, api, module_kubeconfig, health, tmp_path):
    bookinfo(api, ns)
    before = get_vs(api, ns)
    mark = cluster.audit.mark()
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url, check=True, steps=[5, 10, 25, 50, 100], interval="2m")
    assert rc == 0 and result["result"] == "planned" and result["planned_seconds"] == 480, out
    assert [s["weight"] for s in result["schedule"]] == [5, 10, 25, 50, 100]
    assert unchanged(get_vs(api, ns), before)
    assert "patch" not in module_calls(cluster, ns, mark)


def test_rollout_refuses_while_another_holds_the_lease_and_resumes_a_recorded_step(ns, api, module_kubeconfig, health, tmp_path):
    bookinfo(api, ns)
    vs = get_vs(api, ns)
    state = {"canary": "v2", "stable": "v1", "plan": [10, 50], "step": 1, "phase": "progressing", "failures": 0}
    lease = {"holder": "awx-job-41", "expires": time.time() + 600}
    api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews",
                                       {"metadata": {"annotations": {"mesh.onprem.io/canary-rollout": json.dumps(state),
                                                                     "mesh.onprem.io/canary-lease": json.dumps(lease)}}},
                                       _content_type=MERGE_PATCH)
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url)
    assert rc == 0 and result["failed"] and "held by another rollout (awx-job-41)" in result["msg"], out
    assert get_vs(api, ns)["spec"] == vs["spec"]
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url, force=True)
    assert rc == 0 and result["result"] == "promoted", out
    assert "resuming progressing at step 2 (weight 50)" in result["note"]
    assert [e["weight"] for e in result["timeline"]] == [50, 100]


HEADER_ROUTE = {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}]}


def two_routes(api_, namespace):  # pylint: disable=redefined-outer-name
    """Bookinfo's 90/10 VirtualService with a header-matched route in front of the weighted one, named primary."""
    bookinfo(api_, namespace)
    ops = [{"op": "add", "path": "/spec/http/0/name", "value": "primary"}, {"op": "add", "path": "/spec/http/0", "value": HEADER_ROUTE}]
    api_.patch_namespaced_custom_object(GROUP, VERSION, namespace, "virtualservices", "reviews", ops, _content_type=JSON_PATCH)
    return get_vs(api_, namespace)


def patch_answers(cluster, ns, mark):
    return [e["responseStatus"]["code"] for e in cluster.audit.events(since=mark, user=module_user(ns), namespace=ns) if e["verb"] == "patch"]


def test_rollout_promotes_past_a_concurrent_writer_of_another_route_and_keeps_its_changes(
        cluster, ns, api, module_kubeconfig, health, tmp_path):
    """Another client changes the timeout of the other route and an annotation of its own right before each of the
    rollout's first three writes (the relay holds each write until that change is done). The VirtualService had no
    annotations: the first write tests that and is refused (HTTP 422), read again, rebuilt and sent again; the
    writes after it test only the rollout's own annotations and the target route, so the other client's changes
    cost them nothing. The rollout promotes and every change of the other client is still there."""
    before = two_routes(api, ns)
    assert "annotations" not in before["metadata"]
    count = {"n": 0}

    def someone_else():
        count["n"] += 1
        ops = [{"op": "add", "path": "/spec/http/0/timeout", "value": "%ds" % count["n"]}]
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", ops, _content_type=JSON_PATCH)
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews",
                                           {"metadata": {"annotations": {"example.com/owner": "team-b-%d" % count["n"]}}},
                                           _content_type=MERGE_PATCH)

    with ApiRelay(cluster.url, cluster.ca_file) as relay:
        relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, someone_else, times=3)
        kubeconfig = relay.kubeconfig(module_kubeconfig, tmp_path / "relayed.kubeconfig")
        mark = cluster.audit.mark()
        rc, result, out = rollout(kubeconfig, tmp_path, ns, health.url, route_name="primary")
    assert relay.fired == 3 and not relay.errors, relay.errors
    assert rc == 0 and not result.get("failed") and result["result"] == "promoted", out
    # step 1 refused once (its test of the missing annotations met the other client's), then step 1, step 2, promotion
    assert patch_answers(cluster, ns, mark) == [422, 200, 200, 200]
    assert result["timeline"][0]["conflicts"] == 1 and all("conflicts" not in e for e in result["timeline"][1:]), result["timeline"]
    vs = get_vs(api, ns)
    assert weights(vs, 1) == {"v1": 0, "v2": 100}
    assert vs["spec"]["http"][0] == dict(HEADER_ROUTE, timeout="3s") and vs["metadata"]["annotations"]["example.com/owner"] == "team-b-3"
    assert json.loads(vs["metadata"]["annotations"]["mesh.onprem.io/canary-rollout"])["phase"] == "promoted"
    assert_calls_match(module_calls(cluster, ns, mark), result["api_calls"])


@pytest.mark.parametrize("on_failure", ["rollback", "hold"])
def test_rollout_stops_when_another_client_changes_the_target_weights_and_says_so(
        cluster, ns, api, module_kubeconfig, health, tmp_path, on_failure):
    """An operator sets the target route's weights to 70/30 between the rollout's read and its write of step 2. The
    real server refuses the write (its test of the route fails, HTTP 422); the rollout reads again, finds weights it
    did not write, stops, names the field with what it found and what it had written, and follows on_failure:
    rollback puts all traffic on v1, hold keeps the operator's weights."""
    bookinfo(api, ns)

    def operator_sets_70_30():
        ops = [{"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 70},
               {"op": "replace", "path": "/spec/http/0/route/1/weight", "value": 30}]
        api.patch_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews", ops, _content_type=JSON_PATCH)

    with ApiRelay(cluster.url, cluster.ca_file) as relay:
        relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, operator_sets_70_30, skip=1)
        kubeconfig = relay.kubeconfig(module_kubeconfig, tmp_path / "relayed.kubeconfig")
        mark = cluster.audit.mark()
        rc, result, out = rollout(kubeconfig, tmp_path, ns, health.url, on_failure=on_failure)
    assert relay.fired == 1 and not relay.errors, relay.errors
    assert patch_answers(cluster, ns, mark) == [200, 422, 200]  # step 1, step 2 refused, the rollback or hold
    field = "the weights of the target route http[0] (spec.http[0].route[].weight)"
    assert rc == 0 and result["failed"] and result["result"] == ("rolled_back" if on_failure == "rollback" else "held"), out
    assert result["reason"] == ("another client changed VirtualService %s/reviews while the rollout ran: %s: found v1=70, v2=30,"
                                " the rollout had written v1=90, v2=10" % (ns, field)), result["reason"]
    expected = {"v1": 100, "v2": 0} if on_failure == "rollback" else {"v1": 70, "v2": 30}
    assert result["msg"].endswith("; traffic now %s" % ", ".join("%s=%d" % kv for kv in sorted(expected.items()))), result["msg"]
    assert result["weights_after"] == expected and weights(get_vs(api, ns)) == expected
    step2 = result["timeline"][1]
    assert step2["action"] == on_failure and step2["concurrent_change"] == [{"field": field, "found": "v1=70, v2=30", "expected": "v1=90, v2=10"}]
    annotations = get_vs(api, ns)["metadata"]["annotations"]
    state = json.loads(annotations["mesh.onprem.io/canary-rollout"])
    assert state["phase"] == result["result"] and state["reason"] == result["reason"]
    assert "mesh.onprem.io/canary-lease" not in annotations
    assert_calls_match(module_calls(cluster, ns, mark), result["api_calls"])


def test_rollout_that_loses_its_patch_permission_says_the_canary_keeps_its_share(
        cluster, ns, api, module_kubeconfig, health, tmp_path):
    """The Role loses `patch` on virtualservices between step 1 and step 2 (RBAC changed by an admin, seen by the
    authorizer before the write goes on). Neither step 2 nor the rollback can be written: the task fails saying that
    the canary still gets 10 %, which verb on which resource is missing, and returns result, timeline and weights."""
    bookinfo(api, ns)
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    authz = client.AuthorizationV1Api(cluster.api_client())

    def revoke_patch():
        rbac.patch_namespaced_role(ACCOUNT, ns, {"rules": without_verb(readme_role_rules(), "virtualservices", "patch")})
        review = {"spec": {"user": module_user(ns), "resourceAttributes": {"namespace": ns, "verb": "patch", "group": GROUP,
                                                                           "resource": "virtualservices", "name": "reviews"}}}
        for dummy in range(100):  # bounded: until the authorizer has the new Role
            if not authz.create_subject_access_review(review).status.allowed:
                return
            time.sleep(0.1)
        raise AssertionError("the authorizer still allows patch after 10 s")

    with ApiRelay(cluster.url, cluster.ca_file) as relay:
        relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, revoke_patch, skip=1)
        kubeconfig = relay.kubeconfig(module_kubeconfig, tmp_path / "relayed.kubeconfig")
        mark = cluster.audit.mark()
        rc, result, out = rollout(kubeconfig, tmp_path, ns, health.url)
    assert relay.fired == 1 and not relay.errors, relay.errors
    assert patch_answers(cluster, ns, mark) == [200, 403, 403]  # step 1, step 2 refused, the rollback refused
    assert rc == 0 and result["failed"] and result["result"] == "stopped", out
    msg = result["msg"]
    assert msg.startswith("canary v2 still gets 10 %% of the traffic (weights in force: v1=90, v2=10): the rollout stopped on an error at"
                          " step 2 (weight 50): patching virtualservices %s/reviews: HTTP 403 " % ns), msg
    assert 'User "%s" cannot patch resource "virtualservices" in API group "%s"' % (module_user(ns), GROUP) in msg
    assert "lacks RBAC permission to patch virtualservices.networking.istio.io in namespace %s" % ns in msg
    assert "the rollback that should have followed was not written: it was refused the same way (HTTP 403)" in msg
    assert result["weights_after"] == {"v1": 90, "v2": 10} and weights(get_vs(api, ns)) == {"v1": 90, "v2": 10}
    assert [e["action"] for e in result["timeline"]] == ["advance", "stopped"], result["timeline"]
    assert_calls_match(module_calls(cluster, ns, mark), result["api_calls"])


def test_rollout_names_an_unknown_canary_under_canary(ns, api, module_kubeconfig, health, tmp_path):
    bookinfo(api, ns)
    rc, result, out = rollout(module_kubeconfig, tmp_path, ns, health.url, canary="v9")
    assert rc == 0 and result["failed"] and result["result"] == "not_started", out
    assert result["msg"].startswith("canary: subset v9 is not defined in the DestinationRule for host reviews (defined: v1, v2, v3)"), result["msg"]
    assert result["msg"].endswith("this run wrote nothing: traffic stays v1=90, v2=10 (canary v9 gets 0 % of it)")
    assert result["weights_after"] == {"v1": 90, "v2": 10} and weights(get_vs(api, ns)) == {"v1": 90, "v2": 10}
