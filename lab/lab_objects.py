"""The Kubernetes objects of the lab: namespace `lab` in the mesh, Deployments payment-v1/v2 and the client loadgen,
Service payment, DestinationRule and VirtualService payment (the shapes of Istio's Bookinfo samples), and the
Sidecar that gives loadgen's proxy a real listening socket (no iptables here)."""
NAMESPACE = "lab"
SERVICE = "payment"
CLIENT = "loadgen"
PORT = 9080
VERSIONS = ("v1", "v2")
ISTIO_API = "networking.istio.io/v1"
STABLE, CANARY = "v1", "v2"
PRIMARY_ROUTE = "primary"
REVISION_TAG = "prod-stable"


def namespace(name=NAMESPACE, tag=REVISION_TAG):
    """In the mesh through the revision tag, as the mesh_namespace role labels namespaces."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"istio.io/rev": tag}}}


def deployment(name, labels, replicas=1, ns=NAMESPACE, port=PORT):
    container = {"name": labels["app"], "image": f"registry.lab.invalid/{labels['app']}:{labels.get('version', '1')}"}
    if port:
        container["ports"] = [{"name": "http", "containerPort": port}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [container]}},
        },
    }


def workload(version, replicas=1, ns=NAMESPACE, service=SERVICE):
    return deployment(f"{service}-{version}", {"app": service, "version": version}, replicas, ns)


def client(ns=NAMESPACE):
    return deployment(CLIENT, {"app": CLIENT}, 1, ns, port=None)


def service(ns=NAMESPACE, name=SERVICE, port=PORT):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}


def destination_rule(ns=NAMESPACE, name=SERVICE):
    return {"apiVersion": ISTIO_API, "kind": "DestinationRule", "metadata": {"name": name, "namespace": ns},
            "spec": {"host": name, "subsets": [{"name": v, "labels": {"version": v}} for v in VERSIONS]}}


def virtual_service(ns=NAMESPACE, name=SERVICE, canary_weight=0, timeout="10s"):
    """Header-matched route (end-user: jason -> v2) in front of the weighted default route (v1/v2)."""
    return {
        "apiVersion": ISTIO_API, "kind": "VirtualService", "metadata": {"name": name, "namespace": ns},
        "spec": {
            "hosts": [name],
            "http": [
                {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": name, "subset": CANARY}}]},
                {"name": PRIMARY_ROUTE,
                 "route": [{"destination": {"host": name, "subset": STABLE}, "weight": 100 - canary_weight},
                           {"destination": {"host": name, "subset": CANARY}, "weight": canary_weight}],
                 "timeout": timeout},
            ],
        },
    }


def sidecar(bind_ip, ns=NAMESPACE, port=PORT, app=CLIENT):
    """Istio's Sidecar API for proxies without traffic capture: an egress listener on the pod's IP."""
    return {"apiVersion": ISTIO_API, "kind": "Sidecar", "metadata": {"name": app, "namespace": ns},
            "spec": {"workloadSelector": {"labels": {"app": app}},
                     "egress": [{"port": {"number": port, "protocol": "HTTP", "name": "http"},
                                 "bind": bind_ip, "captureMode": "NONE", "hosts": ["./*"]}]}}
