"""Mesh tax: latency percentiles and CPU of requests through one Envoy hop versus straight to the upstream.

Starts the mesh lab (lab/meshlab.py: the real control plane, Istio, and Envoy as the loadgen pod's sidecar,
configured by istiod; all traffic on v1), sends the same fixed-rate, bounded load (keep-alive client,
lab/loadgen.py) first straight to the v1 pod's IP, then through Envoy (alternating, --rounds times), and prints
p50/p90/p99, Envoy's CPU per 1000 requests/s and its memory, beside Istio's published sidecar figures. Numbers,
not assertions: this machine is shared and has 2 cores.

    .venv/bin/python benchmarks/mesh_tax.py [--rps 1000] [--seconds 10] [--rounds 2] [--concurrency 16]
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lab"))

from loadgen import run_load  # noqa: E402
from meshlab import MeshLab  # noqa: E402

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


def measure(url, rps, seconds, concurrency, pids, headers):
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    res = run_load(url, int(rps * seconds), seconds + 10, rps, concurrency, headers)
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

    with MeshLab(run_dir=os.path.join(ROOT, ".cache", "lab", "bench-mesh-tax"), prometheus=False,
                 envoy_concurrency=args.envoy_concurrency) as lab:
        lab.set_canary_weight(0)
        lab.wait_programmed()
        v1 = lab.upstreams["v1"]
        headers = {"Host": lab.host_header}
        targets = {"direct": f"http://{v1['addresses'][0]}:{v1['port']}/", "envoy": lab.url}
        pids = {"envoy": lab.children["envoy"].pid, "upstream": lab.children["upstream-v1"].pid}
        for url in targets.values():  # warm-up: connections, code paths
            run_load(url, 500, 5, None, args.concurrency, headers)
        results = {"direct": [], "envoy": []}
        for dummy in range(max(1, args.rounds)):
            for name, url in targets.items():
                results[name].append(measure(url, args.rps, args.seconds, args.concurrency, pids, headers))
        envoy_rss = rss_mb(pids["envoy"])

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
    print(f"  ({ISTIO['note']}; the lab has one plain-HTTP hop, configured by istiod but without Istio's own")
    print("  filters (metadata exchange, telemetry), which upstream Envoy lacks, so expect less per request;")
    print("  the client here is Python, whose own jitter is in both rows)")
    if args.json:
        print(json.dumps({"direct": direct, "envoy": via, "envoy_vcpu_per_1000_rps": per_1000,
                          "envoy_rss_mb": envoy_rss, "istio": ISTIO}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
