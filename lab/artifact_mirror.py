"""The air-gapped artifact mirror, built from the binaries of tools/controlplane (never downloaded).

The layout is what the roles read under their ``*_mirror_url`` (the upstream release paths, as README's
"Air-gapped sites" shows a site building it), each file with a ``<file>.sha256`` beside it as upstream publishes:

    kubernetes/v<ver>/bin/linux/amd64/{kubeadm,kubelet,kubectl}       kubernetes role
    cni-plugins/v<ver>/cni-plugins-linux-amd64-v<ver>.tgz              kubernetes role (bridge, host-local, loopback, portmap)
    cri-tools/v<ver>/crictl-v<ver>-linux-amd64.tar.gz                  container_runtime role
    istio/<ver>/istioctl-<ver>-linux-amd64.tar.gz                      istio role
    images/<image>-<tag>.tar                                           container_runtime role (image archives, one per image)

    python3 lab/artifact_mirror.py DIR [--serve] [--port N]   # write the mirror (and serve it on 127.0.0.1)

build(directory) returns the role variables that pin what it wrote (versions and sha256s), for a playbook's -e.
"""

import argparse
import hashlib
import http.server
import io
import json
import os
import sys
import tarfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "controlplane"))
import components  # noqa: E402  pylint: disable=wrong-import-position
import oci_images  # noqa: E402  pylint: disable=wrong-import-position

ARCH = "amd64"   # what tools/controlplane builds
KUBERNETES_BINARIES = ("kubeadm", "kubelet", "kubectl")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


class Mirror:
    """A static HTTP server on 127.0.0.1 over a directory (the air-gapped artifact mirror). ``requests`` lists the
    paths asked for, in order."""

    def __init__(self, directory, port=0):
        self.directory = str(directory)
        self.requests = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format, *args):  # pylint: disable=redefined-builtin
                requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), lambda *a, **kw: Handler(*a, directory=self.directory, **kw))
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, name="lab-mirror", daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _publish(directory, rel, data):
    """Write ``data`` at ``rel`` with ``<rel>.sha256`` ("<hex>  <name>", as upstream); returns the hex digest."""
    path = os.path.join(str(directory), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return _sha256_file(path)


def _sha256_file(path):
    """Write ``<path>.sha256`` for a file in place (mode 0644); returns the hex digest."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    os.chmod(path, 0o644)
    with open(path + ".sha256", "w", encoding="utf-8") as fh:
        fh.write(f"{digest.hexdigest()}  {os.path.basename(path)}\n")
    return digest.hexdigest()


def _tgz(members):
    """A reproducible .tar.gz of {name in the archive: path of a built binary} (mode 0755, owner root, mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for arcname, path in members.items():
            info = tar.gettarinfo(str(path), arcname=arcname)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o755
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def kubernetes_binaries(directory, version=components.KUBERNETES_VERSION):
    """kubeadm, kubelet, kubectl as dl.k8s.io lays them out; returns {binary: sha256}."""
    rel = f"kubernetes/{version}/bin/linux/{ARCH}"
    return dict((name, _publish(directory, f"{rel}/{name}", _read(components.binary(name)))) for name in KUBERNETES_BINARIES)


def cni_plugins(directory, version=components.CNI_PLUGINS_VERSION):
    """The CNI plugins tarball as the containernetworking/plugins release names it (plugins at the top level)."""
    name = f"cni-plugins-linux-{ARCH}-{version}.tgz"
    return _publish(directory, f"cni-plugins/{version}/{name}", _tgz(dict((p, components.binary(p)) for p in CNI_PLUGINS)))


def crictl(directory, version=components.CRI_TOOLS_VERSION):
    """crictl's release tarball (crictl at the top level)."""
    return _publish(directory, f"cri-tools/{version}/crictl-{version}-linux-{ARCH}.tar.gz", _tgz({"crictl": components.binary("crictl")}))


def istioctl(directory, version=components.ISTIO_RELEASE):
    """istioctl's release tarball (istioctl-<v>-linux-amd64.tar.gz; Istio's versions carry no "v")."""
    return _publish(directory, f"istio/{version}/istioctl-{version}-linux-{ARCH}.tar.gz", _tgz({"istioctl": components.binary("istioctl")}))


def _image_archives(directory, write):
    target = os.path.join(str(directory), "images")
    os.makedirs(target, exist_ok=True)
    return [{"file": name, "sha256": _sha256_file(os.path.join(target, name)), "images": refs} for name, refs in write(target)]


def control_plane_images(directory, addons=False):
    """The control-plane images kubeadm runs, one OCI archive each (lab/oci_images.py) under images/ (with ``addons``,
    kube-proxy's and CoreDNS's too); returns the container_runtime_image_archives items for them."""
    return _image_archives(directory, lambda target: oci_images.control_plane(target, addons=addons))


def istio_images(directory):
    """istiod's and the sidecar's images (the tag istioctl installs by default), under images/ like the others."""
    return _image_archives(directory, oci_images.istio)


def build(directory, parts=("kubernetes", "cni", "crictl", "istioctl", "images")):
    """Write the mirror; return the role variables that pin it (kubernetes_version, kubernetes_sha256, ...), without
    the mirror URLs (they depend on where it is served)."""
    out = {}
    if "kubernetes" in parts:
        sums = kubernetes_binaries(directory)
        out["kubernetes_version"] = components.KUBERNETES_VERSION.lstrip("v")
        out["kubernetes_sha256"] = dict((name, {ARCH: digest}) for name, digest in sums.items())
    if "cni" in parts:
        out["kubernetes_cni_plugins_version"] = components.CNI_PLUGINS_VERSION.lstrip("v")
        out.setdefault("kubernetes_sha256", {})["cni_plugins"] = {ARCH: cni_plugins(directory)}
    if "crictl" in parts:
        out["container_runtime_crictl_version"] = components.CRI_TOOLS_VERSION.lstrip("v")
        out["container_runtime_crictl_sha256"] = {ARCH: crictl(directory)}
    if "images" in parts or "cluster-images" in parts:
        out["container_runtime_image_archives"] = control_plane_images(directory, addons="cluster-images" in parts)
    if "istio-images" in parts:
        out.setdefault("container_runtime_image_archives", []).extend(istio_images(directory))
    if "istioctl" in parts:
        out["istio_version"] = components.ISTIO_RELEASE
        out["istio_istioctl_sha256"] = {ARCH: istioctl(directory)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("directory")
    parser.add_argument("--serve", action="store_true", help="serve it on 127.0.0.1 until interrupted")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cluster", action="store_true",
                        help="add kube-proxy's, CoreDNS's, istiod's and the sidecar's images "
                        "(tools/controlplane/build.py kube-proxy coredns)")
    args = parser.parse_args(argv)
    pins = build(args.directory, ("kubernetes", "cni", "crictl", "istioctl", "cluster-images" if args.cluster else "images")
                 + (("istio-images",) if args.cluster else ()))
    with open(os.path.join(args.directory, "pins.json"), "w", encoding="utf-8") as fh:
        json.dump(pins, fh, indent=1, sort_keys=True)
    print(json.dumps(pins, indent=1, sort_keys=True))
    if args.serve:
        with Mirror(args.directory, args.port) as mirror:
            print(f"serving {args.directory} at {mirror.url} (Ctrl-C stops)", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
