"""OCI image archives that `ctr images import` (and `skopeo copy oci-archive:`) accept, written without a container
engine: the air-gapped control-plane images, made of the binaries tools/controlplane built.

    python3 lab/oci_images.py DIR                   # the control-plane images kubeadm 1.35 runs, one archive each
    python3 lab/oci_images.py OUT.tar --file NAME:TAG TEXT   # one image with one small file (a test's data)

Each image is one uncompressed layer with a static binary at the path the upstream image has it, and a config whose
PATH finds it: what kubeadm's static Pods and containerd's sandbox need of registry.k8s.io's images. Reproducible:
every timestamp is 0, so the same binaries give the same digests.
"""

import hashlib
import io
import json
import os
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
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image(blobs, ref, files, entrypoint=None, cmd=None):
    """Add one image's blobs; returns its manifest descriptor for index.json (named ``ref``)."""
    layer = _layer(files)
    layer_desc = dict(_blob(blobs, layer), mediaType="application/vnd.oci.image.layer.v1.tar")
    config = {"Env": [PATH_ENV]}
    if entrypoint:
        config["Entrypoint"] = entrypoint
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


def write_archive(out, images):
    """Write an OCI image layout archive of ``images`` ([(ref, {path: bytes}, entrypoint)]); returns the refs."""
    blobs = {}
    manifests = [image(blobs, ref, files, entrypoint) for ref, files, entrypoint in images]
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


def control_plane(directory, registry=REGISTRY):
    """One archive per control-plane image, from the built binaries, in ``directory`` (``<name>-<tag>.tar``, as a site
    would keep them apart to import only what a node needs); returns [(file name, [reference])]."""
    out = []
    for name, (tag, binary, path, entrypoint) in CONTROL_PLANE.items():
        with open(components.binary(binary), "rb") as fh:
            image_files = {path: fh.read()}
        file_name = "%s-%s.tar" % (name, tag)
        out.append((file_name, write_archive(os.path.join(str(directory), file_name),
                                             [("%s/%s:%s" % (registry, name, tag), image_files, entrypoint)])))
    return out


def main(argv):
    if len(argv) == 4 and argv[1] == "--file":
        refs = write_archive(argv[0], [(argv[2], {"onprem-mesh.txt": argv[3].encode() + b"\n"}, ["/onprem-mesh.txt"])])
    elif len(argv) == 1:
        os.makedirs(argv[0], exist_ok=True)
        refs = [ref for dummy, archive_refs in control_plane(argv[0]) for ref in archive_refs]
    else:
        sys.stderr.write(__doc__)
        return 2
    print("\n".join(refs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
