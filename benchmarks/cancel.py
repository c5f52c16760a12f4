"""Cancel and kill of a running canary rollout, on the lab's real control plane; prints numbers, asserts nothing.

For each way a job ends - Ctrl-C (SIGINT to the process group), SIGTERM to ansible-playbook (with on_cancel: hold),
kill -9 of ansible-playbook alone, kill -9 of the module process, ansible-runner's cancel (AWX's button) - the
seconds from the signal to the rollout's last write (the lease released, traffic on stable or held) and the number
of API writes the cancel cost (kube-apiserver's audit log). Target: within one probe interval (1 s ticks), one write.

It runs the scenarios of tests/integration/test_canary_cancel.py (the same code proves them in `make test`) and
collects the lines they print.

    .venv/bin/python benchmarks/cancel.py
"""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^BENCH cancel (.+): rollout ended \(lease released\) ([0-9.]+) s after, ([0-9]+) API write")


def main():
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.join("tests", "integration", "test_canary_cancel.py"), "-s", "-q",
                          "-p", "no:cacheprovider", "-k", "not pause and not promote"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    rows = [LINE.match(line).groups() for line in run.stdout.splitlines() if LINE.match(line)]
    print("%-40s %10s %8s" % ("how the job ended", "seconds", "writes"))
    for name, seconds, writes in rows:
        print("%-40s %10.2f %8s" % (name, float(seconds), writes))
    print("(%d scenarios in %.0f s, pytest exit %d)" % (len(rows), time.monotonic() - started, run.returncode))
    if run.returncode:
        print(run.stdout[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
