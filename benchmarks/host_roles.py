"""Benchmark the host roles on QEMU guests: run the Molecule scenarios and print, per guest, the time to boot
to SSH, the first converge and the idempotent rerun (both roles), with the changed-task counts, plus the
guest image build (or cache hit) and each scenario's total.

    .venv/bin/python benchmarks/host_roles.py [SCENARIO ...]     # default: host_roles data_safety

Prints numbers only; asserts nothing about them (see tests/layers/test_molecule.py for the checks).
"""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_TIME = re.compile(r"GUEST-TIME playbook=converge\.yml host=(\S+) seconds=([\d.]+) changed=(\d+)")
BOOT = re.compile(r"guest (\S+) booted to SSH in ([\d.]+) s")
IMAGE = re.compile(r"(built guest image \S+ in \d+ s|cached image: \S+)")


def main(scenarios):
    env = dict(os.environ, PATH=os.path.join(ROOT, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""),
               ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), NO_COLOR="1", PY_COLORS="0", ANSIBLE_NOCOLOR="1")
    rows = []
    for scenario in scenarios:
        start = time.monotonic()
        proc = subprocess.run(["molecule", "test", "-s", scenario], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        total = time.monotonic() - start
        out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
        image = IMAGE.search(out)
        boots = dict(BOOT.findall(out))
        runs = {}
        for host, seconds, changed in GUEST_TIME.findall(out):
            runs.setdefault(host, []).append((float(seconds), int(changed)))
        print(f"{scenario}: exit {proc.returncode}, {total:.0f} s in all, image: {image.group(1) if image else '?'}")
        for host, conv in sorted(runs.items()):
            first = conv[0]
            rerun = conv[1] if len(conv) > 1 else (float("nan"), -1)
            rows.append((scenario, host, float(boots.get(host, "nan")), first, rerun))
        if proc.returncode:
            print(out[-4000:])
    print(f"\n{'scenario':<12} {'guest':<12} {'boot s':>7} {'converge s':>11} {'changed':>8} {'rerun s':>8} {'changed':>8}")
    for scenario, host, boot, first, rerun in rows:
        print(f"{scenario:<12} {host:<12} {boot:7.1f} {first[0]:11.1f} {first[1]:8d} {rerun[0]:8.1f} {rerun[1]:8d}")
    print(f"\nload average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (times under TCG scale with it)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["host_roles", "data_safety"])
