"""The istio role's install steps (install.yml) against the test Kubernetes API, with a stand-in for istioctl.

istioctl cannot run here. What this proves is the role's own logic around it: install only when the revision's istiod
is missing or the IstioOperator changed, wait for istiod to be Available, move revision tags only when they point
elsewhere (and not at all for a control-plane canary), and set the mesh-wide PeerAuthentication (PERMISSIVE by default),
validated by the real Istio CRD schema.
"""
import json
import os
import subprocess
import sys

import pytest

from k8s_double.pytest_plugin import istio_crds, k8s_double  # noqa: F401 pylint: disable=import-error,unused-import

pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402  pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.path.join(ROOT, "tests", "integration", "targets")
STEPS = os.path.join(TARGET, "k8s_downloads", "steps.yml")
FAKE = os.path.join(TARGET, "istio_install", "fake_istioctl.py")
VENV_BIN = os.path.dirname(sys.executable)

# Admission webhooks are not among the double's built-in kinds; serve them as a schemaless kind of the same group.
MWC_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "mutatingwebhookconfigurations.admissionregistration.k8s.io"},
    "spec": {"group": "admissionregistration.k8s.io", "scope": "Cluster",
             "names": {"plural": "mutatingwebhookconfigurations", "singular": "mutatingwebhookconfiguration",
                       "kind": "MutatingWebhookConfiguration", "listKind": "MutatingWebhookConfigurationList"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture
def cluster(k8s_double, tmp_path):  # pylint: disable=redefined-outer-name
    cfg = k8s.Configuration()
    cfg.host = k8s_double.url
    cfg.api_key = {"authorization": "Bearer " + k8s_double.token}
    with k8s.ApiClient(cfg) as api:
        k8s.ApiextensionsV1Api(api).create_custom_resource_definition(MWC_CRD)
        yield k8s_double, api


def install_fake(tmp_path, version):
    path = tmp_path / "lib" / version / "istioctl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + open(FAKE, encoding="utf-8").read())
    path.chmod(0o755)


def run(handle, tmp_path, **variables):
    log = tmp_path / "istioctl.log"
    before = log.read_text().splitlines() if log.exists() else []
    variables = dict(test_role="istio", test_steps=["render.yml", "install.yml"], istio_kubeconfig=handle.kubeconfig,
                     istio_install_dir=str(tmp_path / "lib"), istio_config_dir=str(tmp_path / "etc"), **variables)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", FAKE_ISTIOCTL_LOG=str(log),
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost",
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), STEPS, "-e", f"@{vars_file}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
    after = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, proc.stdout, [json.loads(line) for line in after[len(before):]]


def changed(out):
    line = [ln for ln in out.splitlines() if ln.startswith("localhost") and "changed=" in ln][-1]
    return int(line.split("changed=")[1].split()[0])


def tags(api):
    items = k8s.CustomObjectsApi(api).list_cluster_custom_object("admissionregistration.k8s.io", "v1",
                                                                 "mutatingwebhookconfigurations")["items"]
    return {i["metadata"]["labels"]["istio.io/tag"]: i["metadata"]["labels"]["istio.io/rev"] for i in items}


def test_install_wait_tag_and_permissive_then_nothing_on_a_second_run(cluster, tmp_path):  # pylint: disable=redefined-outer-name
    handle, api = cluster
    install_fake(tmp_path, "1.28.0")
    rc, out, calls = run(handle, tmp_path)
    assert rc == 0, out
    operator = str(tmp_path / "etc" / "istio-operator-1-28-0.yaml")
    assert calls == [["install", "-y", "-f", operator, "--kubeconfig", handle.kubeconfig],
                     ["tag", "set", "prod-stable", "--revision", "1-28-0", "--overwrite", "--skip-confirmation",
                      "--kubeconfig", handle.kubeconfig]], calls
    assert k8s.AppsV1Api(api).read_namespaced_deployment("istiod-1-28-0", "istio-system").status.available_replicas == 1
    assert tags(api) == {"prod-stable": "1-28-0"}
    pa = k8s.CustomObjectsApi(api).get_namespaced_custom_object("security.istio.io", "v1", "istio-system",
                                                                "peerauthentications", "default")
    assert pa["spec"] == {"mtls": {"mode": "PERMISSIVE"}}
    rc, out, calls = run(handle, tmp_path)
    assert rc == 0 and calls == [] and changed(out) == 0, out


def test_control_plane_canary_leaves_the_tags_until_asked(cluster, tmp_path):  # pylint: disable=redefined-outer-name
    handle, api = cluster
    install_fake(tmp_path, "1.28.0")
    install_fake(tmp_path, "1.28.1")
    assert run(handle, tmp_path)[0] == 0
    rc, out, calls = run(handle, tmp_path, istio_version="1.28.1", istio_move_tags=False)
    assert rc == 0, out
    assert [c[0] for c in calls] == ["install"] and calls[0][3].endswith("istio-operator-1-28-1.yaml")
    assert tags(api) == {"prod-stable": "1-28-0"}, "a canary control plane must not take the tag"
    names = {d.metadata.name for d in k8s.AppsV1Api(api).list_namespaced_deployment("istio-system").items}
    assert names == {"istiod-1-28-0", "istiod-1-28-1"}
    rc, out, calls = run(handle, tmp_path, istio_version="1.28.1", istio_move_tags=True)
    assert rc == 0, out
    assert calls == [["tag", "set", "prod-stable", "--revision", "1-28-1", "--overwrite", "--skip-confirmation",
                      "--kubeconfig", handle.kubeconfig]], calls
    assert tags(api) == {"prod-stable": "1-28-1"}


def test_changed_operator_file_reinstalls_the_revision(cluster, tmp_path):  # pylint: disable=redefined-outer-name
    handle, dummy = cluster
    install_fake(tmp_path, "1.28.0")
    assert run(handle, tmp_path)[0] == 0
    rc, out, calls = run(handle, tmp_path, istio_tracing_sampling=5.0)
    assert rc == 0, out
    assert [c[0] for c in calls] == ["install"], "istiod exists: only the changed IstioOperator may trigger the install"
