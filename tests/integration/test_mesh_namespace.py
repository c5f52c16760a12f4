"""mesh_namespace through ansible-playbook against the test Kubernetes API (tests/support/k8s_double).

The double serves the real Istio CRDs (../shared/istio/crd-all.gen.yaml), so every PeerAuthentication the role writes is
validated against the real openAPIV3Schema; pods are created with the shapes kubelet and the scheduler report.
"""
import json
import os
import subprocess
import sys

import pytest

from k8s_double.pytest_plugin import istio_crds, k8s_double  # noqa: F401 pylint: disable=import-error,unused-import

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "mesh_namespace", "mesh.yml")
VENV_BIN = os.path.dirname(sys.executable)
INJECT = "sidecar.istio.io/inject"


def run(handle, tmp_path, **variables):
    """Run the role; return (rc, output, report)."""
    report = tmp_path / "report.json"
    if report.exists():
        report.unlink()
    variables = dict(mesh_namespace_kubeconfig=handle.kubeconfig, test_report_file=str(report), **variables)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost",
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), PLAYBOOK, "-e", f"@{vars_file}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    data = json.loads(report.read_text()) if report.exists() else None
    return proc.returncode, proc.stdout, data


def changed(out):
    line = [ln for ln in out.splitlines() if ln.startswith("localhost") and "changed=" in ln][-1]
    return int(line.split("changed=")[1].split()[0])


@pytest.fixture
def api(k8s_double):  # pylint: disable=redefined-outer-name
    config = k8s.Configuration()
    config.host = k8s_double.url
    config.api_key = {"authorization": "Bearer " + k8s_double.token}
    with k8s.ApiClient(config) as api_client:
        yield api_client


def namespace(api_client, name, labels=None):
    k8s.CoreV1Api(api_client).create_namespace({"metadata": {"name": name, "labels": labels or {}}})


def labels_of(api_client, name):
    return k8s.CoreV1Api(api_client).read_namespace(name).metadata.labels or {}


def container(name, ready=True):
    return {"name": name, "ready": ready, "restartCount": 0, "image": f"{name}:1", "imageID": "", "started": ready,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}} if ready else {"waiting": {"reason": "ContainerCreating"}}}


# pylint: disable-next=too-many-arguments
def pod(api_client, ns, name, sidecar=True, native=False, ready=True, labels=None, annotations=None, phase="Running",
        conditions=None):
    """Create a pod as injected (or not) by Istio, then write the status kubelet or the scheduler would report."""
    containers = [{"name": "app", "image": "app:1"}]
    init = []
    if sidecar and native:
        init.append({"name": "istio-proxy", "image": "proxyv2:1", "restartPolicy": "Always"})
    elif sidecar:
        containers.append({"name": "istio-proxy", "image": "proxyv2:1"})
    core = k8s.CoreV1Api(api_client)
    core.create_namespaced_pod(ns, {"metadata": {"name": name, "labels": labels or {"app": name},
                                                 "annotations": annotations or {}},
                                    "spec": {"containers": containers, "initContainers": init}})
    status = {"phase": phase, "conditions": conditions or [{"type": "PodScheduled", "status": "True"}]}
    if phase == "Running":
        status["containerStatuses"] = [container(c["name"], ready) for c in containers]
        status["initContainerStatuses"] = [container(c["name"], ready) for c in init]
    core.patch_namespaced_pod_status(name, ns, {"status": status})


def deployment(api_client, ns, name, match, template_annotations=None):
    k8s.AppsV1Api(api_client).create_namespaced_deployment(ns, {
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": match},
                 "template": {"metadata": {"labels": match, "annotations": template_annotations or {}},
                              "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}})


def peer_authentication(api_client, ns):
    objs = k8s.CustomObjectsApi(api_client).list_namespaced_custom_object("security.istio.io", "v1", ns, "peerauthentications")
    return {o["metadata"]["name"]: o["spec"]["mtls"]["mode"] for o in objs["items"]}


NO_CHECKS = dict(mesh_namespace_verify_sidecars=False, mesh_namespace_mtls_mode="")


def test_revision_label_replaces_the_overriding_injection_label(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    namespace(api, "shop", {"istio-injection": "enabled", "team": "shop"})
    namespace(api, "web")
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop"}, {"name": "web"}], **NO_CHECKS)
    assert rc == 0, out
    assert labels_of(api, "shop") == {"istio.io/rev": "prod-stable", "team": "shop", "kubernetes.io/metadata.name": "shop"}
    assert labels_of(api, "web")["istio.io/rev"] == "prod-stable" and "istio-injection" not in labels_of(api, "web")
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop"}, {"name": "web"}], **NO_CHECKS)
    assert rc == 0 and changed(out) == 0, out


def test_injection_enabled_removes_the_revision_label(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    namespace(api, "legacy", {"istio.io/rev": "1-27-3"})
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "legacy", "injection": "enabled"}], **NO_CHECKS)
    assert rc == 0, out
    got = labels_of(api, "legacy")
    assert got.get("istio-injection") == "enabled" and "istio.io/rev" not in got


def test_missing_namespace_stops_before_any_change(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    namespace(api, "shop", {"istio-injection": "enabled"})
    k8s_double.reset()
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop"}, {"name": "ghost"}], **NO_CHECKS)
    assert rc != 0, out
    assert "Namespace ghost listed in mesh_namespace_list does not exist" in out, out
    assert "No namespace was changed" in out
    assert labels_of(api, "shop").get("istio-injection") == "enabled"
    assert not [r for r in k8s_double.requests() if r["method"] not in ("GET", "HEAD")], "no write may happen"


def test_wrong_answer_fails_at_the_start_naming_the_field(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    namespace(api, "shop")
    k8s_double.reset()
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop", "mtls": "STRICTT"}])
    assert rc != 0 and "mtls" in out and "STRICTT" in out, out
    assert not k8s_double.requests(), "argument validation runs before the cluster is contacted"


def make_mixed_namespace(api_client):
    namespace(api_client, "shop", {"istio.io/rev": "prod-stable"})
    pod(api_client, "shop", "meshed")
    pod(api_client, "shop", "native", native=True)
    pod(api_client, "shop", "old", sidecar=False)
    pod(api_client, "shop", "optout", sidecar=False, annotations={INJECT: "false"})
    pod(api_client, "shop", "hungry", phase="Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available"}])
    pod(api_client, "shop", "starting", ready=False)
    pod(api_client, "shop", "job-done", sidecar=False, phase="Succeeded")


def test_two_of_two_report_names_each_pod_and_its_cause(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    make_mixed_namespace(api)
    rc, out, report = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop"}], mesh_namespace_mtls_mode="",
                          mesh_namespace_fail_on_missing_sidecar=False, mesh_namespace_proxy_memory_request="192Mi")
    assert rc == 0, out
    pods = {p["pod"]: p for p in report}
    assert sorted(pods) == ["hungry", "meshed", "native", "old", "optout", "starting"], "finished pods are left out"
    assert pods["meshed"]["ok"] and pods["meshed"]["ready"] == "2/2"
    assert pods["native"]["ok"] and pods["native"]["ready"] == "2/2", "native sidecars (init container, Always) count"
    assert not pods["old"]["sidecar"] and "created before injection was enabled" in pods["old"]["cause"]
    assert "injection disabled on the pod" in pods["optout"]["cause"]
    assert pods["hungry"]["sidecar"] and "pending for lack of memory" in pods["hungry"]["cause"]
    assert "192Mi" in pods["hungry"]["cause"]
    assert pods["starting"]["ready"] == "0/2" and "not all containers are ready" in pods["starting"]["cause"]
    assert "shop/old (1/1, Running): created before injection" in out


def test_missing_sidecars_fail_the_play_by_default(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    make_mixed_namespace(api)
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop"}])
    assert rc != 0, out
    for name in ("shop/old", "shop/optout", "shop/hungry", "shop/starting"):
        assert name in out, name
    assert "mesh_namespace_fail_on_missing_sidecar" in out


def healthy_namespace(api_client, name):
    namespace(api_client, name, {"istio.io/rev": "prod-stable"})
    deployment(api_client, name, "api", {"app": "api"})
    pod(api_client, name, "api-7d4f9", labels={"app": "api"})


def test_strict_is_reached_through_permissive(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    healthy_namespace(api, "pay")
    k8s_double.reset()
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "pay", "mtls": "STRICT"}])
    assert rc == 0, out
    assert peer_authentication(api, "pay") == {"default": "STRICT"}
    writes = [(r["method"], r.get("name")) for r in k8s_double.requests()
              if r.get("resource") == "peerauthentications" and r["method"] not in ("GET",)]
    assert len(writes) >= 2 and writes[0][0] in ("POST", "PUT", "PATCH"), writes
    # The stages are visible in the order of the writes: first PERMISSIVE was created, then it was changed to STRICT.
    assert "Stage 1, PERMISSIVE, for pay" in out and "Stage 2, STRICT, for pay" in out
    assert out.index("Stage 1, PERMISSIVE") < out.index("Check every Deployment is available under PERMISSIVE") \
        < out.index("Stage 2, STRICT") < out.index("Check every Deployment is still available under STRICT")
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "pay", "mtls": "STRICT"}])
    assert rc == 0 and changed(out) == 0, out
    # The objects went through the real CRD schema: the same server refuses a mode the schema does not allow.
    with pytest.raises(k8s.exceptions.ApiException) as refused:
        k8s.CustomObjectsApi(api).create_namespaced_custom_object("security.istio.io", "v1", "pay", "peerauthentications", {
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "bad"},
            "spec": {"mtls": {"mode": "STRICTT"}}})
    assert refused.value.status == 422


def test_default_mode_is_permissive(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    healthy_namespace(api, "pay")
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "pay"}])
    assert rc == 0, out
    assert peer_authentication(api, "pay") == {"default": "PERMISSIVE"}


def test_strict_is_refused_while_a_pod_lacks_its_sidecar(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    healthy_namespace(api, "pay")
    pod(api, "pay", "batch-x1", sidecar=False)
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "pay", "mtls": "STRICT"}],
                         mesh_namespace_fail_on_missing_sidecar=False)
    assert rc != 0, out
    assert "pay stays PERMISSIVE" in out and "batch-x1" in out, out
    assert peer_authentication(api, "pay") == {"default": "PERMISSIVE"}


def test_restart_only_deployments_whose_pods_lack_sidecars(k8s_double, api, tmp_path):  # pylint: disable=redefined-outer-name
    namespace(api, "shop")
    deployment(api, "shop", "cart", {"app": "cart"})
    pod(api, "shop", "cart-5c9f", sidecar=False, labels={"app": "cart"})
    deployment(api, "shop", "meshed", {"app": "meshed"})
    pod(api, "shop", "meshed-1a2b", labels={"app": "meshed"})
    deployment(api, "shop", "optout", {"app": "optout"}, template_annotations={INJECT: "false"})
    pod(api, "shop", "optout-9z8y", sidecar=False, labels={"app": "optout"}, annotations={INJECT: "false"})
    rc, out, dummy = run(k8s_double, tmp_path, mesh_namespace_list=[{"name": "shop", "restart": True}], **NO_CHECKS)
    assert rc == 0, out
    apps = k8s.AppsV1Api(api)
    restarted = {name: (apps.read_namespaced_deployment(name, "shop").spec.template.metadata.annotations or {})
                 .get("kubectl.kubernetes.io/restartedAt") for name in ("cart", "meshed", "optout")}
    assert restarted["cart"] and not restarted["meshed"] and not restarted["optout"], restarted
