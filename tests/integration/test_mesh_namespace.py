"""mesh_namespace through ansible-playbook against the lab's real control plane (tests/support/cluster_fixtures.py).

kube-apiserver 1.35 with Istio 1.30 installed by the istio role (revision 1-30-3, revision tags prod-stable and default,
istiod running): the namespaces the role labels get their sidecars from istiod's injection webhook, the scheduler and
KWOK place and run the pods, and every PeerAuthentication the role writes goes through Istio's CRD schema and istiod's
validating webhook. Each test works in namespaces of its own (cluster.namespace()).

Pods without a working sidecar are made the way a cluster makes them: created before the namespace was labelled,
opted out with sidecar.istio.io/inject=false, on the host network, asking for more memory than any node has (the
scheduler's own "Insufficient memory"), a Job that finished (KWOK completes it), a pod being deleted (held by a
finalizer, as a grace period holds it on a real node). The one status written by hand is a failing readiness probe of
istio-proxy: no kubelet runs probes here. Which webhook injected a pod, and how many writes the role sent, are read from
the API server's audit log.
"""
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.request

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "mesh_namespace", "mesh.yml")
VENV_BIN = os.path.dirname(sys.executable)
INJECT = "sidecar.istio.io/inject"
ADMIN = "lab-admin"                     # the admin kubeconfig's user: the role's requests in the audit log
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
HOLD = "onprem.mesh.test/hold"          # a finalizer that keeps a deleted pod Terminating until the test lets it go
NO_CHECKS = dict(mesh_namespace_verify_sidecars=False, mesh_namespace_mtls_mode="")
WAIT = 90.0                             # seconds allowed for any pod or Deployment state (KWOK needs about one)


def run(cluster, tmp_path, **variables):
    """Run the role; return (rc, output, report)."""
    report = tmp_path / "report.json"
    if report.exists():
        report.unlink()
    variables = dict(mesh_namespace_kubeconfig=cluster.kubeconfig, test_report_file=str(report), **variables)
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


# --- the audit log and istiod's own counters ----------------------------------------------------------------------

def admin_events(cluster, since, namespace=None, resource=None):
    """Completed requests of the admin user (the role, and this test) after the mark `since`."""
    return [e for e in cluster.audit.events(since=since, user=ADMIN, namespace=namespace, resource=resource)
            if e.get("stage") == "ResponseComplete"]


def writes(cluster, since, namespace=None, resource=None, accepted_only=False):
    return [e for e in admin_events(cluster, since, namespace, resource) if e["verb"] in WRITE_VERBS
            and (not accepted_only or e.get("responseStatus", {}).get("code", 0) < 400)]


def injected_by(cluster, since, namespace):
    """{pod: [mutating webhook configurations that changed it]} for the pods created in namespace after `since`."""
    found = {}
    for event in cluster.audit.events(since=since, namespace=namespace, resource="pods"):
        ref = event.get("objectRef") or {}
        if event.get("stage") != "ResponseComplete" or event["verb"] != "create" or ref.get("subresource"):
            continue
        found[ref.get("name")] = [json.loads(value)["configuration"]
                                  for key, value in (event.get("annotations") or {}).items()
                                  if key.startswith("mutation.webhook.admission.k8s.io/") and json.loads(value)["mutated"]]
    return found


def validations_passed(cluster):
    """istiod's count of PeerAuthentications its validating webhook accepted (its monitoring port, on the lab's pod IP)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{cluster.istio.monitoring_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r'^galley_validation_passed\{[^}]*resource="peerauthentications"[^}]*\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# --- objects -------------------------------------------------------------------------------------------------------

def label(cluster, namespace, labels):
    cluster.core().patch_namespace(namespace, {"metadata": {"labels": labels}})


def labels_of(cluster, namespace):
    return cluster.core().read_namespace(namespace).metadata.labels or {}


# pylint: disable-next=too-many-arguments
def pod(cluster, namespace, name, annotations=None, labels=None, spec=None, memory=None):
    body = {"metadata": {"name": name, "labels": labels or {"app": name}, "annotations": annotations or {}},
            "spec": dict({"containers": [{"name": "app", "image": "app:1"}]}, **(spec or {}))}
    if memory:
        body["spec"]["containers"][0]["resources"] = {"requests": {"memory": memory}}
    cluster.core().create_namespaced_pod(namespace, body)


# pylint: disable-next=too-many-arguments
def deployment(cluster, namespace, name, template_annotations=None, finalizers=None):
    template = {"labels": {"app": name}, "annotations": template_annotations or {}}
    if finalizers:
        template["finalizers"] = finalizers
    k8s.AppsV1Api(cluster.api_client()).create_namespaced_deployment(namespace, {
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": template, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}})


def pods(cluster, namespace):
    return {p.metadata.name: p for p in cluster.core().list_namespaced_pod(namespace).items}


def running(p):
    return p.status.phase == "Running" and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])


def containers(p):
    return [c.name for c in p.spec.containers]


def wait_running(cluster, namespace, names):
    cluster.wait_for(lambda: all(n in pods(cluster, namespace) and running(pods(cluster, namespace)[n]) for n in names),
                     f"pods {names} of {namespace} Running and Ready", timeout=WAIT)


def wait_available(cluster, namespace, *names):
    apps = k8s.AppsV1Api(cluster.api_client())

    def available():
        for name in names:
            dep = apps.read_namespaced_deployment(name, namespace)
            status = dep.status
            if (status.observed_generation or 0) < dep.metadata.generation or status.available_replicas != 1 \
                    or status.updated_replicas != 1 or status.replicas != 1:
                return False
        return True

    cluster.wait_for(available, f"Deployments {names} of {namespace} available", timeout=WAIT)


def pods_of(cluster, namespace, app):
    return {n: p for n, p in pods(cluster, namespace).items() if (p.metadata.labels or {}).get("app") == app}


def fail_readiness(cluster, namespace, name, container="istio-proxy"):
    """Write the status kubelet reports while a container's readiness probe fails (KWOK runs no probes)."""
    core = cluster.core()
    current = core.read_namespaced_pod_status(name, namespace)
    for status in current.status.container_statuses:
        if status.name == container:
            status.ready = False
    for condition in current.status.conditions:
        if condition.type in ("Ready", "ContainersReady"):
            condition.status, condition.reason = "False", "ContainersNotReady"
    core.replace_namespaced_pod_status(name, namespace, current)


def release(cluster, namespace):
    """Let the pods held by the test finalizer go, so the namespace can be deleted."""
    core = cluster.core()
    for p in core.list_namespaced_pod(namespace).items:
        if HOLD in (p.metadata.finalizers or []):
            core.patch_namespaced_pod(p.metadata.name, namespace, {"metadata": {"finalizers": None}})


def peer_authentication(cluster, namespace):
    objs = k8s.CustomObjectsApi(cluster.api_client()).list_namespaced_custom_object(
        "security.istio.io", "v1", namespace, "peerauthentications")
    return {o["metadata"]["name"]: o["spec"]["mtls"]["mode"] for o in objs["items"]}


# --- labels --------------------------------------------------------------------------------------------------------

def test_revision_label_replaces_the_overriding_injection_label(cluster, tmp_path):
    shop = cluster.namespace("shop", {"istio-injection": "enabled", "team": "shop"})
    web = cluster.namespace("web")
    mark = cluster.audit.mark()
    pod(cluster, shop, "before")
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop}, {"name": web}], **NO_CHECKS)
    assert rc == 0, out
    assert labels_of(cluster, shop) == {"istio.io/rev": "prod-stable", "team": "shop", "kubernetes.io/metadata.name": shop}
    assert labels_of(cluster, web)["istio.io/rev"] == "prod-stable" and "istio-injection" not in labels_of(cluster, web)
    pod(cluster, shop, "after")
    pod(cluster, web, "after")
    # istio-injection=enabled is served by the "default" tag istioctl made; istio.io/rev=prod-stable by the tag the
    # istio role made. Both point at 1-30-3 here, so only the webhook that injected tells which label was followed.
    assert injected_by(cluster, mark, shop) == {"before": ["istio-revision-tag-default"],
                                                "after": ["istio-revision-tag-prod-stable"]}
    assert injected_by(cluster, mark, web) == {"after": ["istio-revision-tag-prod-stable"]}
    assert "istio-proxy" in containers(pods(cluster, web)["after"])
    versions = {n: cluster.core().read_namespace(n).metadata.resource_version for n in (shop, web)}
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop}, {"name": web}], **NO_CHECKS)
    assert rc == 0 and changed(out) == 0, out
    assert {n: cluster.core().read_namespace(n).metadata.resource_version for n in (shop, web)} == versions


def test_injection_enabled_removes_the_revision_label(cluster, tmp_path):
    # A namespace pinned to a revision that is not installed (any more): no webhook matches, pods get no sidecar.
    legacy = cluster.namespace("legacy", {"istio.io/rev": "1-27-3"})
    mark = cluster.audit.mark()
    pod(cluster, legacy, "pinned")
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": legacy, "injection": "enabled"}], **NO_CHECKS)
    assert rc == 0, out
    got = labels_of(cluster, legacy)
    assert got.get("istio-injection") == "enabled" and "istio.io/rev" not in got
    pod(cluster, legacy, "after")
    assert injected_by(cluster, mark, legacy) == {"pinned": [], "after": ["istio-revision-tag-default"]}
    assert containers(pods(cluster, legacy)["pinned"]) == ["app"]
    assert containers(pods(cluster, legacy)["after"]) == ["app", "istio-proxy"]


# --- stops before any change ---------------------------------------------------------------------------------------

def test_missing_namespace_stops_before_any_change(cluster, tmp_path):
    shop = cluster.namespace("shop", {"istio-injection": "enabled"})
    ghost = f"ghost-{secrets.token_hex(3)}"
    mark = cluster.audit.mark()
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop}, {"name": ghost}], **NO_CHECKS)
    events = admin_events(cluster, mark)
    assert rc != 0, out
    assert f"Namespace {ghost} listed in mesh_namespace_list does not exist" in out, out
    assert "No namespace was changed" in out
    looked_up = {(e["objectRef"].get("name"), e["responseStatus"]["code"]) for e in events
                 if e["verb"] == "get" and e["objectRef"].get("resource") == "namespaces"}
    assert {(shop, 200), (ghost, 404)} <= looked_up, "the audit log sees the role's requests"
    assert [e for e in events if e["verb"] in WRITE_VERBS] == [], "no write may happen"
    assert labels_of(cluster, shop).get("istio-injection") == "enabled"


def test_wrong_answer_fails_at_the_start_naming_the_field(cluster, tmp_path):
    shop = cluster.namespace("shop")
    mark = cluster.audit.mark()
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop, "mtls": "STRICTT"}])
    assert rc != 0 and "mtls" in out and "STRICTT" in out, out
    assert admin_events(cluster, mark) == [], "the input is checked before the cluster is contacted"


# --- the 2/2 report ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(cluster):  # pylint: disable=redefined-outer-name
    """A namespace following prod-stable with one pod of each kind the 2/2 check tells apart."""
    name = cluster.namespace("mixed")
    pod(cluster, name, "old")                                    # created before injection was enabled
    wait_running(cluster, name, ["old"])
    label(cluster, name, {"istio.io/rev": "prod-stable"})
    pod(cluster, name, "meshed")
    pod(cluster, name, "native", annotations={"sidecar.istio.io/nativeSidecar": "true"})
    pod(cluster, name, "optout", annotations={INJECT: "false"})
    pod(cluster, name, "hostnet", spec={"hostNetwork": True})
    pod(cluster, name, "hungry", memory="2Ti")                   # the KWOK nodes have 1Ti each
    pod(cluster, name, "starting")
    k8s.BatchV1Api(cluster.api_client()).create_namespaced_job(name, {
        "metadata": {"name": "job-done"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "app", "image": "app:1"}]}}}})
    wait_running(cluster, name, ["old", "meshed", "native", "optout", "hostnet", "starting"])

    def settled():
        now = pods(cluster, name)
        hungry = [c for c in now["hungry"].status.conditions or [] if c.type == "PodScheduled" and c.status == "False"]
        return hungry and [p.status.phase for n, p in now.items() if n.startswith("job-done-")] == ["Succeeded"]

    cluster.wait_for(settled, "hungry unschedulable and the Job's pod Succeeded", timeout=WAIT)
    fail_readiness(cluster, name, "starting")
    now = pods(cluster, name)
    # What the injector did, as the report will have to read it.
    assert containers(now["meshed"]) == ["app", "istio-proxy"] and containers(now["hungry"]) == ["app", "istio-proxy"]
    assert containers(now["native"]) == ["app"]
    native = [(c.name, c.restart_policy) for c in now["native"].spec.init_containers]
    assert native == [("istio-init", None), ("istio-proxy", "Always")]
    assert containers(now["old"]) == containers(now["optout"]) == containers(now["hostnet"]) == ["app"]
    return name


def test_two_of_two_report_names_each_pod_and_its_cause(cluster, mixed, tmp_path):  # pylint: disable=redefined-outer-name
    rc, out, report = run(cluster, tmp_path, mesh_namespace_list=[{"name": mixed}], mesh_namespace_mtls_mode="",
                          mesh_namespace_fail_on_missing_sidecar=False, mesh_namespace_proxy_memory_request="192Mi")
    assert rc == 0, out
    by_pod = {p["pod"]: p for p in report}
    assert sorted(by_pod) == ["hostnet", "hungry", "meshed", "native", "old", "optout", "starting"], \
        "the finished Job's pod is left out"
    assert by_pod["meshed"]["ok"] and by_pod["meshed"]["ready"] == "2/2"
    assert by_pod["native"]["ok"] and by_pod["native"]["ready"] == "2/2", "native sidecars (init container, Always) count"
    assert not by_pod["old"]["sidecar"] and "created before injection was enabled" in by_pod["old"]["cause"]
    assert "injection disabled on the pod (annotation sidecar.istio.io/inject=false)" in by_pod["optout"]["cause"]
    assert by_pod["hostnet"]["cause"] == "host-network pods are never injected"
    hungry = by_pod["hungry"]
    assert hungry["sidecar"] and hungry["phase"] == "Pending" and "pending for lack of memory" in hungry["cause"]
    assert "192Mi" in hungry["cause"] and "2 Insufficient memory" in hungry["cause"], "the scheduler's own message"
    assert by_pod["starting"]["ready"] == "1/2" and "not all containers are ready (1/2)" in by_pod["starting"]["cause"]
    assert f"{mixed}/old (1/1, Running): created before injection" in out


def test_missing_sidecars_fail_the_play_by_default(cluster, mixed, tmp_path):  # pylint: disable=redefined-outer-name
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": mixed}])
    assert rc != 0, out
    for name in ("old", "optout", "hostnet", "hungry", "starting"):
        assert f"{mixed}/{name} (" in out, name
    assert f"{mixed}/meshed (" not in out and f"{mixed}/native (" not in out
    assert "mesh_namespace_fail_on_missing_sidecar" in out


# --- mTLS ----------------------------------------------------------------------------------------------------------

def healthy_namespace(cluster, prefix, without_sidecar=()):
    """A namespace following prod-stable with an injected Deployment `api`; the pods named in without_sidecar are
    created before the label, so they have none."""
    name = cluster.namespace(prefix)
    for bare in without_sidecar:
        pod(cluster, name, bare)
    label(cluster, name, {"istio.io/rev": "prod-stable"})
    deployment(cluster, name, "api")
    wait_available(cluster, name, "api")
    wait_running(cluster, name, list(without_sidecar))
    assert [containers(p) for p in pods_of(cluster, name, "api").values()] == [["app", "istio-proxy"]]
    return name


def test_strict_is_reached_through_permissive(cluster, tmp_path):
    pay = healthy_namespace(cluster, "pay")
    validated = validations_passed(cluster)
    mark = cluster.audit.mark()
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": pay, "mtls": "STRICT"}])
    assert rc == 0, out
    assert peer_authentication(cluster, pay) == {"default": "STRICT"}
    # The stages are visible in the writes the API server accepted: first created (PERMISSIVE), then changed (STRICT);
    # istiod's validating webhook reviewed each of them.
    accepted = writes(cluster, mark, namespace=pay, resource="peerauthentications", accepted_only=True)
    assert [e["verb"] for e in accepted] == ["create", "patch"], accepted
    assert validations_passed(cluster) - validated == len(accepted)
    assert "Stage 1, PERMISSIVE, for " + pay in out and "Stage 2, STRICT, for " + pay in out
    assert out.index("Stage 1, PERMISSIVE") < out.index("Check every Deployment is available under PERMISSIVE") \
        < out.index("Stage 2, STRICT") < out.index("Check every Deployment is still available under STRICT")
    mark = cluster.audit.mark()
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": pay, "mtls": "STRICT"}])
    assert rc == 0 and changed(out) == 0, out
    assert writes(cluster, mark, namespace=pay, resource="peerauthentications") == []
    # The objects went through the real CRD schema: the same server refuses a mode the schema does not allow.
    with pytest.raises(ApiException) as refused:
        k8s.CustomObjectsApi(cluster.api_client()).create_namespaced_custom_object(
            "security.istio.io", "v1", pay, "peerauthentications", {
                "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "bad"},
                "spec": {"mtls": {"mode": "STRICTT"}}})
    assert refused.value.status == 422 and "spec.mtls.mode" in refused.value.body


def test_default_mode_is_permissive(cluster, tmp_path):
    pay = healthy_namespace(cluster, "pay")
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": pay}])
    assert rc == 0, out
    assert peer_authentication(cluster, pay) == {"default": "PERMISSIVE"}


def test_strict_is_refused_while_a_pod_lacks_its_sidecar(cluster, tmp_path):
    pay = healthy_namespace(cluster, "pay", without_sidecar=["batch-x1"])
    mark = cluster.audit.mark()
    rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": pay, "mtls": "STRICT"}],
                         mesh_namespace_fail_on_missing_sidecar=False)
    assert rc != 0, out
    assert f"{pay} stays PERMISSIVE" in out and "batch-x1" in out, out
    assert peer_authentication(cluster, pay) == {"default": "PERMISSIVE"}
    assert [e["verb"] for e in writes(cluster, mark, namespace=pay, resource="peerauthentications",
                                      accepted_only=True)] == ["create"], "STRICT was never written"


# --- restart -------------------------------------------------------------------------------------------------------

def restarted_at(cluster, namespace, name):
    dep = k8s.AppsV1Api(cluster.api_client()).read_namespaced_deployment(name, namespace)
    return (dep.spec.template.metadata.annotations or {}).get("kubectl.kubernetes.io/restartedAt")


def test_restart_only_deployments_whose_pods_lack_sidecars(cluster, tmp_path):
    shop = cluster.namespace("shop")
    # cart's pods carry a finalizer: a replaced pod stays Terminating, as it does on a real node for its grace period
    # (30 s by default) after the new pod is available and the rollout has finished.
    deployment(cluster, shop, "cart", finalizers=[HOLD])
    wait_available(cluster, shop, "cart")
    label(cluster, shop, {"istio.io/rev": "prod-stable"})
    deployment(cluster, shop, "meshed")
    deployment(cluster, shop, "optout", template_annotations={INJECT: "false"})
    try:
        wait_available(cluster, shop, "cart", "meshed", "optout")
        (old_cart,) = pods_of(cluster, shop, "cart")
        assert containers(pods_of(cluster, shop, "cart")[old_cart]) == ["app"]
        rc, out, report = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop, "restart": True}],
                              mesh_namespace_mtls_mode="", mesh_namespace_fail_on_missing_sidecar=False)
        assert rc == 0, out
        assert restarted_at(cluster, shop, "cart") and not restarted_at(cluster, shop, "meshed")
        assert not restarted_at(cluster, shop, "optout")
        # The restart is a real rollout: a new ReplicaSet whose pod the injector gave a sidecar, KWOK ran it, and the
        # old pod was deleted (still Terminating here); the 2/2 check reads the new one and leaves the old one out.
        carts = pods_of(cluster, shop, "cart")
        assert carts[old_cart].metadata.deletion_timestamp is not None
        (new_cart,) = [n for n in carts if n != old_cart]
        assert containers(carts[new_cart]) == ["app", "istio-proxy"] and running(carts[new_cart])
        by_pod = {p["pod"]: p for p in report}
        assert old_cart not in by_pod, "a terminating pod is not a pod to fix"
        assert by_pod[new_cart]["ok"] and by_pod[new_cart]["ready"] == "2/2"
        (optout,) = pods_of(cluster, shop, "optout")
        assert by_pod[optout]["cause"].startswith("injection disabled on the pod")
        assert [p["ok"] for n, p in by_pod.items() if n in pods_of(cluster, shop, "meshed")] == [True]
        # Run again while the old pod is still terminating: nothing left to restart.
        first = restarted_at(cluster, shop, "cart")
        rc, out, dummy = run(cluster, tmp_path, mesh_namespace_list=[{"name": shop, "restart": True}],
                             mesh_namespace_mtls_mode="", mesh_namespace_fail_on_missing_sidecar=False)
        assert rc == 0 and changed(out) == 0, out
        assert restarted_at(cluster, shop, "cart") == first
        assert old_cart in pods_of(cluster, shop, "cart"), "the second run ran while the old pod was terminating"
    finally:
        release(cluster, shop)
