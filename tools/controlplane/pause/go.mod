// The pod sandbox's pause process, for the air-gapped control-plane images (lab/oci_images.py): what
// registry.k8s.io/pause runs (kubernetes build/pause/linux/pause.c), in Go so that it builds like the rest.
module onprem.mesh/tools/controlplane/pause

go 1.25.0
