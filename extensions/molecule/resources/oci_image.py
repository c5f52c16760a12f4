"""Write a minimal OCI image archive (one layer with one file) that `ctr images import` accepts.

    python3 oci_image.py OUT.tar NAME:TAG

Used by the container_runtime scenario to give containerd data before nvme_storage migrates its root; built
here because the guests reach no registry.
"""
import hashlib
import io
import json
import sys
import tarfile


def _blob(files, data):
    digest = hashlib.sha256(data).hexdigest()
    files["blobs/sha256/" + digest] = data
    return {"digest": "sha256:" + digest, "size": len(data)}


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main(out, ref):
    files = {}
    layer = _tar({"onprem-mesh.txt": ("image %s, made for the migration test\n" % ref).encode()})
    layer_desc = dict(_blob(files, layer), mediaType="application/vnd.oci.image.layer.v1.tar")
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/onprem-mesh.txt"]},
                         "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}, sort_keys=True).encode()
    config_desc = dict(_blob(files, config), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_desc, "layers": [layer_desc]}, sort_keys=True).encode()
    manifest_desc = dict(_blob(files, manifest), mediaType="application/vnd.oci.image.manifest.v1+json",
                         platform={"architecture": "amd64", "os": "linux"},
                         annotations={"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref})
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}, sort_keys=True).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    with open(out, "wb") as f:
        f.write(_tar(files))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
