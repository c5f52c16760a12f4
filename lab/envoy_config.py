"""Envoy configuration for the lab: bootstrap, the listener (LDS) and routes (RDS) served from files.

Names follow Istio's sidecar conventions so that stats look like a real mesh's:
clusters `outbound|<port>|<subset>|<host FQDN>`, the outbound route configuration named after the port.
Listener and routes are *path-based xDS*: Envoy watches a directory and reloads a file when a new version
is renamed into it (`write_xds` writes a temp file beside it and renames it, the only safe way).
"""
import json
import os
import threading

SERVICE = "payment"
NAMESPACE = "lab"
PORT = 8080
ROUTE_CONFIG_NAME = str(PORT)  # Istio names outbound route configurations after the port
LISTENER_NAME = f"0.0.0.0_{PORT}"

T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
T_ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def fqdn(host, namespace=NAMESPACE):
    """Istio resolves a short host name relative to the VirtualService's namespace."""
    if "." not in host:
        return f"{host}.{namespace}.svc.cluster.local"
    if host.count(".") == 1:  # name.namespace
        return f"{host}.svc.cluster.local"
    return host


def cluster_name(subset, host=SERVICE, port=PORT, namespace=NAMESPACE):
    return f"outbound|{port}|{subset or ''}|{fqdn(host, namespace)}"


def xds_paths(run_dir):
    """Directories (watched by Envoy) and files of the listener and route configurations."""
    base = os.path.join(run_dir, "xds")
    return {
        "lds_dir": os.path.join(base, "lds"),
        "lds": os.path.join(base, "lds", "lds.json"),
        "rds_dir": os.path.join(base, "rds"),
        "rds": os.path.join(base, "rds", "rds.json"),
    }


def write_xds(path, version_info, resources):
    """Write a DiscoveryResponse file atomically: temp file in the same (watched) directory, then rename."""
    doc = {"version_info": str(version_info), "resources": resources}
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _path_source(path, watched_dir):
    return {"path_config_source": {"path": path, "watched_directory": {"path": watched_dir}},
            "resource_api_version": "V3"}


def listener(run_dir, port=0, stat_prefix=f"outbound_0.0.0.0_{PORT}"):
    """The HTTP listener on 127.0.0.1 whose routes come from the RDS file."""
    paths = xds_paths(run_dir)
    hcm = {
        "@type": T_HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "rds": {"route_config_name": ROUTE_CONFIG_NAME, "config_source": _path_source(paths["rds"], paths["rds_dir"])},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}],
        "normalize_path": True,
    }
    return {
        "@type": T_LISTENER,
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def static_cluster(name, port, connect_timeout="1s"):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


def bootstrap(run_dir, upstream_ports, admin_port=0):
    """Bootstrap: admin on 127.0.0.1, one static cluster per subset, listener and routes from files.

    upstream_ports: {subset: port}, e.g. {"v1": 40001, "v2": 40002}.
    """
    paths = xds_paths(run_dir)
    return {
        "node": {"id": f"sidecar~127.0.0.1~{SERVICE}-lab.{NAMESPACE}~{NAMESPACE}.svc.cluster.local",
                 "cluster": f"{SERVICE}.{NAMESPACE}"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": [static_cluster(cluster_name(subset), port)
                                          for subset, port in sorted(upstream_ports.items())]},
        "dynamic_resources": {"lds_config": _path_source(paths["lds"], paths["lds_dir"])},
        # Envoy's default cluster-name tag stops at the first dot, which cuts Istio-style cluster names
        # (`outbound|8080|v1|payment.lab.svc.cluster.local`); like Istio's bootstrap, use explicit tags.
        "stats_flush_interval": "1s",  # histograms reach /stats/prometheus at each flush (default 5 s)
        "stats_config": {"use_all_default_tags": False, "stats_tags": [
            {"tag_name": "envoy.cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
            {"tag_name": "envoy.response_code", "regex": r"_rq(_(\d{3}))$"},
            {"tag_name": "envoy.response_code_class", "regex": r"_rq(_(\dxx))$"},
            {"tag_name": "envoy.http_conn_manager_prefix", "regex": r"^http\.((.*?)\.)"},
        ]},
        # Istio's sidecars are not overloaded here; silence the "no connection limit" warning deliberately.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                                      "downstream_connections.v3.DownstreamConnectionsConfig",
                             "max_active_downstream_connections": 10000}}]},
    }


def initial_routes(generation="0"):
    """Routes before the translator's first run: everything to v1 (the stable version)."""
    return {
        "@type": T_ROUTES,
        "name": ROUTE_CONFIG_NAME,
        "virtual_hosts": [{"name": f"{fqdn(SERVICE)}:{PORT}", "domains": ["*"],
                           "routes": [{"match": {"prefix": "/"},
                                       "route": {"cluster": cluster_name("v1"), "timeout": "0s"}}]}],
        "response_headers_to_add": [{"header": {"key": "x-lab-route-generation", "value": str(generation)}}],
    }


def prepare(run_dir, upstream_ports, listener_port=0):
    """Write bootstrap.json, lds.json and an initial rds.json; return the bootstrap path."""
    paths = xds_paths(run_dir)
    os.makedirs(paths["lds_dir"], exist_ok=True)
    os.makedirs(paths["rds_dir"], exist_ok=True)
    if not os.path.exists(paths["rds"]):
        write_xds(paths["rds"], "0", [initial_routes()])
    write_xds(paths["lds"], "1", [listener(run_dir, listener_port)])
    path = os.path.join(run_dir, "envoy-bootstrap.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(bootstrap(run_dir, upstream_ports), fh, indent=1)
    return path
