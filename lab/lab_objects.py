"""The Kubernetes objects of the lab: namespace `lab`, Deployments payment-v1/v2, Service, DestinationRule
and VirtualService `payment` - the shapes users have in real clusters (see Istio's Bookinfo samples)."""
NAMESPACE = "lab"
SERVICE = "payment"
VERSIONS = ("v1", "v2")
ISTIO_API = "networking.istio.io/v1"
STABLE, CANARY = "v1", "v2"
PRIMARY_ROUTE = "primary"


def namespace(name=NAMESPACE):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"istio-injection": "enabled"}}}


def deployment(version, replicas=1, ns=NAMESPACE, service=SERVICE):
    labels = {"app": service, "version": version}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{service}-{version}", "namespace": ns, "labels": dict(labels)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {"containers": [{
                "name": service, "image": f"registry.lab.invalid/{service}:{version}",
                "ports": [{"containerPort": 8080}]}]}},
        },
    }


def deployment_status(replicas=1, generation=1):
    return {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}


def service(ns=NAMESPACE, name=SERVICE):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}}


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


def all_objects():
    """In creation order."""
    return [namespace(), service()] + [deployment(v) for v in VERSIONS] + [destination_rule(), virtual_service()]
