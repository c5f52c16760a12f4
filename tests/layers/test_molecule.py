"""Molecule: the host roles on real QEMU guests with emulated NVMe disks, one test per scenario.

Each test runs `molecule test -s NAME` (create, prepare, converge, idempotence, verify, destroy) and prints
molecule's output and a table of per-guest times: image build, boot to SSH, first converge, rerun.
"""
import os
import re
import sys
import time

import pytest

from layer_tools import ROOT, run  # pylint: disable=import-error

SCENARIOS = ("host_roles", "data_safety", "container_runtime")
# The kubeadm cluster on two guests: longer than CI's budget under TCG, run by `make molecule-cluster`
# (ONPREM_MESH_MOLECULE_CLUSTER=1), which also builds kube-proxy and CoreDNS first.
if os.environ.get("ONPREM_MESH_MOLECULE_CLUSTER") == "1":
    SCENARIOS = ("cluster",)
GUEST_TIME = re.compile(r"GUEST-TIME playbook=(?P<playbook>\S+) host=(?P<host>\S+) seconds=(?P<seconds>[\d.]+) "
                        r"changed=(?P<changed>\d+)")
BOOT = re.compile(r"guest (?P<host>\S+) booted to SSH in (?P<seconds>[\d.]+) s")
IMAGE = re.compile(r"(built guest image \S+ in \d+ s|cached image: \S+) \((?P<delta>[^)]*)\)")


def guest_times(output):
    """{host: {"boot": s, "converge": s, "converge_changed": n, "rerun": s, "rerun_changed": n}} from the output."""
    times = {}
    for m in BOOT.finditer(output):
        times.setdefault(m["host"], {})["boot"] = float(m["seconds"])
    for m in GUEST_TIME.finditer(output):
        if m["playbook"] != "converge.yml":
            continue
        entry = times.setdefault(m["host"], {})
        key = "rerun" if "converge" in entry else "converge"
        entry[key] = float(m["seconds"])
        entry[key + "_changed"] = int(m["changed"])
    return times


@pytest.mark.layer("molecule")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario, capsys):
    start = time.monotonic()
    out = run(["molecule", "test", "-s", scenario], cwd=ROOT, timeout=7200 if scenario == "cluster" else 3600,
              env={"ANSIBLE_CONFIG": os.path.join(ROOT, "ansible.cfg"), "NO_COLOR": "1", "PY_COLORS": "0",
                   "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"})
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)
    total = time.monotonic() - start
    image = IMAGE.search(out)
    times = guest_times(out)
    lines = [f"== molecule {scenario}: {total:.0f} s in all; image: {image.group(0) if image else '?'}",
             f"{'guest':<16} {'boot s':>8} {'converge s':>11} {'changed':>8} {'rerun s':>8} {'changed':>8}"]
    for host, t in sorted(times.items()):
        lines.append(f"{host:<16} {t.get('boot', 0):8.1f} {t.get('converge', 0):11.1f} "
                     f"{t.get('converge_changed', 0):8d} {t.get('rerun', 0):8.1f} {t.get('rerun_changed', 0):8d}")
    print("\n".join(lines))           # in the report with molecule's output
    with capsys.disabled():          # and on the terminal of a passing run
        sys.stdout.write("\n" + "\n".join(lines) + "\n")
    assert times, "no guest times in molecule's output (callback guest_times not enabled?)"
    for host, t in times.items():
        assert "converge" in t and "rerun" in t, f"{host}: converge and idempotence rerun both expected: {t}"
        assert t["converge_changed"] > 0, f"{host}: the first converge changed nothing - did the roles run?"
        assert t["rerun_changed"] == 0, f"{host}: the rerun changed {t['rerun_changed']} tasks"
