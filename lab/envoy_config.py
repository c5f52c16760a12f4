"""Envoy bootstrap for the lab's sidecar: the proxy of the `loadgen` pod, configured by the real istiod over xDS.

pilot-agent normally writes this bootstrap (Istio's tools/packaging/common/envoy_bootstrap.json); the lab writes
the parts that matter for an upstream Envoy: the node identity and metadata istiod reads (node id
`sidecar~<pod IP>~<pod>.<ns>~<ns>.svc.cluster.local`, NAMESPACE, LABELS, INTERCEPTION_MODE ...), one static cluster
`xds-grpc` to istiod's plaintext xDS port (ADS for listeners, clusters, routes and endpoints) and Istio's stats tags,
so that clusters keep Istio's names (`outbound|9080|v1|payment.lab.svc.cluster.local`).

Without iptables there is no traffic capture: the lab's Sidecar resource (lab_objects.sidecar()) asks istiod for an
egress listener bound to the pod's own IP with captureMode NONE, which Envoy opens as a real socket.
"""
import json
import os

SERVICE = "payment"
NAMESPACE = "lab"
PORT = 9080
PRIMARY_ROUTE = "primary"
T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def fqdn(host, namespace=NAMESPACE):
    """Istio resolves a short host name relative to the VirtualService's namespace."""
    if "." not in host:
        return f"{host}.{namespace}.svc.cluster.local"
    if host.count(".") == 1:  # name.namespace
        return f"{host}.svc.cluster.local"
    return host


def cluster_name(subset, host=SERVICE, port=PORT, namespace=NAMESPACE):
    return f"outbound|{port}|{subset or ''}|{fqdn(host, namespace)}"


def node_id(pod_ip, pod_name, namespace=NAMESPACE):
    return f"sidecar~{pod_ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"


def node_metadata(pod, istio_version, cluster_id="Kubernetes", mesh_id="cluster.local"):
    """What pilot-agent reports about its pod (the Pod as the kubernetes client returns it, as a dict)."""
    meta = pod["metadata"]
    labels = dict(meta.get("labels") or {})
    owner = (meta.get("owner_references") or meta.get("ownerReferences") or [{}])[0]
    workload = labels.get("app", meta["name"])
    return {
        "ISTIO_VERSION": istio_version,
        "NAMESPACE": meta["namespace"],
        "NAME": meta["name"],
        "POD_NAME": meta["name"],
        "LABELS": labels,
        "INSTANCE_IPS": pod["status"]["pod_ip"] if "pod_ip" in pod["status"] else pod["status"]["podIP"],
        "INTERCEPTION_MODE": "NONE",
        "CLUSTER_ID": cluster_id,
        "MESH_ID": mesh_id,
        "SERVICE_ACCOUNT": pod["spec"].get("service_account_name") or pod["spec"].get("serviceAccountName") or "default",
        "WORKLOAD_NAME": workload,
        "OWNER": f"kubernetes://apis/apps/v1/namespaces/{meta['namespace']}/deployments/{workload}" if owner else "",
        "NODE_NAME": pod["spec"].get("node_name") or pod["spec"].get("nodeName") or "",
        "PROXY_CONFIG": {"discoveryAddress": "istiod", "statusPort": 15020},
    }


def bootstrap(pod, xds_address, istio_version, admin_port=0):
    """The bootstrap for the proxy of `pod` (dict), xDS from istiod at xds_address (ip, port)."""
    meta = pod["metadata"]
    ip = node_metadata(pod, istio_version)["INSTANCE_IPS"]
    xds_ip, xds_port = xds_address
    return {
        "node": {"id": node_id(ip, meta["name"], meta["namespace"]),
                 "cluster": f"{(meta.get('labels') or {}).get('app', meta['name'])}.{meta['namespace']}",
                 "metadata": node_metadata(pod, istio_version)},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
            "ads_config": {"api_type": "GRPC", "set_node_on_first_message_only": True, "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "alt_stat_name": "xds-grpc;", "type": "STATIC", "connect_timeout": "1s",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T_HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": xds_ip, "port_value": xds_port}}}}]}]},
        }]},
        # Istio's cluster stats carry the alt_stat_name "<cluster>;" - its own tag regexes, from its bootstrap
        "stats_flush_interval": "1s",  # histograms reach /stats/prometheus at each flush (default 5 s)
        "stats_config": {"use_all_default_tags": False, "stats_tags": [
            {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
            {"tag_name": "response_code", "regex": r"_rq(_(\d{3}))$"},
            {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
            {"tag_name": "http_conn_manager_prefix", "regex": r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"},
            {"tag_name": "listener_address", "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
        ]},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                                      "downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 10000}}]},
    }


def write_bootstrap(run_dir, pod, xds_address, istio_version):
    path = os.path.join(run_dir, "envoy-bootstrap.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(bootstrap(pod, xds_address, istio_version), fh, indent=1)
    return path


def route_weights(config_dump, route=PRIMARY_ROUTE):
    """{subset: weight} of the named HTTP route as Envoy has it now (from /config_dump), or None.

    Envoy's weighted_clusters list the clusters istiod generated (`outbound|9080|v1|...`; istiod leaves out
    destinations of weight 0); a route with one destination has a plain `cluster` instead (weight 100).
    Takes the whole dump or the `?resource=dynamic_route_configs` form."""
    dynamic = []
    for section in config_dump.get("configs", []):
        if "route_config" in section:
            dynamic.append(section)
        dynamic.extend(section.get("dynamic_route_configs", []))
    for dyn in dynamic:
        for vhost in (dyn.get("route_config") or {}).get("virtual_hosts", []):
            for r in vhost.get("routes", []):
                if r.get("name") != route:
                    continue
                action = r.get("route") or {}
                if "cluster" in action:
                    return {action["cluster"].split("|")[2]: 100}
                clusters = (action.get("weighted_clusters") or {}).get("clusters", [])
                return {c["name"].split("|")[2]: int(c.get("weight", 0)) for c in clusters}
    return None
