"""The istio role, whole (playbooks/istio.yml), with the real istioctl against a real kube-apiserver.

This module starts a control plane of its own without Istio (LabCluster(istio=False): etcd, kube-apiserver 1.35,
controller-manager, scheduler, KWOK nodes; run dir under pytest's tmp) and an artifact mirror on 127.0.0.1 holding the
istioctl built from Istio 1.30 packed as the release tarball (lab/artifact_mirror.py: istioctl, Mirror), with the lab's
variables (IstioLab.vars_for: profile minimal, telemetry off). The role downloads and checks the tarball, installs
istioctl side by side, renders the IstioOperator and runs `istioctl install` and `istioctl tag set` for real. Proven:
install only when the revision's istiod is missing or was not completely installed from this IstioOperator (a second
run changes and writes nothing; a half-done install is run again), istioctl's client timeout from the role, the wait
for istiod to be Available (a run fails there while it is not), revision tags moved only when they point elsewhere
and not for a control-plane canary, the mesh-wide PeerAuthentication PERMISSIVE; and, offline,
`istioctl manifest generate` accepts the IstioOperator rendered for each test inventory.

istiod does not run in this module. KWOK runs its pod (without containers), so the Deployment becomes Available as a
real one does, but nothing listens behind the webhooks istioctl installed. What that does in practice:
- istioctl installs the validating webhooks with failurePolicy Ignore (istiod turns them to Fail itself once it
  serves them): the role's PeerAuthentication is accepted, checked by the CRD schema only;
- the injection webhooks (the revision's and each tag's) have failurePolicy Fail: a pod in a namespace that follows a
  tag is refused, and the error names the istiod Service the tag sends it to. That is how these tests see where a tag
  points, besides the tag's labels;
- `istioctl install` port-forwards to a running istiod to read its version; that fails here (no kubelet on the KWOK
  nodes, the audit log shows a 500) and istioctl goes on.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

import artifact_mirror  # pylint: disable=import-error
import istiolab  # pylint: disable=import-error
from cluster import LabCluster  # pylint: disable=import-error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = os.path.join(ROOT, "tests", "integration", "targets")
STEPS = os.path.join(TARGETS, "k8s_downloads", "steps.yml")
INVENTORIES = os.path.join(TARGETS, "k8s_render", "inventories")
PLAYBOOK = os.path.join(ROOT, "playbooks", "istio.yml")
VENV_BIN = os.path.dirname(sys.executable)
VERSION = istiolab.components.ISTIO_RELEASE
REVISION = VERSION.replace(".", "-")
CANARY = "canary"
NS = "istio-system"
ADMIN = "lab-admin"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
WAIT = 120.0


class Lab:  # pylint: disable=too-few-public-methods
    def __init__(self, cluster, variables):
        self.cluster = cluster
        self.variables = variables
        self.following = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("istio-role-lab"))
    with LabCluster(run_dir, istio=False) as cluster:
        mirror_dir = os.path.join(run_dir, "mirror")
        sha = artifact_mirror.istioctl(mirror_dir, VERSION)
        mirror = artifact_mirror.Mirror(mirror_dir)
        try:
            yield Lab(cluster, istiolab.IstioLab(cluster.cp, run_dir, cluster.launcher).vars_for(sha, mirror.url))
        finally:
            mirror.stop()


def env():
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost",
                ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")


def run(lab, tmp_path, **overrides):  # pylint: disable=redefined-outer-name
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(dict(lab.variables, **overrides)))
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), PLAYBOOK, "-e", f"@{vars_file}"], cwd=ROOT,
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, check=False)
    return proc.returncode, proc.stdout


def changed(out):
    line = [ln for ln in out.splitlines() if ln.startswith("localhost") and "changed=" in ln][-1]
    return int(line.split("changed=")[1].split()[0])


def written(lab, since):  # pylint: disable=redefined-outer-name
    """{(resource, name)} the admin user (the role and istioctl) wrote, and the API server accepted, after `since`."""
    return {(e["objectRef"].get("resource"), e["objectRef"].get("name"))
            for e in lab.cluster.audit.events(since=since, user=ADMIN)
            if e.get("stage") == "ResponseComplete" and e["verb"] in WRITE_VERBS
            and e.get("responseStatus", {}).get("code", 0) < 400}


def tags(lab):  # pylint: disable=redefined-outer-name
    """{tag: revision} from the labels of the revision-tag webhooks istioctl made."""
    hooks = k8s.AdmissionregistrationV1Api(lab.cluster.api_client()).list_mutating_webhook_configuration(
        label_selector="istio.io/tag").items
    return {h.metadata.labels["istio.io/tag"]: h.metadata.labels["istio.io/rev"] for h in hooks}


def injector_for(lab, labels):  # pylint: disable=redefined-outer-name
    """The istiod Service the API server calls to inject a pod of a namespace labelled `labels` (a dry run: the
    injection webhooks fail closed and nothing serves them here, so the refusal names it)."""
    key = json.dumps(labels, sort_keys=True)
    if key not in lab.following:
        lab.following[key] = lab.cluster.namespace("follow", labels)
    with pytest.raises(ApiException) as refused:
        lab.cluster.core().create_namespaced_pod(lab.following[key], {
            "metadata": {"name": "probe"}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}, dry_run="All")
    found = re.search(r"failed calling webhook \\?\"([a-z.-]+)\\?\".*https://([a-z0-9-]+)\.istio-system\.svc:443/inject",
                      refused.value.body)
    assert refused.value.status == 500 and found, refused.value.body
    return found.group(2)


def available(lab, name):  # pylint: disable=redefined-outer-name
    dep = k8s.AppsV1Api(lab.cluster.api_client()).read_namespaced_deployment(name, NS)
    return any(c.type == "Available" and c.status == "True" for c in dep.status.conditions or [])


def test_install_wait_tag_and_permissive_then_nothing_on_a_second_run(lab, tmp_path):  # pylint: disable=redefined-outer-name
    audit = lab.cluster.audit
    mark = audit.mark()
    rc, out = run(lab, tmp_path)
    assert rc == 0, out
    wrote = written(lab, mark)
    assert {("deployments", f"istiod-{REVISION}"), ("mutatingwebhookconfigurations", f"istio-sidecar-injector-{REVISION}"),
            ("customresourcedefinitions", "peerauthentications.security.istio.io"),
            ("mutatingwebhookconfigurations", "istio-revision-tag-prod-stable"),
            ("peerauthentications", "default")} <= wrote, sorted(wrote)
    assert available(lab, f"istiod-{REVISION}")
    # istioctl made the "default" tag itself on this first install; the role made prod-stable.
    assert tags(lab) == {"prod-stable": REVISION, "default": REVISION}
    assert injector_for(lab, {"istio.io/rev": "prod-stable"}) == f"istiod-{REVISION}"
    assert injector_for(lab, {"istio-injection": "enabled"}) == f"istiod-{REVISION}"
    admission = k8s.AdmissionregistrationV1Api(lab.cluster.api_client())
    assert {w.failure_policy for h in admission.list_validating_webhook_configuration(label_selector="istio.io/rev").items
            for w in h.webhooks} == {"Ignore"}, "only istiod turns validation to fail-closed"
    pa = k8s.CustomObjectsApi(lab.cluster.api_client()).get_namespaced_custom_object(
        "security.istio.io", "v1", NS, "peerauthentications", "default")
    assert pa["spec"] == {"mtls": {"mode": "PERMISSIVE"}}
    assert pa["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "onprem.mesh"}

    mark = audit.mark()
    rc, out = run(lab, tmp_path)
    assert rc == 0 and changed(out) == 0, out
    # No istioctl install or tag set: the only requests that write are the no-op patches of the PeerAuthentication
    # (kubernetes.core's state=present patches and compares).
    assert written(lab, mark) <= {("peerauthentications", "default")}, sorted(written(lab, mark))
    after = k8s.CustomObjectsApi(lab.cluster.api_client()).get_namespaced_custom_object(
        "security.istio.io", "v1", NS, "peerauthentications", "default")
    assert after["metadata"]["resourceVersion"] == pa["metadata"]["resourceVersion"]


def test_an_install_that_did_not_finish_is_run_again(lab, tmp_path):  # pylint: disable=redefined-outer-name
    """istioctl install timed out half way (seen under TCG: some of Istio's CRDs applied, istiod created): istiod
    lacks the checksum the role writes on it after a complete install, so the next run installs again."""
    apps = k8s.AppsV1Api(lab.cluster.api_client())
    ext = k8s.ApiextensionsV1Api(lab.cluster.api_client())
    annotation = "onprem.mesh/istio-operator-sha1"
    checksum = apps.read_namespaced_deployment(f"istiod-{REVISION}", NS).metadata.annotations[annotation]
    assert len(checksum) == 40
    apps.patch_namespaced_deployment(f"istiod-{REVISION}", NS, {"metadata": {"annotations": {annotation: None}}})
    ext.delete_custom_resource_definition("wasmplugins.extensions.istio.io")
    lab.cluster.wait_for(lambda: "wasmplugins.extensions.istio.io" not in
                         [c.metadata.name for c in ext.list_custom_resource_definition().items], "the CRD gone", timeout=WAIT)
    rc, out = run(lab, tmp_path)
    assert rc == 0, out
    install = out[out.index("TASK [onprem.mesh.istio : Install the control plane revision from the IstioOperator file]"):]
    assert install.split("\n", 1)[1].lstrip().startswith("changed: [localhost]"), install[:400]
    assert ext.read_custom_resource_definition("wasmplugins.extensions.istio.io").metadata.name
    assert apps.read_namespaced_deployment(f"istiod-{REVISION}", NS).metadata.annotations[annotation] == checksum
    mark = lab.cluster.audit.mark()
    rc, out = run(lab, tmp_path)
    assert rc == 0 and changed(out) == 0, out
    assert written(lab, mark) <= {("peerauthentications", "default")}, sorted(written(lab, mark))


def test_a_run_stops_while_istiod_is_not_available(lab, tmp_path):  # pylint: disable=redefined-outer-name
    """istiod exists and the IstioOperator is unchanged, so nothing is installed: only the role's own wait stands
    between an unavailable control plane and moving tags to it."""
    cluster = lab.cluster
    core = cluster.core()
    nodes = [n.metadata.name for n in core.list_node().items]
    for node in nodes:
        core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        core.delete_collection_namespaced_pod(NS, label_selector=f"app=istiod,istio.io/rev={REVISION}")
        cluster.wait_for(lambda: not available(lab, f"istiod-{REVISION}"), "istiod not Available", timeout=WAIT)
        mark = cluster.audit.mark()
        rc, out = run(lab, tmp_path, istio_wait_timeout=5)
        assert rc != 0, out
        assert out.index("fatal:") > out.index("TASK [onprem.mesh.istio : Wait until istiod of this revision is Available]")
        assert "TASK [onprem.mesh.istio : Set the mesh-wide mTLS mode]" not in out
        assert written(lab, mark) == set(), "stopped before any write"
    finally:
        for node in nodes:
            core.patch_node(node, {"spec": {"unschedulable": False}})
    cluster.wait_for(lambda: available(lab, f"istiod-{REVISION}"), "istiod Available again", timeout=WAIT)


def test_changed_operator_file_reinstalls_the_revision(lab, tmp_path):  # pylint: disable=redefined-outer-name
    mark = lab.cluster.audit.mark()
    rc, out = run(lab, tmp_path, istio_tracing_sampling=5.0, istio_kubeclient_timeout="47s")
    assert rc == 0, out
    assert ("deployments", f"istiod-{REVISION}") in written(lab, mark), "istiod exists: the changed file made istioctl run"
    # istioctl's requests carry the role's client timeout (--kubeclient-timeout), which the API server applies too
    assert any("timeout=47s" in e.get("requestURI", "") for e in lab.cluster.audit.events(since=mark, user=ADMIN)
               if e["verb"] == "patch"), "istioctl ran with istio_kubeclient_timeout"
    dep = k8s.AppsV1Api(lab.cluster.api_client()).read_namespaced_deployment(f"istiod-{REVISION}", NS)
    env_vars = {e.name: e.value for e in dep.spec.template.spec.containers[0].env}
    assert env_vars["PILOT_TRACE_SAMPLING"] == "5"
    assert tags(lab) == {"prod-stable": REVISION, "default": REVISION}


def test_control_plane_canary_leaves_the_tags_until_asked(lab, tmp_path):  # pylint: disable=redefined-outer-name
    mark = lab.cluster.audit.mark()
    rc, out = run(lab, tmp_path, istio_revision=CANARY, istio_move_tags=False)
    assert rc == 0, out
    wrote = written(lab, mark)
    assert ("deployments", f"istiod-{CANARY}") in wrote and ("deployments", f"istiod-{REVISION}") not in wrote
    assert not [name for resource, name in wrote if name.startswith("istio-revision-tag-")], sorted(wrote)
    names = {d.metadata.name for d in k8s.AppsV1Api(lab.cluster.api_client()).list_namespaced_deployment(NS).items}
    assert names == {f"istiod-{REVISION}", f"istiod-{CANARY}"}
    assert available(lab, f"istiod-{CANARY}") and available(lab, f"istiod-{REVISION}")
    assert tags(lab) == {"prod-stable": REVISION, "default": REVISION}, "a canary control plane must not take a tag"
    assert injector_for(lab, {"istio.io/rev": "prod-stable"}) == f"istiod-{REVISION}"
    assert injector_for(lab, {"istio.io/rev": CANARY}) == f"istiod-{CANARY}"

    mark = lab.cluster.audit.mark()
    rc, out = run(lab, tmp_path, istio_revision=CANARY, istio_move_tags=True)
    assert rc == 0, out
    wrote = written(lab, mark)
    assert ("mutatingwebhookconfigurations", "istio-revision-tag-prod-stable") in wrote
    assert not [name for resource, name in wrote if resource == "deployments"], "no install: istiod-canary is there"
    # prod-stable moved. The "default" tag (istio-injection=enabled namespaces) is not in istio_revision_tags and
    # stays where istioctl put it on the first install.
    assert tags(lab) == {"prod-stable": CANARY, "default": REVISION}
    assert injector_for(lab, {"istio.io/rev": "prod-stable"}) == f"istiod-{CANARY}"
    assert injector_for(lab, {"istio-injection": "enabled"}) == f"istiod-{REVISION}"

    mark = lab.cluster.audit.mark()
    rc, out = run(lab, tmp_path, istio_revision=CANARY, istio_move_tags=True)
    assert rc == 0 and changed(out) == 0, out
    assert written(lab, mark) <= {("peerauthentications", "default")}, "the tag already points here"


# --- offline: istioctl reads the IstioOperator the role renders for each inventory ----------------------------------

def generate(tmp_path, inventory):
    out_dir = tmp_path / "rendered"
    proc = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), STEPS, "-i",
                           os.path.join(INVENTORIES, inventory, "hosts.yml"), "-e", "test_role=istio",
                           "-e", json.dumps({"test_steps": ["render.yml"], "istio_config_dir": str(out_dir)})],
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout
    (operator,) = out_dir.glob("istio-operator-*.yaml")
    # No cluster: a kubeconfig that does not exist makes any attempt to reach one fail loudly.
    gen = subprocess.run([str(istiolab.components.binary("istioctl")), "manifest", "generate", "-f", str(operator)],
                         env=dict(os.environ, KUBECONFIG=str(tmp_path / "none"), HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=120, check=False)
    assert gen.returncode == 0, gen.stderr
    docs = [d for d in yaml.safe_load_all(gen.stdout) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    return yaml.safe_load(operator.read_text()), by_name


def istiod_container(by_name, revision):
    return by_name[("Deployment", f"istiod-{revision}")]["spec"]["template"]["spec"]["containers"][0]


def injector_values(by_name, revision):
    return json.loads(by_name[("ConfigMap", f"istio-sidecar-injector-{revision}")]["data"]["values"])


def mesh_config(by_name, revision):
    return yaml.safe_load(by_name[("ConfigMap", f"istio-{revision}")]["data"]["mesh"])


def test_manifest_generate_single(tmp_path):
    dummy, by_name = generate(tmp_path, "single")
    assert ("Deployment", "istio-ingressgateway") in by_name, "profile default has the ingress gateway"
    env_vars = {e["name"]: e.get("value") for e in istiod_container(by_name, "1-30-3")["env"]}
    assert env_vars["REVISION"] == "1-30-3" and env_vars["PILOT_TRACE_SAMPLING"] == "1"
    mesh = mesh_config(by_name, "1-30-3")
    assert mesh["accessLogFile"] == "/dev/stdout" and mesh["enableTracing"] is True and mesh["enablePrometheusMerge"] is True
    assert injector_values(by_name, "1-30-3")["global"]["proxy"]["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}


def test_manifest_generate_ha(tmp_path):
    dummy, by_name = generate(tmp_path, "ha")
    env_vars = {e["name"]: e.get("value") for e in istiod_container(by_name, "1-30-3")["env"]}
    assert env_vars["PILOT_TRACE_SAMPLING"] == "0.5"
    # The memory limit set in the inventory; the CPU limit, left empty ("sets none" says the role), is Istio's default.
    assert injector_values(by_name, "1-30-3")["global"]["proxy"]["resources"] == {
        "requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": "2000m", "memory": "256Mi"}}


def test_manifest_generate_air_gapped(tmp_path):
    iop, by_name = generate(tmp_path, "airgap")
    assert iop["spec"]["revision"] == "canary"
    assert ("Deployment", "istio-ingressgateway") not in by_name, "profile minimal: istiod only"
    container = istiod_container(by_name, "canary")
    assert container["image"].startswith("registry.airgap.internal:5000/istio/pilot:")
    assert "--log_output_level=default:warn" in container["args"]
    assert mesh_config(by_name, "canary")["outboundTrafficPolicy"] == {"mode": "REGISTRY_ONLY"}
    assert injector_values(by_name, "canary")["global"]["hub"] == "registry.airgap.internal:5000/istio"
