"""The test Kubernetes API (tests/support/k8s_double, a TEST DOUBLE) answers like the real kube-apiserver.

Driven with the real kubectl (1.32) and the official python `kubernetes` client; each test pins a status code, a
message or a field that the real server produces, so a drift of the double fails here.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import ssl
import urllib.parse
from http.client import HTTPConnection, HTTPSConnection

import pytest
import yaml

from k8s_double import BANNER, istio_data_dir, start  # pylint: disable=import-error

# pylint: disable=redefined-outer-name  # pytest fixtures

# Fixtures (k8s_double, k8s_double_tls, k8s_double_client, k8s_double_kubeconfig, istio_crds) come from
# k8s_double.pytest_plugin, imported by tests/integration/conftest.py.
KUBECTL = shutil.which("kubectl")
GROUP, VERSION, VS = "networking.istio.io", "v1", "virtualservices"
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="the kubectl client is not installed")


def samples(name):
    data = istio_data_dir()
    if not data:
        pytest.skip("Istio reference data not found: set ONPREM_MESH_ISTIO_DATA or provide ../shared/istio")
    return os.path.join(data, "samples", name)


def vs_body(name="reviews", weights=(80, 20), **extra):
    routes = [{"destination": {"host": "reviews", "subset": f"v{i + 1}"}, "weight": w} for i, w in enumerate(weights)]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualService", "metadata": {"name": name},
            "spec": {"hosts": ["reviews"], "http": [{"route": routes}]}}
    body.update(extra)
    return body


class Kubectl:  # pylint: disable=too-few-public-methods
    """The real kubectl against one kubeconfig, with a private discovery cache."""

    def __init__(self, kubeconfig, cache_dir):
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir

    def __call__(self, *args, stdin=None, check=False):
        proc = subprocess.run([KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", "--request-timeout=20s", *args],
                              input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def json(self, *args):
        return json.loads(self("get", *args, "-o", "json", check=True).stdout)


@pytest.fixture
def kubectl(k8s_double_tls, tmp_path):
    return Kubectl(k8s_double_tls.kubeconfig, str(tmp_path / "kube-cache"))


@pytest.fixture
def custom(k8s_double, k8s_double_client):
    from kubernetes import client  # pylint: disable=import-outside-toplevel
    return client.CustomObjectsApi(k8s_double_client(k8s_double))


def http(handle, method, path, body=None, token=None, content_type="application/json"):  # pylint: disable=too-many-arguments,too-many-positional-arguments
    """A raw request (token=False: none): (status, headers, decoded body). Over HTTPS when the double serves TLS."""
    split = urllib.parse.urlsplit(handle.url)
    if split.scheme == "https":
        conn = HTTPSConnection(split.hostname, split.port, timeout=10, context=ssl.create_default_context(cafile=handle.ca_file))
    else:
        conn = HTTPConnection(split.hostname, split.port, timeout=10)
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {} if token is False else {"Authorization": f"Bearer {token or handle.token}"}
    if data is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, json.loads(response.read() or b"null")
    finally:
        conn.close()


def api_exception(call, *args, **kwargs):
    from kubernetes.client.rest import ApiException  # pylint: disable=import-outside-toplevel
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body)


# ------------------------------------------------------------------------------------------------ discovery
def test_discovery_documents_carry_short_names_verbs_and_every_served_version(k8s_double):
    code, headers, group = http(k8s_double, "GET", "/apis/networking.istio.io")
    assert code == 200 and headers["X-Test-Double"] == BANNER
    assert [v["version"] for v in group["versions"]] == ["v1", "v1beta1", "v1alpha3"]
    assert group["preferredVersion"]["version"] == "v1"
    code, _headers, resources = http(k8s_double, "GET", "/apis/networking.istio.io/v1")
    by_name = {r["name"]: r for r in resources["resources"]}
    assert resources["kind"] == "APIResourceList" and resources["groupVersion"] == "networking.istio.io/v1"
    assert by_name["virtualservices"]["shortNames"] == ["vs"] and by_name["destinationrules"]["shortNames"] == ["dr"]
    assert by_name["virtualservices"]["namespaced"] is True and by_name["virtualservices"]["kind"] == "VirtualService"
    assert set(by_name["virtualservices"]["verbs"]) >= {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert by_name["virtualservices/status"]["verbs"] == ["get", "patch", "update"]
    assert http(k8s_double, "GET", "/apis/security.istio.io/v1")[2]["resources"][0]["name"] == "authorizationpolicies"
    assert http(k8s_double, "GET", "/apis/networking.istio.io/v2")[0] == 404
    code, _headers, version = http(k8s_double, "GET", "/version", token=False)
    assert code == 200 and version["major"] == "1" and version["minor"] == "32"


@needs_kubectl
def test_kubectl_api_resources_lists_istio_short_names(kubectl):
    out = kubectl("api-resources", "--api-group=networking.istio.io", "-o", "wide", check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["virtualservices"][1] == "vs" and rows["destinationrules"][1] == "dr"


# ------------------------------------------------------------------------------------------------ kubectl
@needs_kubectl
def test_kubectl_apply_and_create_bookinfo_samples(kubectl, k8s_double_tls):
    out = kubectl("apply", "-f", samples("destination-rule-all.yaml"), check=True).stdout
    assert out.count("created") == 4
    assert "virtualservice.networking.istio.io/reviews created" in kubectl("create", "-f", samples("virtual-service-reviews-80-20.yaml"),
                                                                           check=True).stdout
    again = kubectl("create", "-f", samples("virtual-service-reviews-80-20.yaml"))
    assert again.returncode != 0
    assert 'Error from server (AlreadyExists): error when creating' in again.stderr
    assert 'virtualservices.networking.istio.io "reviews" already exists' in again.stderr
    assert "configured" in kubectl("apply", "-f", samples("virtual-service-reviews-90-10.yaml"), check=True).stdout
    obj = kubectl.json("vs", "reviews")
    assert [r["weight"] for r in obj["spec"]["http"][0]["route"]] == [90, 10]
    assert obj["metadata"]["generation"] == 2 and obj["metadata"]["namespace"] == "default"
    rv = obj["metadata"]["resourceVersion"]
    assert "unchanged" in kubectl("apply", "-f", samples("virtual-service-reviews-90-10.yaml"), check=True).stdout
    assert kubectl.json("vs", "reviews")["metadata"]["resourceVersion"] == rv
    kubectl("apply", "-f", samples("virtual-service-reviews-jason-v2-v3.yaml"), check=True)
    assert kubectl.json("vs", "reviews")["spec"]["http"][0]["match"][0]["headers"]["end-user"]["exact"] == "jason"
    # kubectl found fieldValidation in the OpenAPI v3 document and asked the server to validate strictly
    patches = [r for r in k8s_double_tls.requests() if r.get("verb") == "patch" and r["resource"] == VS]
    assert patches and all("fieldValidation=Strict" in r["path"] for r in patches)
    assert {r["contentType"] for r in patches} == {"application/merge-patch+json"}
    assert len(kubectl.json("dr")["items"]) == 4


@needs_kubectl
def test_kubectl_json_patch_with_failing_test_op_is_rejected_like_the_real_server(kubectl):
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    bad = json.dumps([{"op": "test", "path": "/spec/http/0/route/0/weight", "value": 50},
                      {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 60}])
    proc = kubectl("patch", "vs", "reviews", "--type=json", "-p", bad)
    assert proc.returncode != 0
    assert "The request is invalid: the server rejected our request due to an error in our request" in proc.stderr
    missing = kubectl("patch", "vs", "reviews", "--type=json", "-p", json.dumps([{"op": "remove", "path": "/spec/tcp"}]))
    assert missing.returncode != 0 and "the server rejected our request due to an error in our request" in missing.stderr
    assert kubectl.json("vs", "reviews")["spec"]["http"][0]["route"][0]["weight"] == 80
    good = json.dumps([{"op": "test", "path": "/spec/http/0/route/0/weight", "value": 80},
                       {"op": "replace", "path": "/spec/http/0/route/0/weight", "value": 60}])
    assert "patched" in kubectl("patch", "vs", "reviews", "--type=json", "-p", good, check=True).stdout
    assert kubectl.json("vs", "reviews")["spec"]["http"][0]["route"][0]["weight"] == 60


@needs_kubectl
def test_kubectl_merge_patch_changes_spec_and_generation(kubectl):
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    patch = {"spec": {"http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                                          {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50}]}]}}
    assert "patched" in kubectl("patch", "vs", "reviews", "--type=merge", "-p", json.dumps(patch), check=True).stdout
    obj = kubectl.json("vs", "reviews")
    assert [r["weight"] for r in obj["spec"]["http"][0]["route"]] == [50, 50] and obj["metadata"]["generation"] == 2
    assert "(no change)" in kubectl("patch", "vs", "reviews", "--type=merge", "-p", json.dumps(patch), check=True).stdout


@needs_kubectl
def test_kubectl_strategic_patch_of_a_custom_resource_is_415(kubectl, k8s_double_tls):
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    proc = kubectl("patch", "vs", "reviews", "--type=strategic", "-p", '{"spec":{"hosts":["other"]}}')
    assert proc.returncode != 0
    assert ("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, "
            "application/merge-patch+json, application/apply-patch+yaml") in proc.stderr
    assert [r["code"] for r in k8s_double_tls.requests() if r.get("verb") == "patch"][-1] == 415
    assert kubectl.json("vs", "reviews")["spec"]["hosts"] == ["reviews"]


@needs_kubectl
def test_kubectl_label_and_annotate_a_namespace(kubectl, k8s_double_tls):
    kubectl("create", "namespace", "bookinfo", check=True)
    assert "labeled" in kubectl("label", "namespace", "bookinfo", "istio-injection=enabled", check=True).stdout
    assert "annotated" in kubectl("annotate", "namespace", "bookinfo", "owner=canary", check=True).stdout
    meta = kubectl.json("namespace", "bookinfo")["metadata"]
    assert meta["labels"] == {"istio-injection": "enabled", "kubernetes.io/metadata.name": "bookinfo"}
    assert meta["annotations"] == {"owner": "canary"}
    kinds = {r["contentType"] for r in k8s_double_tls.requests() if r.get("verb") == "patch" and r["resource"] == "namespaces"}
    assert kinds == {"application/merge-patch+json"}  # kubectl label/annotate send merge patches
    overwrite = kubectl("label", "namespace", "bookinfo", "istio-injection=disabled")
    assert overwrite.returncode != 0 and "already has a value (enabled)" in overwrite.stderr
    assert "unlabeled" in kubectl("label", "namespace", "bookinfo", "istio-injection-", check=True).stdout


@needs_kubectl
def test_kubectl_delete_and_not_found(kubectl):
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    assert 'virtualservice.networking.istio.io "reviews" deleted' in kubectl("delete", "vs", "reviews", check=True).stdout
    gone = kubectl("get", "vs", "reviews")
    assert gone.returncode != 0
    assert 'Error from server (NotFound): virtualservices.networking.istio.io "reviews" not found' in gone.stderr
    again = kubectl("delete", "vs", "reviews")
    assert again.returncode != 0 and 'virtualservices.networking.istio.io "reviews" not found' in again.stderr
    missing_ns = kubectl("create", "-n", "nowhere", "-f", samples("virtual-service-reviews-80-20.yaml"))
    assert missing_ns.returncode != 0 and 'namespaces "nowhere" not found' in missing_ns.stderr
    assert kubectl.json("vs", "-n", "nowhere")["items"] == []


@needs_kubectl
def test_kubectl_restricted_token_gets_403_and_unknown_token_401(k8s_double_tls, k8s_double_kubeconfig, tmp_path):
    Kubectl(k8s_double_tls.kubeconfig, str(tmp_path / "c0"))("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    k8s_double_tls.add_token("reader-token", "reader", rules=[{
        "apiGroups": ["networking.istio.io"], "resources": ["virtualservices"], "verbs": ["get", "list"], "namespaces": ["default"]}])
    reader = Kubectl(k8s_double_kubeconfig(k8s_double_tls, token="reader-token"), str(tmp_path / "c1"))
    assert reader.json("vs", "reviews")["metadata"]["name"] == "reviews"
    denied = reader("patch", "vs", "reviews", "--type=merge", "-p", '{"metadata":{"labels":{"a":"b"}}}')
    assert denied.returncode != 0
    assert ('Error from server (Forbidden): virtualservices.networking.istio.io "reviews" is forbidden: User "reader" cannot patch '
            'resource "virtualservices" in API group "networking.istio.io" in the namespace "default"') in denied.stderr
    other_ns = reader("get", "vs", "-n", "kube-system")
    assert ('virtualservices.networking.istio.io is forbidden: User "reader" cannot list resource "virtualservices" in API group '
            '"networking.istio.io" in the namespace "kube-system"') in other_ns.stderr
    stranger = Kubectl(k8s_double_kubeconfig(k8s_double_tls, token="no-such-token"), str(tmp_path / "c2"))
    refused = stranger("get", "vs")
    assert refused.returncode != 0 and "You must be logged in to the server" in refused.stderr
    code, _headers, body = http(k8s_double_tls, "GET", "/api/v1/namespaces", token="no-such-token")
    assert code == 401 and body["reason"] == "Unauthorized"


@needs_kubectl
def test_kubectl_invalid_virtualservice_is_422_with_field_causes(kubectl):
    bad_weight = vs_body(weights=(80, 20))
    bad_weight["spec"]["http"][0]["route"][0]["weight"] = "eighty"
    proc = kubectl("apply", "-f", "-", stdin=json.dumps(bad_weight))
    assert proc.returncode != 0
    assert proc.stderr.startswith('The VirtualService "reviews" is invalid: \n')
    assert ('* spec.http[0].route[0].weight: Invalid value: "string": spec.http[0].route[0].weight in body must be of type integer: '
            '"string"\n') in proc.stderr
    # a type error is "blocking": the real server then skips the CRD's CEL rules and says so
    assert ('* : Invalid value: "null": some validation rules were not checked because the object was invalid; correct the existing '
            'errors to complete validation') in proc.stderr
    bad_enum = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
                "spec": {"host": "reviews", "trafficPolicy": {"tls": {"mode": "SOMETIMES"}}}}
    proc = kubectl("create", "-f", "-", stdin=json.dumps(bad_enum))
    assert proc.returncode != 0
    assert ('spec.trafficPolicy.tls.mode: Unsupported value: "SOMETIMES": supported values: "DISABLE", "SIMPLE", "MUTUAL", '
            '"ISTIO_MUTUAL"') in proc.stderr
    unknown = vs_body()
    unknown["spec"]["foo"] = "bar"
    proc = kubectl("create", "-f", "-", stdin=json.dumps(unknown))
    assert proc.returncode != 0
    assert ('Error from server (BadRequest): error when creating "STDIN": VirtualService in version "v1" cannot be handled as a '
            'VirtualService: strict decoding error: unknown field "spec.foo"') in proc.stderr
    lenient = kubectl("create", "--validate=false", "-f", "-", stdin=json.dumps(unknown))
    assert lenient.returncode == 0, lenient.stderr
    assert "foo" not in kubectl.json("vs", "reviews")["spec"]


@needs_kubectl
def test_kubectl_get_prints_the_crd_printer_columns(kubectl):
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), "-f", samples("destination-rule-all.yaml"), check=True)
    lines = kubectl("get", "vs", check=True).stdout.splitlines()
    assert lines[0].split() == ["NAME", "GATEWAYS", "HOSTS", "AGE"]
    assert lines[1].split()[:2] == ["reviews", '["reviews"]']
    rows = [line.split() for line in kubectl("get", "dr", "-A", "--show-labels", check=True).stdout.splitlines()]
    assert rows[0] == ["NAMESPACE", "NAME", "HOST", "AGE", "LABELS"] and rows[4][:3] == ["default", "reviews", "reviews"]
    assert kubectl("get", "ns", "default", check=True).stdout.split()[:5] == ["NAME", "STATUS", "AGE", "default", "Active"]


@needs_kubectl
def test_kubectl_wait_follows_a_watch(kubectl, k8s_double_tls, k8s_double_client):
    from kubernetes import client  # pylint: disable=import-outside-toplevel
    kubectl("apply", "-f", samples("virtual-service-reviews-80-20.yaml"), check=True)
    api = client.CustomObjectsApi(k8s_double_client(k8s_double_tls))

    def watching():
        return any(r.get("verb") == "watch" and r.get("resource") == VS for r in k8s_double_tls.requests())

    def patch_once_kubectl_watches():
        for _attempt in range(200):  # bounded: at most 20 s
            if watching():
                break
            threading.Event().wait(0.1)
        api.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100}]}]}})
    writer = threading.Thread(target=patch_once_kubectl_watches)
    writer.start()
    try:
        proc = kubectl("wait", "vs/reviews", "--for=jsonpath={.spec.http[0].route[0].weight}=100", "--timeout=30s")
    finally:
        writer.join(timeout=40)
    assert proc.returncode == 0, proc.stderr
    assert "virtualservice.networking.istio.io/reviews condition met" in proc.stdout
    assert watching()


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v2, labels: {app: reviews, version: v2}}
spec:
  replicas: 2
  selector: {matchLabels: {app: reviews, version: v2}}
  template:
    metadata: {labels: {app: reviews, version: v2}}
    spec:
      containers:
      - {name: reviews, image: "docker.io/istio/examples-bookinfo-reviews-v2:1.20.2", ports: [{containerPort: 9080}]}
"""


@needs_kubectl
def test_kubectl_deployment_rollout_scale_and_strategic_patch(kubectl):
    assert "deployment.apps/reviews-v2 created" in kubectl("apply", "-f", "-", stdin=DEPLOYMENT, check=True).stdout
    assert "successfully rolled out" in kubectl("rollout", "status", "deployment/reviews-v2", "--timeout=20s", check=True).stdout
    assert "scaled" in kubectl("scale", "deployment/reviews-v2", "--replicas=3", check=True).stdout
    patch = '{"spec":{"template":{"spec":{"containers":[{"name":"istio-proxy","image":"istio/proxyv2"}]}}}}'
    assert "patched" in kubectl("patch", "deployment", "reviews-v2", "--type=strategic", "-p", patch, check=True).stdout
    dep = kubectl.json("deployment", "reviews-v2")
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["reviews", "istio-proxy"]
    assert dep["spec"]["replicas"] == 3 and dep["metadata"]["generation"] == 3
    assert dep["status"]["observedGeneration"] == 3 and dep["status"]["readyReplicas"] == 3
    created = kubectl("create", "deployment", "web", "--image=nginx")  # kubectl sends protobuf: not decoded by the double
    assert created.returncode != 0 and "k8s_double (TEST DOUBLE) decodes protobuf bodies only for" in created.stderr
    assert "configmap/settings created" in kubectl("create", "configmap", "settings", "--from-literal=weight=10", check=True).stdout
    assert kubectl.json("configmap", "settings")["data"] == {"weight": "10"}


@needs_kubectl
def test_kubectl_validate_modes_and_server_side_apply(kubectl, k8s_double_tls):
    unknown = json.dumps(vs_body(name="loose") | {"spec": {"hosts": ["loose"], "foo": 1}})
    warned = kubectl("create", "--validate=warn", "-f", "-", stdin=unknown)
    assert warned.returncode == 0 and 'Warning: unknown field "spec.foo"' in warned.stderr
    kubectl("delete", "vs", "loose", check=True)
    assert kubectl("create", "--validate=false", "-f", "-", stdin=unknown).returncode == 0
    modes = [r["path"].split("fieldValidation=")[1].split("&")[0] for r in k8s_double_tls.requests()
             if r.get("verb") == "create" and r.get("resource") == VS]
    assert modes == ["Warn", "Ignore"]
    applied = kubectl("apply", "--server-side", "-f", samples("virtual-service-reviews-80-20.yaml"))
    assert "serverside-applied" in applied.stdout, applied.stderr
    kubectl("apply", "--server-side", "-f", samples("virtual-service-reviews-90-10.yaml"), check=True)
    assert [r["weight"] for r in kubectl.json("vs", "reviews")["spec"]["http"][0]["route"]] == [90, 10]
    apply_patches = [r for r in k8s_double_tls.requests() if r.get("contentType") == "application/apply-patch+yaml"]
    assert len(apply_patches) == 2 and all("fieldManager=kubectl" in r["path"] for r in apply_patches)


# ------------------------------------------------------------------------------------------------ python client
def test_replace_with_a_stale_resource_version_is_409(custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    created["spec"]["http"][0]["route"][0]["weight"] = 70
    custom.replace_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", created)
    code, body = api_exception(custom.replace_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews", created)
    assert code == 409 and body["reason"] == "Conflict"
    assert body["message"] == ('Operation cannot be fulfilled on virtualservices.networking.istio.io "reviews": the object has been '
                               'modified; please apply your changes to the latest version and try again')
    assert body["details"] == {"name": "reviews", "group": GROUP, "kind": VS}
    del created["metadata"]["resourceVersion"]
    code, body = api_exception(custom.replace_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews", created)
    assert code == 422 and "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update" in body["message"]


def test_generation_moves_only_with_spec(custom):
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    assert obj["metadata"]["generation"] == 1 and obj["metadata"]["uid"] and obj["metadata"]["creationTimestamp"]
    rv0 = int(obj["metadata"]["resourceVersion"])
    obj = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"metadata": {"annotations": {"step": "1"}}})
    assert obj["metadata"]["generation"] == 1 and int(obj["metadata"]["resourceVersion"]) > rv0
    obj = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"gateways": ["mesh"]}})
    assert obj["metadata"]["generation"] == 2
    same = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"gateways": ["mesh"]}})
    assert same["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", VS, "reviews", {"status": {"observedGeneration": 2}})
    assert status["metadata"]["generation"] == 2 and status["status"] == {"observedGeneration": 2}


def test_status_subresource_split(k8s_double, custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body(status={"observedGeneration": 9}))
    assert "status" not in created
    after = custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"status": {"observedGeneration": 3}})
    assert "status" not in after
    after = custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", VS, "reviews",
                                                         {"status": {"observedGeneration": 1}, "spec": {"hosts": ["ignored"]},
                                                          "metadata": {"labels": {"ignored": "yes"}}})
    assert after["status"] == {"observedGeneration": 1} and after["spec"]["hosts"] == ["reviews"]
    assert "labels" not in after["metadata"] and after["metadata"]["generation"] == 1
    assert http(k8s_double, "GET", "/api/v1/namespaces/default/configmaps/x/status")[0] == 404  # no status subresource
    for generation in (3, "3"):  # x-kubernetes-int-or-string
        assert custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", VS, "reviews", {
            "status": {"observedGeneration": generation}})["status"]["observedGeneration"] == generation
    code, body = api_exception(custom.patch_namespaced_custom_object_status, GROUP, VERSION, "default", VS, "reviews",
                               {"status": {"observedGeneration": True}})
    assert code == 422 and body["details"]["causes"][0]["field"] == "status.observedGeneration"
    named = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body(metadata={"generateName": "reviews-"}))
    assert named["metadata"]["name"].startswith("reviews-") and len(named["metadata"]["name"]) == len("reviews-") + 5


def test_watch_streams_changes_after_a_resource_version(custom):
    from kubernetes import watch  # pylint: disable=import-outside-toplevel
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    start_rv = obj["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"hosts": ["a"]}})
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body(name="other"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
    seen = []
    stream = watch.Watch()
    for event in stream.stream(custom.list_namespaced_custom_object, GROUP, VERSION, "default", VS, resource_version=start_rv,
                               field_selector="metadata.name=reviews", timeout_seconds=5):
        seen.append((event["type"], event["object"]["metadata"]["name"], int(event["object"]["metadata"]["resourceVersion"])))
        if len(seen) == 2:
            stream.stop()
    assert [s[:2] for s in seen] == [("MODIFIED", "reviews"), ("DELETED", "reviews")]
    assert seen[0][2] < seen[1][2]


def test_watch_with_a_label_selector_sees_objects_enter_and_leave(custom):
    from kubernetes import watch  # pylint: disable=import-outside-toplevel
    obj = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    start_rv = obj["metadata"]["resourceVersion"]
    for labels in ({"track": "canary"}, {"track": "canary", "step": "1"}, {"track": None}):
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"metadata": {"labels": labels}})
    seen = []
    stream = watch.Watch()
    for event in stream.stream(custom.list_namespaced_custom_object, GROUP, VERSION, "default", VS, resource_version=start_rv,
                               label_selector="track=canary", timeout_seconds=5):
        seen.append((event["type"], event["object"]["metadata"].get("labels", {}).get("step")))
        if len(seen) == 3:
            stream.stop()
    assert seen == [("ADDED", None), ("MODIFIED", "1"), ("DELETED", "1")]


def test_delete_answers_a_success_status_and_honours_finalizers(custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    answer = custom.delete_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
    assert answer == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                      "details": {"name": "reviews", "group": GROUP, "kind": VS, "uid": created["metadata"]["uid"]}}
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body(metadata={"name": "reviews", "finalizers": ["example.com/hold"]}))
    held = custom.delete_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["finalizers"] == ["example.com/hold"]
    assert custom.get_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")["metadata"]["deletionTimestamp"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"metadata": {"finalizers": None}})
    assert api_exception(custom.get_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews")[0] == 404


def test_unknown_fields_pruned_with_warning_or_rejected_when_strict(k8s_double):
    body = vs_body()
    body["spec"]["foo"] = 1
    code, headers, obj = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", body)
    assert code == 201 and "foo" not in obj["spec"]
    assert headers.get_all("Warning") == ['299 - "unknown field \\"spec.foo\\""']
    body["metadata"]["name"] = "strict"
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}?fieldValidation=Strict", body)
    assert code == 400 and status["reason"] == "BadRequest"
    assert status["message"] == ('VirtualService in version "v1" cannot be handled as a VirtualService: strict decoding error: '
                                 'unknown field "spec.foo"')


def test_invalid_object_status_causes(k8s_double):
    body = vs_body()
    body["spec"]["http"][0]["route"][0]["weight"] = "ten"
    body["spec"]["http"][0]["timeout"] = "0.5ms"
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", body)
    assert code == 422 and status["reason"] == "Invalid"
    assert status["details"]["kind"] == "VirtualService" and status["details"]["group"] == GROUP
    fields = [c["field"] for c in status["details"]["causes"]]
    assert fields[0] == "spec.http[0].route[0].weight" and status["details"]["causes"][0]["reason"] == "FieldValueTypeInvalid"
    body["spec"]["http"][0]["route"][0]["weight"] = 10
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", body)
    assert code == 422
    assert status["message"] == ('VirtualService.networking.istio.io "reviews" is invalid: spec.http[0].timeout: Invalid value: '
                                 '"string": must be a valid duration greater than 1ms')
    bad_name = vs_body(name="Reviews_1")
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", bad_name)
    assert code == 422 and status["details"]["causes"][0]["field"] == "metadata.name"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "9080-reviews"}, "spec": {"ports": [{"port": 9080}]}}
    code, _headers, status = http(k8s_double, "POST", "/api/v1/namespaces/default/services", service)
    assert code == 422 and status["message"].startswith('Service "9080-reviews" is invalid: metadata.name: Invalid value: "9080-reviews": '
                                                        "a DNS-1035 label must consist of lower case alphanumeric characters")


def test_list_map_duplicates_and_string_formats_are_invalid(k8s_double, custom):
    entry = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ServiceEntry", "metadata": {"name": "ext"},
             "spec": {"hosts": ["api.example.com"], "resolution": "DNS",
                      "ports": [{"number": 443, "name": "https", "protocol": "TLS"}, {"number": 443, "name": "https"}]}}
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/serviceentries", entry)
    assert code == 422
    assert status["message"] == ('ServiceEntry.networking.istio.io "ext" is invalid: [spec.ports[1]: Duplicate value: '
                                 'map[string]interface {}{"name":"https"}, spec.ports: Invalid value: "array": port number cannot be duplicated]')
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    bad_time = {"status": {"conditions": [{"type": "Reconciled", "status": "True", "lastTransitionTime": "yesterday"}]}}
    code, body = api_exception(custom.patch_namespaced_custom_object_status, GROUP, VERSION, "default", VS, "reviews", bad_time)
    assert code == 422 and body["details"]["causes"][0] == {
        "reason": "FieldValueInvalid", "field": "status.conditions[0].lastTransitionTime",
        "message": 'Invalid value: "yesterday": status.conditions[0].lastTransitionTime in body must be of type date-time: "yesterday"'}


def test_peer_authentication_cel_rules(k8s_double):
    path = "/apis/security.istio.io/v1/namespaces/default/peerauthentications"
    body = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "strict"},
            "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}}
    code, _headers, status = http(k8s_double, "POST", path, body)
    assert code == 422
    assert status["message"] == 'PeerAuthentication.security.istio.io "strict" is invalid: spec: Invalid value: "object": portLevelMtls requires selector'
    body["spec"]["mtls"]["mode"] = "SOMETIMES"
    code, _headers, status = http(k8s_double, "POST", path, body)
    assert code == 422 and [c["reason"] for c in status["details"]["causes"]] == ["FieldValueNotSupported", "FieldValueInvalid"]
    body["spec"]["mtls"]["mode"] = "STRICT"
    body["spec"]["selector"] = {"matchLabels": {"app": "reviews"}}
    assert http(k8s_double, "POST", path, body)[0] == 201


def test_json_patch_status_body_matches_the_real_server(k8s_double):
    http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", vs_body())
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}/reviews"
    failing_test = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}]
    code, _headers, status = http(k8s_double, "PATCH", path, failing_test, content_type="application/json-patch+json")
    assert code == 422 and status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                      "message": "the server rejected our request due to an error in our request",
                                      "reason": "Invalid", "details": {}, "code": 422}
    code, _headers, status = http(k8s_double, "PATCH", path, {"spec": {}}, content_type="application/json-patch+json")
    assert code == 400 and status["reason"] == "BadRequest"
    code, _headers, status = http(k8s_double, "PATCH", path, {"spec": {}}, content_type="text/plain")
    assert code == 415 and status["reason"] == "UnsupportedMediaType"


def test_create_with_a_resource_version_fails_and_server_side_apply_creates_with_201(k8s_double):
    body = vs_body()
    body["metadata"]["resourceVersion"] = "42"
    code, _headers, status = http(k8s_double, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", body)
    assert code == 500 and status["reason"] == "InternalError"
    assert status["message"] == "Internal error occurred: resourceVersion should not be set on objects to be created"
    path = f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}/reviews?fieldManager=canary"
    code, _headers, created = http(k8s_double, "PATCH", path, yaml.safe_dump(body).encode(), content_type="application/apply-patch+yaml")
    assert code == 201 and created["metadata"]["resourceVersion"] != "42" and created["metadata"]["generation"] == 1
    body["spec"]["http"][0]["route"][0]["weight"] = 75
    del body["metadata"]["resourceVersion"]
    code, _headers, applied = http(k8s_double, "PATCH", path, yaml.safe_dump(body).encode(), content_type="application/apply-patch+yaml")
    assert code == 200 and applied["spec"]["http"][0]["route"][0]["weight"] == 75 and applied["metadata"]["generation"] == 2
    without_manager = path.split("?", maxsplit=1)[0]
    code, _headers, status = http(k8s_double, "PATCH", without_manager, yaml.safe_dump(body).encode(), content_type="application/apply-patch+yaml")
    assert code == 422 and status["message"] == 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for apply patch'


def test_deployment_strategic_merge_by_container_name(k8s_double, k8s_double_client):
    from kubernetes import client  # pylint: disable=import-outside-toplevel
    apps = client.AppsV1Api(k8s_double_client(k8s_double))
    labels = {"app": "reviews", "version": "v2"}
    apps.create_namespaced_deployment("default", {
        "metadata": {"name": "reviews-v2", "labels": labels},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {"containers": [
            {"name": "reviews", "image": "reviews:1", "env": [{"name": "A", "value": "1"}]}, {"name": "proxy", "image": "envoy:1"}]}}}})
    patched = apps.patch_namespaced_deployment("reviews-v2", "default", {"spec": {"template": {"spec": {"containers": [
        {"name": "reviews", "image": "reviews:2"}]}}}}, _content_type="application/strategic-merge-patch+json")
    containers = {c.name: c for c in patched.spec.template.spec.containers}
    assert containers["reviews"].image == "reviews:2" and containers["reviews"].env[0].value == "1"
    assert containers["proxy"].image == "envoy:1" and patched.metadata.generation == 2
    status = apps.read_namespaced_deployment_status("reviews-v2", "default").status
    assert status.observed_generation == 2 and status.ready_replicas == 1


def test_selectors(k8s_double, custom):
    for name, track in (("a", "stable"), ("b", "canary"), ("c", None)):
        body = vs_body(name=name)
        if track:
            body["metadata"]["labels"] = {"track": track}
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, body)

    def names(**kwargs):
        return [i["metadata"]["name"] for i in custom.list_namespaced_custom_object(GROUP, VERSION, "default", VS, **kwargs)["items"]]
    assert names(label_selector="track=canary") == ["b"]
    assert names(label_selector="track in (stable,canary)") == ["a", "b"]
    assert names(label_selector="!track") == ["c"]
    assert names(label_selector="track,track!=stable") == ["b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    code, _headers, status = http(k8s_double, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}?fieldSelector=spec.hosts%3Dx")
    assert code == 400 and status["message"] == "field label not supported: spec.hosts"
    page = custom.list_namespaced_custom_object(GROUP, VERSION, "default", VS, limit=2)
    assert len(page["items"]) == 2 and page["metadata"]["continue"]
    rest = custom.list_namespaced_custom_object(GROUP, VERSION, "default", VS, limit=2, _continue=page["metadata"]["continue"])
    assert [i["metadata"]["name"] for i in rest["items"]] == ["c"]


def test_fault_injection_and_request_counters(k8s_double, custom):
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    k8s_double.reset()
    k8s_double.inject({"kind": "conflict", "resource": VS, "name": "reviews", "count": 1})
    code, body = api_exception(custom.patch_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews", {"spec": {"hosts": ["x"]}})
    assert code == 409 and "the object has been modified" in body["message"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"hosts": ["x"]}})
    k8s_double.inject({"kind": "error", "code": 503, "verb": "get", "count": 2})
    for _attempt in range(2):
        assert api_exception(custom.get_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews")[0] == 503
    seen = custom.get_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
    k8s_double.inject({"kind": "bump", "resource": VS, "name": "reviews"})
    seen = custom.get_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
    seen["spec"]["hosts"] = ["y"]
    assert api_exception(custom.replace_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews", seen)[0] == 409
    k8s_double.inject({"kind": "forbid", "verb": "delete", "user": "k8s-double-admin"})
    code, body = api_exception(custom.delete_namespaced_custom_object, GROUP, VERSION, "default", VS, "reviews")
    assert code == 403 and body["message"].startswith('virtualservices.networking.istio.io "reviews" is forbidden: User "k8s-double-admin"')
    counters = k8s_double.counters()
    assert counters["patch virtualservices"] == 2 and counters["get virtualservices"] == 4 and counters["update virtualservices"] == 1
    code, _headers, remote = http(k8s_double, "GET", "/_double/counters", token=False)
    assert code == 200 and remote == counters
    assert http(k8s_double, "GET", "/api/v1/_double", token=False)[0] == 401


def test_state_survives_a_restart(istio_crds, tmp_path, k8s_double_client):
    from kubernetes import client  # pylint: disable=import-outside-toplevel
    state = str(tmp_path / "state.json")
    first = start(crds=istio_crds, state=state)
    try:
        api = client.CustomObjectsApi(k8s_double_client(first))
        obj = api.create_namespaced_custom_object(GROUP, VERSION, "default", VS, vs_body())
    finally:
        first.stop()
    second = start(crds=istio_crds, state=state)
    try:
        api = client.CustomObjectsApi(k8s_double_client(second))
        again = api.get_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews")
        assert again["metadata"]["uid"] == obj["metadata"]["uid"]
        later = api.patch_namespaced_custom_object(GROUP, VERSION, "default", VS, "reviews", {"spec": {"hosts": ["z"]}})
        assert int(later["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    finally:
        second.stop()


def test_command_line_prints_url_and_writes_a_kubeconfig(istio_crds, tmp_path):
    from kubernetes import client, config  # pylint: disable=import-outside-toplevel
    kubeconfig = str(tmp_path / "kc")
    support = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["k8s_double"].__file__)))
    env = dict(os.environ, PYTHONPATH=support)
    with subprocess.Popen([sys.executable, "-m", "k8s_double", "--port", "0", "--crds", istio_crds, "--kubeconfig-out", kubeconfig],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        try:
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            with open(kubeconfig, encoding="utf-8") as handle:
                written = yaml.safe_load(handle)
            assert written["current-context"] == "k8s-double" and written["clusters"][0]["cluster"]["server"] == url
            api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
            assert "default" in [n.metadata.name for n in api.list_namespace().items]
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    assert proc.returncode == 0


def test_tokens_file_and_forbidden_message_for_create(istio_crds, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"users": [{"token": "bot", "user": "canary-bot", "rules": [
        {"apiGroups": ["networking.istio.io"], "resources": ["virtualservices"], "verbs": ["get", "patch"]}]}]}))
    with start(crds=istio_crds, tokens=str(tokens)) as handle:
        code, _headers, status = http(handle, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{VS}", vs_body(), token="bot")
        assert code == 403
        assert status["message"] == ('virtualservices.networking.istio.io is forbidden: User "canary-bot" cannot create resource '
                                     '"virtualservices" in API group "networking.istio.io" in the namespace "default"')
        assert http(handle, "GET", "/api/v1/namespaces", token="bot")[0] == 403
        assert http(handle, "GET", "/api/v1/namespaces", token=False)[0] == 401
