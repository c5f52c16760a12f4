"""Prometheus configuration for the lab: scrape Envoy every second, rebuild Istio's standard metrics.

Envoy's own per-cluster stats (clusters named by istiod `outbound|9080|v2|payment.lab.svc.cluster.local`, tagged
`cluster_name` and `response_code` by Istio's stats tags in the lab's bootstrap) are turned
into Istio's metric names and labels in two steps:
  1. metric_relabel_configs (at scrape): the cluster name gives destination_service/_name/_namespace,
     destination_version (the subset), destination_workload (`<service>-<subset>`, the lab's Deployment
     names) and destination_workload_namespace; response_code stays as Envoy tags it.
  2. recording rules (every second) give the series the names Istio's telemetry uses:
       istio_requests_total                          <- envoy_cluster_upstream_rq
       istio_request_duration_milliseconds_bucket/_sum/_count <- envoy_cluster_upstream_rq_time_*
     each once with reporter="destination" and once with reporter="source" (one Envoy hop plays both
     sidecars here), so dashboards' and the canary modules' queries run unchanged.
"""
import os

import yaml

SOURCE = {"source_workload": "loadgen", "source_workload_namespace": "lab", "source_app": "loadgen",
          "source_version": "unknown", "source_canonical_service": "loadgen"}
_CLUSTER_RE = r"outbound\|([0-9]+)\|([^|]*)\|([^.|]+)\.([^.|]+)\.svc\.cluster\.local"


def _from_cluster(target, replacement):
    return {"source_labels": ["cluster_name"], "regex": _CLUSTER_RE,
            "target_label": target, "replacement": replacement, "action": "replace"}


def scrape_config(envoy_admin, job="envoy-lab", interval="1s"):
    """The scrape job for Envoy's /stats/prometheus (envoy_admin: "127.0.0.1:PORT")."""
    relabel = [
        {"source_labels": ["__name__"], "regex": "envoy_cluster_.*|envoy_server_.*|envoy_http_.*|envoy_listener_.*",
         "action": "keep"},
        _from_cluster("destination_version", "$2"),
        _from_cluster("destination_canonical_revision", "$2"),
        _from_cluster("destination_service", "$3.$4.svc.cluster.local"),
        _from_cluster("destination_service_name", "$3"),
        _from_cluster("destination_service_namespace", "$4"),
        _from_cluster("destination_workload", "$3-$2"),
        _from_cluster("destination_workload_namespace", "$4"),
        _from_cluster("destination_app", "$3"),
        _from_cluster("destination_canonical_service", "$3"),
    ]
    for label, value in SOURCE.items():
        relabel.append({"source_labels": ["cluster_name"], "regex": "outbound\\|.*", "target_label": label,
                        "replacement": value, "action": "replace"})
    relabel.append({"source_labels": ["cluster_name"], "regex": "outbound\\|.*",
                    "target_label": "request_protocol", "replacement": "http", "action": "replace"})
    return {
        "job_name": job,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": "/stats/prometheus",
        "static_configs": [{"targets": [envoy_admin], "labels": {"lab": "mesh"}}],
        "metric_relabel_configs": relabel,
    }


def recording_rules(interval="1s"):
    only_mesh = '{destination_workload!=""}'
    # upstream_rq_200 and upstream_rq_2xx both become envoy_cluster_upstream_rq: keep the per-code series only
    with_code = '{destination_workload!="", response_code!=""}'
    drop = "cluster_name"
    rules = []
    for reporter in ("destination", "source"):
        rules += [
            {"record": "istio_requests_total",
             "expr": f"sum without ({drop}) (envoy_cluster_upstream_rq{with_code})",
             "labels": {"reporter": reporter}},
            {"record": "istio_request_duration_milliseconds_bucket",
             "expr": f"sum without (cluster_name) (envoy_cluster_upstream_rq_time_bucket{only_mesh})",
             "labels": {"reporter": reporter}},
            {"record": "istio_request_duration_milliseconds_sum",
             "expr": f"sum without (cluster_name) (envoy_cluster_upstream_rq_time_sum{only_mesh})",
             "labels": {"reporter": reporter}},
            {"record": "istio_request_duration_milliseconds_count",
             "expr": f"sum without (cluster_name) (envoy_cluster_upstream_rq_time_count{only_mesh})",
             "labels": {"reporter": reporter}},
        ]
    return {"groups": [{"name": "istio-standard-metrics-from-envoy", "interval": interval, "rules": rules}]}


def write_config(config_dir, envoy_admin, interval="1s"):
    """Write prometheus.yml and istio-rules.yml into config_dir; return the prometheus.yml path."""
    os.makedirs(config_dir, exist_ok=True)
    rules_path = os.path.join(config_dir, "istio-rules.yml")
    with open(rules_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(recording_rules(interval), fh, sort_keys=False)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rules_path],
        "scrape_configs": [scrape_config(envoy_admin, interval=interval)],
    }
    path = os.path.join(config_dir, "prometheus.yml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


def lab_prometheus(envoy_admin, interval="1s", start_timeout=60):
    """Prometheus for the lab, started by the shared test harness (tests/support/prometheus_harness.py):
    same binary, free port, temp dir, readiness wait and stop; only the configuration is the lab's."""
    from prometheus_harness import PrometheusHarness

    class LabPrometheus(PrometheusHarness):
        def _write_config(self):
            return write_config(self.workdir, envoy_admin, interval)

    return LabPrometheus(scrape_interval=interval, start_timeout=start_timeout)
