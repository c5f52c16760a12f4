"""The README's main job: two canary releases through a real Envoy on the local mesh lab.

1. Starts the lab: a real control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK nodes), Istio
   installed by the collection's istio role (istioctl, istiod), Envoy programmed by istiod, upstreams v1/v2 and
   Prometheus, all on this machine.
2. Release 1: a healthy v2 goes 5 -> 10 -> 25 -> 50 -> 100 through playbooks/canary.yml.
3. Release 2: v2 answers 20% errors; the canary is rolled back at its first analysis.
4. Prints both timelines, and stops everything it started (also on Ctrl-C or failure).

    make demo            (or: .venv/bin/python lab/demo.py [--interval 10s])
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from canary_driver import BackgroundLoad, CanaryRun, EnvoyTrace, primary_weights, render_timeline, reset_release, wait_until  # noqa: E402 pylint: disable=wrong-import-position
from meshlab import MeshLab  # noqa: E402 pylint: disable=wrong-import-position


def release(lab, interval):
    with EnvoyTrace(lab) as trace:
        result = CanaryRun(lab, steps=[5, 10, 25, 50, 100], interval=interval).start().wait()
    return result, trace


def releases(lab, interval):
    """The two releases; returns their results, Envoy's traces and the time from fault onset to all traffic on stable."""
    time.sleep(5)  # a few scrapes of traffic before the first window
    print("\nrelease 1: healthy v2, steps 5 10 25 50 100, %s each ..." % interval, flush=True)
    first = release(lab, interval)

    reset_release(lab)
    print("\nrelease 2: v2 answers 20% errors ...", flush=True)
    lab.fault("v2", error_rate=0.2)
    onset = time.time()
    second = release(lab, interval)
    back = wait_until(lambda: primary_weights(lab).get("v2") == 0 and lab.envoy_weights() == {"v1": 100}, timeout=30)
    stable_after = time.time() - onset if back is not None else None
    lab.fault("v2", clear=True)
    return first, second, stable_after


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", default="10s", help="time at each step before its analysis (default 10s)")
    parser.add_argument("--rps", type=int, default=100, help="background requests per second (default 100)")
    args = parser.parse_args()
    started = time.time()
    print("starting the mesh lab (control plane, Istio by the istio role, istiod, Envoy, Prometheus) ...", flush=True)
    with MeshLab(run_dir=os.path.join(os.path.dirname(HERE), ".cache", "lab", "demo")) as lab:
        print("lab up in %.0f s: kube-apiserver %s, istiod %s, Envoy %s, Prometheus %s" % (
            lab.timings["mesh lab"], lab.kube_url, lab.cluster.istio.debug_url, lab.url, lab.prometheus_url), flush=True)
        lab.warm_up()  # series for v1 and v2 exist before the first window (rate() needs two samples)
        with BackgroundLoad(lab, rps=args.rps, max_seconds=900):
            (first, trace1), (second, trace2), stable_after = releases(lab, args.interval)

        print("\n" + render_timeline(first, "== release 1 (healthy canary) =="))
        print(trace1.render())
        print("\n" + render_timeline(second, "== release 2 (canary with 20% errors) =="))
        print(trace2.render())
        if stable_after is not None:
            print("\nfrom the fault (set before release 2 started) to all traffic on stable: %.1f s (steps of %s)" % (stable_after, args.interval))
    print("\nlab stopped; demo took %.0f s" % (time.time() - started))
    ok = first.get("result") == "promoted" and second.get("result") == "rolled_back"
    print("DEMO %s" % ("OK: healthy canary promoted, faulty canary rolled back" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; the lab was stopped", file=sys.stderr)
        sys.exit(130)
