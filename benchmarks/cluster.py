"""Benchmark the kubeadm cluster on two QEMU guests (extensions/molecule/cluster): run the scenario and print, per
guest, boot to SSH, the first converge (host preparation, containerd, the node's binaries and images from the
air-gapped mirror, kubeadm init or join) and the rerun with nothing changed, the slow steps on their own (from
ansible.posix.profile_tasks), and the same projected for a KVM host.

    .venv/bin/python benchmarks/cluster.py          # about an hour under TCG on 2 cores

The projection divides the CPU-bound steps by the TCG slowdown measured on the control-plane guest itself (one
Python loop timed in the guest and on this machine); the downloads are not projected (the guest's mirror is a
Python process per connection behind QEMU's user network, about 2 MB/s, not a site's network). Prints numbers
only; tests/layers/test_molecule.py and the scenario's verify make the checks.
"""
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_TIME = re.compile(r"GUEST-TIME playbook=(\S+) host=(\S+) seconds=([\d.]+) changed=(\d+)")
BOOT = re.compile(r"guest (\S+) booted to SSH in ([\d.]+) s")
IMAGE = re.compile(r"(built guest image \S+ in \d+ s|cached image: \S+)")
PROFILE = re.compile(r"^\s*(?:\S\s+)?(.+?) -+ +([\d.]+)s\s*$")   # long task names get a single "-"
STEPS = {  # a step of the table: the start of the task names profile_tasks prints for it
    "kubeadm, kubelet, kubectl, CNI download": "onprem.mesh.kubernetes : Fetch and compare the sha256",
    "crictl + images download": "onprem.mesh.container_runtime : Fetch and compare the sha256",
    "images import": "onprem.mesh.container_runtime : Import each archive",
    "kubeadm init": "onprem.mesh.kubernetes : Run kubeadm init",
    "kubeadm join": "onprem.mesh.kubernetes : Run kubeadm join",
    "istioctl install (istiod Ready)": "onprem.mesh.istio : Install the control plane revision",
    "istiod Available": "onprem.mesh.istio : Wait until istiod",
    "mesh_namespace restart to 2/2": "onprem.mesh.mesh_namespace : Restart each Deployment",
}
PROBE = "import time; t = time.perf_counter(); sum(i * i for i in range(2000000)); print(time.perf_counter() - t)"


def profile(out):
    """[{task: seconds}] per playbook run, in order: profile_tasks prints each run's tasks after its PLAY RECAP."""
    blocks = []
    for line in out.splitlines():
        if "PLAY RECAP" in line:
            blocks.append({})
            continue
        m = PROFILE.match(line)
        if m and blocks:
            task = m.group(1).strip()
            blocks[-1][task] = blocks[-1].get(task, 0.0) + float(m.group(2))
    return blocks


def step(block, prefix):
    return sum(seconds for task, seconds in block.items() if task.startswith(prefix)) or float("nan")


def guest_ratio(ephemeral, name):
    """Seconds of PROBE in the guest / on this machine: the TCG slowdown of CPU-bound work."""
    guests = os.path.join(ephemeral, "guests")
    with open(os.path.join(guests, name, "port"), encoding="utf-8") as fh:
        port = fh.read().strip()
    ssh = ["ssh", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-i", os.path.join(guests, "id_ed25519"), "-p", port, "root@127.0.0.1", "python3", "-c", json.dumps(PROBE)]
    guest = float(subprocess.run(ssh, capture_output=True, text=True, check=True, timeout=300).stdout)
    host = float(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    return guest / host


def tb_flushes(ephemeral):
    """{guest: how often TCG threw away all its translated code}, from `info jit` on each guest's monitor (guest.sh):
    each flush means the platform's tb_size filled up and the guest's code is translated again (-1: no answer)."""
    counts = {}
    guests = os.path.join(ephemeral, "guests")
    for name in sorted(os.listdir(guests)):
        path = os.path.join(guests, name, "monitor.sock")
        if not os.path.exists(path):
            continue
        text = b""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(30)
                sock.connect(path)
                sock.sendall(b"info jit\n")
                while text.count(b"(qemu)") < 2:   # the banner's prompt, then the one after the answer
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    text += chunk
        except OSError:
            pass
        m = re.search(rb"TB flush count\s+(\d+)", text)
        counts[name] = int(m.group(1)) if m else -1
    return counts


def main():
    env = dict(os.environ, PATH=os.path.join(ROOT, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""),
               ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), NO_COLOR="1", PY_COLORS="0", ANSIBLE_NOCOLOR="1",
               COLUMNS="400", PROFILE_TASKS_TASK_OUTPUT_LIMIT="all")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "controlplane", "build.py"), "kube-proxy", "coredns"],
                   check=True, env=env)
    # `molecule test --destroy never` skips the first destroy too: a cluster left by an earlier run is destroyed here
    subprocess.run(["molecule", "destroy", "-s", "cluster"], cwd=ROOT, env=env, capture_output=True, check=False)
    start = time.monotonic()
    proc = subprocess.run(["molecule", "test", "-s", "cluster", "--destroy", "never"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    total = time.monotonic() - start
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    log = os.path.join(tempfile.gettempdir(), "onprem-mesh-cluster-benchmark.log")
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(out)
    print(f"molecule's output: {log}")
    ratio = float("nan")
    flushes = {}
    try:
        ephemeral = re.search(r"(/\S+/molecule\.\w+\.cluster)\b", out).group(1)
        flushes = tb_flushes(ephemeral)
        ratio = guest_ratio(ephemeral, "mesh-cp-1")
    except (AttributeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"(no TCG slowdown measured: {exc})")
    if proc.returncode == 0:   # a failed run keeps its guests to be looked at (molecule login / destroy -s cluster)
        subprocess.run(["molecule", "destroy", "-s", "cluster"], cwd=ROOT, env=env, capture_output=True, check=False)
    image = IMAGE.search(out)
    print(f"cluster: exit {proc.returncode}, {total:.0f} s in all, image: {image.group(1) if image else '?'}")
    if proc.returncode:
        print(out[-6000:])
    boots = dict(BOOT.findall(out))
    runs = {}
    for playbook, host, seconds, changed in GUEST_TIME.findall(out):
        if playbook.startswith("converge"):   # converge.yml, or converge_istio.yml with Istio
            runs.setdefault(host, []).append((float(seconds), int(changed)))
    blocks = [b for b in profile(out) if any("onprem.mesh.kubernetes : " in t for t in b)]   # converge and its rerun
    first = blocks[0] if blocks else {}
    rerun = blocks[1] if len(blocks) > 1 else {}
    print(f"\n{'guest':<10} {'boot s':>7} {'converge s':>11} {'changed':>8} {'rerun s':>8} {'changed':>8}")
    for host, conv in sorted(runs.items()):
        again = conv[1] if len(conv) > 1 else (float("nan"), -1)
        print(f"{host:<10} {float(boots.get(host, 'nan')):7.1f} {conv[0][0]:11.1f} {conv[0][1]:8d} {again[0]:8.1f} {again[1]:8d}")
    print(f"\nTCG slowdown of CPU-bound work on mesh-cp-1: x{ratio:.1f}")
    print("TCG translated-code cache flushes: " + (", ".join(f"{g} {n}" for g, n in flushes.items()) or "?"))
    print(f"{'step (both guests)':<40} {'TCG s':>8} {'rerun s':>8} {'KVM s (projected)':>18}")
    for label, prefix in STEPS.items():
        seconds = step(first, prefix)
        projected = "-" if "download" in label else f"{seconds / ratio:.1f}"
        print(f"{label:<40} {seconds:8.1f} {step(rerun, prefix):8.1f} {projected:>18}")
    verify = re.search(r"(\d+) passed.* in ([\d.]+)s", out)
    if verify:
        print(f"verify: {verify.group(1)} tests passed in {verify.group(2)} s (extensions/molecule/cluster/tests)")
    print(f"\nload average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (times under TCG scale with it)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
