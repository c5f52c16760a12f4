"""containerd on the guest: Debian's package, systemd cgroups, root on the NVMe mount, answering on its socket."""
import json
import os
import re

import pytest

SOCKET = "/run/containerd/containerd.sock"


@pytest.fixture(name="root")
def root_host(host):
    """The guests are reached as root (no sudo in the image)."""
    assert host.user().name == "root"
    return host


def test_containerd_package_from_debian(host):
    assert host.package("containerd").is_installed
    assert host.package("containerd").version.startswith("1.6.")


def test_service_running_and_enabled(host):
    service = host.service("containerd")
    assert service.is_running and service.is_enabled


def test_answers_ctr_version_on_its_socket(root):
    out = root.check_output(f"ctr --address {SOCKET} version")
    assert re.search(r"Server:\s+Version:\s+1\.6\.", out), out


def test_systemd_cgroup_driver_and_cri_settings(root):
    config = root.file("/etc/containerd/config.toml").content_string
    assert "SystemdCgroup = true" in config
    assert 'root = "/var/lib/containerd"' in config
    assert 'config_path = "/etc/containerd/certs.d"' in config
    # containerd loaded the CRI plugin with that configuration.
    plugins = root.check_output(f"ctr --address {SOCKET} plugins ls")
    assert re.search(r"io\.containerd\.grpc\.v1\s+cri\s+.*\bok\b", plugins), plugins


def test_data_directory_on_the_nvme_mount(root):
    source = root.check_output("findmnt -n -o SOURCE -T /var/lib/containerd")
    assert source.startswith("/dev/nvme"), source
    assert root.check_output("findmnt -n -o TARGET -T /var/lib/containerd") == "/var/lib/containerd"
    # containerd wrote its state there (content store, snapshotters).
    assert root.file("/var/lib/containerd/io.containerd.content.v1.content").is_directory


def test_data_directory_mode_is_the_one_containerd_keeps(root):
    assert root.file("/var/lib/containerd").mode == 0o700


def test_migrated_images_are_the_ones_containerd_had_on_the_root_disk(root):
    before = root.file("/root/images.before").content_string
    assert "onprem.test/migrate:1" in before
    now = root.check_output(f"ctr --address {SOCKET} --namespace k8s.io images ls")
    # every image containerd had on the root disk is there with the same digest and size (converge imports more
    # images later, from the mirror; the columns widen with their names, hence the rows compared as words)
    had = set(tuple(line.split()) for line in before.strip().splitlines()[1:])
    assert had and had <= set(tuple(line.split()) for line in now.strip().splitlines()[1:]), (before, now)


def test_the_old_copy_under_the_mount_point_was_removed(root):
    # The root file system seen without the NVMe mount on top: nothing left under /var/lib/containerd.
    try:
        root.check_output("mkdir -p /mnt/rootfs && mount --bind / /mnt/rootfs")
        assert root.check_output("find /mnt/rootfs/var/lib/containerd -mindepth 1 | wc -l") == "0"
    finally:
        root.run("umount /mnt/rootfs")


# --- the node's binaries from the air-gapped artifact mirror (built from their Go modules by make setup) -----------

MIRROR_LOG = os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "mirror-requests.log")
PINS = os.path.join(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", ""), "mirror", "pins.json")


def pins():
    with open(PINS, encoding="utf-8") as fh:
        return json.load(fh)


def test_crictl_from_the_mirror_talks_cri_to_containerd(root):
    assert root.check_output("crictl --version") == "crictl version v%s" % pins()["container_runtime_crictl_version"]
    info = json.loads(root.check_output("crictl info"))   # the endpoint from /etc/crictl.yaml, written by the role
    conditions = dict((c["type"], c["status"]) for c in info["status"]["conditions"])
    assert conditions["RuntimeReady"] is True, info["status"]
    assert info["config"]["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is True


def test_kubeadm_kubelet_and_kubectl_are_the_pinned_release(root):
    version = "v" + pins()["kubernetes_version"]
    assert root.check_output("kubeadm version -o short") == version
    assert root.check_output("kubelet --version") == "Kubernetes " + version
    assert json.loads(root.check_output("kubectl version --client -o json"))["clientVersion"]["gitVersion"] == version
    for name in ("kubeadm", "kubelet", "kubectl"):
        binary = root.file("/usr/local/bin/" + name)
        assert binary.mode == 0o755 and binary.sha256sum == pins()["kubernetes_sha256"][name]["amd64"]


def test_kubelet_is_enabled_and_waits_for_kubeadm(root):
    assert root.service("kubelet").is_enabled
    assert not root.service("kubelet").is_running   # not started before kubeadm configures it (no restart loop)
    assert root.file("/etc/systemd/system/kubelet.service.d/10-kubeadm.conf").contains("KUBELET_KUBEADM_ARGS")


def test_cni_plugins_in_opt_cni_bin_answer_the_cni_version_command(root):
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        out = json.loads(root.check_output("CNI_COMMAND=VERSION /opt/cni/bin/%s </dev/null" % plugin))
        assert "1.0.0" in out["supportedVersions"], (plugin, out)


def test_every_download_came_from_the_mirror_over_http():
    with open(MIRROR_LOG, encoding="utf-8") as fh:
        log = fh.read()
    v = pins()
    for path in ("/cri-tools/v{0}/crictl-v{0}-linux-amd64.tar.gz".format(v["container_runtime_crictl_version"]),
                 "/kubernetes/v%s/bin/linux/amd64/kubelet" % v["kubernetes_version"],
                 "/cni-plugins/v{0}/cni-plugins-linux-amd64-v{0}.tgz".format(v["kubernetes_cni_plugins_version"]),
                 "/kubernetes/v1.35.99/bin/linux/amd64/kubeadm"):   # prepare's corrupted one, refused
        assert '"GET %s HTTP/1.1" 200' % path in log, (path, log[-2000:])


def test_the_control_plane_images_from_the_mirror_are_in_containerd(root):
    wanted = ["registry.k8s.io/pause:3.10.1", "registry.k8s.io/kube-apiserver:v" + pins()["kubernetes_version"]]
    listed = root.check_output(f"ctr --address {SOCKET} --namespace k8s.io images ls --quiet").split()
    assert set(wanted) <= set(listed), listed
    cri = json.loads(root.check_output("crictl images -o json"))["images"]
    assert set(wanted) <= set(tag for image in cri for tag in image["repoTags"]), cri
    digests = dict((a["images"][0], a["sha256"]) for a in pins()["container_runtime_image_archives"])
    for ref in wanted:   # the archive the role downloaded is the mirror's, byte for byte
        archive = "/var/cache/onprem-mesh/container_runtime/images-%s.tar" % ref.split("/")[-1].replace(":", "-")
        assert root.file(archive).sha256sum == digests[ref]


POD = {"metadata": {"name": "onprem-version", "namespace": "default", "uid": "onprem-version-check", "attempt": 0},
       "log_directory": "/var/log/onprem-version",
       # the host's network (no CNI needed); a slice as parent, as the systemd cgroup driver requires (kubelet's kubepods-*.slice)
       "linux": {"cgroup_parent": "onprem-version.slice", "security_context": {"namespace_options": {"network": 2}}}}
CONTAINER = {"metadata": {"name": "kube-apiserver"}, "command": ["kube-apiserver", "--version"], "log_path": "version.log", "linux": {}}


def test_a_container_of_the_kube_apiserver_image_runs_through_the_cri(root):
    """The sandbox is the pause image of the archive (containerd's sandbox_image), the container the kube-apiserver
    image: runc starts both with the systemd cgroup driver, and the binary in the image answers its version."""
    root.check_output("cat > /root/pod.json <<'EOF'\n%s\nEOF" % json.dumps(POD))
    image = "registry.k8s.io/kube-apiserver:v" + pins()["kubernetes_version"]
    root.check_output("cat > /root/container.json <<'EOF'\n%s\nEOF" % json.dumps(dict(CONTAINER, image={"image": image})))
    pod = root.check_output("crictl runp /root/pod.json")
    try:
        container = root.check_output("crictl create %s /root/container.json /root/pod.json" % pod)
        root.check_output("crictl start %s" % container)
        state = ""
        for dummy in range(60):   # bounded: TCG starts a process in seconds
            state = json.loads(root.check_output("crictl inspect %s" % container))["status"]["state"]
            if state == "CONTAINER_EXITED":
                break
            root.run("sleep 1")
        assert state == "CONTAINER_EXITED", state
        status = json.loads(root.check_output("crictl inspect %s" % container))["status"]
        assert status["exitCode"] == 0, status
        assert root.check_output("crictl logs %s" % container) == "Kubernetes v" + pins()["kubernetes_version"]
        sandbox = json.loads(root.check_output("crictl inspectp %s" % pod))
        assert sandbox["status"]["state"] == "SANDBOX_READY", sandbox["status"]
    finally:
        root.run("crictl stopp %s && crictl rmp %s" % (pod, pod))
