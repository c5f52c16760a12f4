"""Canary benchmarks on the local mesh lab; prints numbers, asserts nothing.

1. Engine overhead per step (no cluster, no Ansible): plan + read + patch + record, in microseconds.
2. A full rollout through ansible-playbook on the lab: wall time against the sum of the step intervals
   (target: within 2 %), API calls per step counted in kube-apiserver's audit log (target: at most one write
   and two reads).
3. Fault onset to all traffic on stable, against the analysis window (target: no more than one window
   plus 2 s). The fault starts at a random point inside a step's window, as it would in production.

    .venv/bin/python benchmarks/canary.py [--interval 8s] [--faults 3]
"""
import argparse
import os
import random
import statistics
import sys
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lab"))
sys.path.insert(0, os.path.join(ROOT, "collections"))

from canary_driver import BackgroundLoad, CanaryRun, primary_weights, reset_release, wait_until  # noqa: E402 pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab  # noqa: E402 pylint: disable=wrong-import-position,import-error


def epoch(stamp):
    return datetime.fromisoformat(stamp).timestamp()


def seconds(text):
    return float(text[:-1]) * (60 if text.endswith("m") else 1)


def engine_overhead(steps=4, runs=200):
    from ansible_collections.onprem.mesh.plugins.module_utils import rollout as ro  # pylint: disable=import-outside-toplevel
    from ansible_collections.onprem.mesh.plugins.module_utils.traffic import WeightChange  # pylint: disable=import-outside-toplevel
    from ansible_collections.onprem.mesh.tests.unit.plugins.module_utils.fake_istio import FakeIstio  # pylint: disable=import-outside-toplevel

    class Gate:
        def start_window(self):
            return None

        def evaluate(self, token):
            return {"verdict": "pass", "checks": []}

    vs = {"kind": "VirtualService", "metadata": {"name": "p", "namespace": "n"}, "spec": {"hosts": ["p"], "http": [
        {"route": [{"destination": {"host": "p", "subset": "v1"}, "weight": 100}, {"destination": {"host": "p", "subset": "v2"}, "weight": 0}]}]}}
    dr = {"kind": "DestinationRule", "metadata": {"name": "p", "namespace": "n"}, "spec": {"host": "p", "subsets": [{"name": "v1"}, {"name": "v2"}]}}
    times = []
    for dummy in range(runs):
        store = FakeIstio([vs, dr])
        rollout = ro.Rollout(WeightChange(store, "n", "p"), Gate(), "v1", "v2", ro.plan_steps(list(range(10, 10 * steps + 1, 10))),
                             now=time.time, sleep=lambda s: None)
        start = time.perf_counter()
        rollout.run()
        times.append((time.perf_counter() - start) / (steps + 1))
    return statistics.median(times) * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", default="8s")
    parser.add_argument("--faults", type=int, default=3)
    args = parser.parse_args()
    interval = seconds(args.interval)

    print("engine overhead per step (fake API, no Ansible): %.0f us" % engine_overhead())

    with MeshLab() as lab, BackgroundLoad(lab, rps=100, max_seconds=1200):
        time.sleep(4)
        steps = [10, 25, 50, 100]
        mark = lab.cluster.audit.mark()
        run = CanaryRun(lab, steps=steps, interval=args.interval).start()
        result = run.wait()
        wall = time.time() - run.started
        planned = interval * (len(steps) - 1)
        analysed = [e for e in result.get("timeline", []) if "verdict" in e]
        step_time = sum(e["seconds"] for e in analysed)
        print("\nfull rollout %s (%s each): result %s" % (steps, args.interval, result.get("result")))
        print("  sum of intervals            %7.2f s" % planned)
        print("  steps (write..verdict)      %7.2f s   %+.2f %% over the intervals" % (step_time, 100.0 * (step_time - planned) / planned))
        print("  ansible-playbook wall time  %7.2f s   (includes Ansible start-up and argument checks)" % wall)
        events = lab.cluster.audit.events(since=mark, user="lab-admin", namespace=lab.namespace)
        for e in analysed:
            inside = [ev for ev in events if epoch(e["started"]) <= epoch(ev["requestReceivedTimestamp"]) <= epoch(e["ended"])]
            counts = lab.cluster.audit.counts(inside)
            print("  step %d (%d%%): %.2f s, API calls (audit log) %s" % (
                e["step"], e["weight"], e["seconds"], {k: v for k, v in counts.items() if " " in k}))

        onsets = []
        for i in range(args.faults):
            reset_release(lab)
            run = CanaryRun(lab, steps=[10, 50, 100], interval=args.interval).start()
            wait_until(lambda: primary_weights(lab).get("v2") == 10, timeout=60)
            time.sleep(random.uniform(0.5, interval - 0.5))
            lab.fault("v2", error_rate=0.2)  # onset: wait_until below counts from here
            back = wait_until(lambda: primary_weights(lab).get("v2") == 0 and lab.envoy_weights() == {"v1": 100},
                              timeout=4 * interval + 30, interval=0.1)
            run.wait()
            if back is not None:
                onsets.append(back)
                print("fault %d: onset to all traffic on stable %.2f s (window %.0f s, target <= %.0f s)" % (i + 1, back, interval, interval + 2))
        if onsets:
            print("fault onset to stable: median %.2f s, max %.2f s over %d runs" % (statistics.median(onsets), max(onsets), len(onsets)))
        print("(Flagger at its defaults - interval 1m, threshold 5 - lets a bad canary serve for about five minutes.)")


if __name__ == "__main__":
    main()
