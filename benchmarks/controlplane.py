"""The real control plane of the lab: build times, start time, memory, and istiod's propagation to Envoy.

Prints numbers, asserts nothing (this machine is shared and has 2 cores):
1. Go build of each component (tools/controlplane): the cold time recorded when it was built (build.json) and the
   time of a warm `build.py` run, which only checks the cache.
2. Start of the mesh lab: the control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK nodes),
   Istio installed by the istio role (istioctl) with istiod, the lab's workloads, upstreams and Envoy.
3. Resident memory of every process of the running lab.
4. Propagation: from the answer to the PATCH of the VirtualService's weights to Envoy serving them (its
   /config_dump polled every 5 ms), over --changes changes; and the API calls a weight change costs, counted in
   kube-apiserver's audit log.

    .venv/bin/python benchmarks/controlplane.py [--changes 20]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lab"))
sys.path.insert(0, os.path.join(ROOT, "tools", "controlplane"))

import components  # noqa: E402 pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab  # noqa: E402 pylint: disable=wrong-import-position,import-error
from procs import cmdline  # noqa: E402 pylint: disable=wrong-import-position,import-error


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def build_times():
    print("Go build (tools/controlplane, cache %s):" % components.cache_root())
    for name in ("etcd", "kwok", "kubernetes", "istio"):
        path = components.component_dir(name) / "build.json"
        if path.is_file():
            info = json.loads(path.read_text())
            print("  %-11s %-24s cold %6.0f s  (%s)" % (name, info["version"], info["seconds"], info.get("go", "")))
        else:
            print("  %-11s not built" % name)
    start = time.monotonic()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "controlplane", "build.py")], check=True,
                   stdout=subprocess.DEVNULL)
    print("  warm run of build.py (all cached): %.2f s" % (time.monotonic() - start))


def memory(lab):
    print("\nresident memory of the running lab:")
    total = 0.0
    rows = []
    for child in lab.launcher.children:
        rows.append((child.name, child.pid))
    if lab.prometheus is not None and lab.prometheus.proc is not None:
        rows.append(("prometheus", lab.prometheus.proc.pid))
    for name, pid in rows:
        mib = rss_mib(pid)
        if mib is not None:
            total += mib
            print("  %-24s %7.1f MiB   %s" % (name, mib, cmdline(pid)[:60]))
    print("  %-24s %7.1f MiB" % ("total", total))


def propagation(lab, changes):
    audit = lab.cluster.audit
    delays = []
    calls = []
    for i in range(changes):
        weight = 5 + (i * 7) % 90
        mark = audit.mark()
        lab.set_canary_weight(weight)
        start = time.monotonic()
        want = {"v1": 100 - weight, "v2": weight}
        deadline = start + 30
        while time.monotonic() < deadline:
            if lab.envoy_weights() == want:
                delays.append(time.monotonic() - start)
                break
            time.sleep(0.005)
        events = audit.events(since=mark, user="lab-admin", namespace=lab.namespace, resource="virtualservices")
        calls.append(len(events))
    print("\npropagation, PATCH answered -> Envoy serves the weights (real istiod, %d changes):" % changes)
    if delays:
        print("  median %.3f s, max %.3f s, min %.3f s" % (statistics.median(delays), max(delays), min(delays)))
    print("  API calls per change (audit log, this client): %s" % sorted(set(calls)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=20)
    args = parser.parse_args()
    build_times()
    started = time.monotonic()
    with MeshLab(run_dir=os.path.join(ROOT, ".cache", "lab", "bench-controlplane")) as lab:
        print("\nmesh lab start: %.1f s" % (time.monotonic() - started))
        for name, seconds in lab.timings.items():
            print("  %-36s %6.1f s" % (name, seconds))
        memory(lab)
        propagation(lab, args.changes)


if __name__ == "__main__":
    main()
