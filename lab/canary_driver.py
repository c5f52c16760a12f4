"""Run playbooks/canary.yml against a running MeshLab, with bounded background traffic.

Shared by lab/demo.py (the README's main job) and tests/integration/test_mesh_lab_canary.py:

    with MeshLab() as lab, BackgroundLoad(lab, rps=40, max_seconds=300):
        run = CanaryRun(lab, steps=[10, 50, 100], interval="10s").start()
        result = run.wait()            # the canary_rollout task's result (timeline, weights, reason)
        print(render_timeline(result))
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(sys.executable)
PLAYBOOK = os.path.join(ROOT, "playbooks", "canary.yml")
ROLLOUT_TASK = "Shift traffic in stages with health checks between steps"


class BackgroundLoad:
    """Steady traffic into the lab's Envoy from a thread, in bounded slices, until stopped or max_seconds."""

    def __init__(self, lab, rps=40, max_seconds=600, concurrency=4, slice_seconds=2.0):
        self.lab = lab
        self.rps = rps
        self.max_seconds = max_seconds
        self.concurrency = concurrency
        self.slice_seconds = slice_seconds
        self.stopped = threading.Event()
        self.thread = None
        self.results = []

    def _loop(self):
        deadline = time.monotonic() + self.max_seconds
        while not self.stopped.is_set() and time.monotonic() < deadline:
            if self.rps <= 0:
                self.stopped.wait(self.slice_seconds)
                continue
            seconds = min(self.slice_seconds, max(0.1, deadline - time.monotonic()))
            self.results.append(self.lab.load(requests=int(self.rps * seconds) + 1, seconds=seconds, rps=self.rps,
                                              concurrency=self.concurrency))

    def __enter__(self):
        self.thread = threading.Thread(target=self._loop, name="lab-load", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(timeout=self.slice_seconds + 10)
        return False


class EnvoyTrace:
    """What Envoy serves for the primary route, sampled every 50 ms from its /config_dump in a thread (bounded by
    max_seconds): the weights istiod programmed, in the order they appeared, with the time each first appeared.

        with EnvoyTrace(lab) as trace:
            CanaryRun(lab, ...).start().wait()
        trace.seen        # [{"v1": 100}, {"v1": 90, "v2": 10}, ...]
    """

    def __init__(self, lab, max_seconds=600, interval=0.05):
        self.lab, self.max_seconds, self.interval = lab, max_seconds, interval
        self.changes = []  # (seconds since start, weights)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="envoy-trace", daemon=True)

    @property
    def seen(self):
        return [weights for dummy, weights in self.changes]

    def _loop(self):
        start = time.monotonic()
        while not self._stop.wait(self.interval) and time.monotonic() - start < self.max_seconds:
            try:
                served = self.lab.envoy_weights()
            except OSError:
                continue
            if served and (not self.changes or self.changes[-1][1] != served):
                self.changes.append((time.monotonic() - start, served))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        return False

    def render(self):
        return "Envoy served (programmed by istiod): " + " -> ".join(
            "%s at %.1f s" % ("/".join("%s %d" % kv for kv in sorted(w.items())), t) for t, w in self.changes)


class CanaryRun:
    """One `ansible-playbook playbooks/canary.yml` against the lab, in its own process group."""

    def __init__(self, lab, steps=(10, 50, 100), interval="10s", window=None, extra=None, log_path=None):
        self.lab = lab
        self.vars = {
            "canary_service": lab.service, "canary_namespace": lab.namespace, "canary_route_name": "primary",
            "canary_stable_subset": "v1", "canary_canary_subset": "v2", "canary_workload": "%s-v2" % lab.service,
            "canary_steps": list(steps), "canary_interval": interval, "canary_analysis_window": window or interval,
            "canary_min_requests": 20, "canary_prometheus_url": lab.prometheus_url,
            "canary_kubeconfig": lab.kubeconfig, "canary_retry_inconclusive_for": 10, "canary_retry_interval": 2,
        }
        self.vars.update(extra or {})
        self.log_path = log_path or os.path.join(lab.run_dir, "canary-%d.json" % int(time.time() * 1000))
        self.proc = None
        self.started = None
        self.output = None

    def start(self):
        vars_file = self.log_path + ".vars.json"
        with open(vars_file, "w") as f:
            json.dump(self.vars, f)
        env = dict(os.environ, **self.lab.env())
        env.update(ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
                   ANSIBLE_NOCOLOR="1", PATH=VENV_BIN + os.pathsep + env.get("PATH", ""), NO_PROXY="127.0.0.1,localhost")
        self.out_file = open(self.log_path, "w")  # pylint: disable=consider-using-with
        self.started = time.time()
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "ansible-playbook"), PLAYBOOK, "-e", "@" + vars_file],  # pylint: disable=consider-using-with
                                     cwd=ROOT, env=env, stdout=self.out_file, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self):
        """SIGKILL ansible-playbook and every process under it, as when a job runner dies. Its process group is not
        enough: Ansible's workers call setsid(), and a worker left alive would go on running the module. Returns the
        PIDs it killed."""
        tree = {self.proc.pid}
        try:
            os.killpg(self.proc.pid, signal.SIGSTOP)  # nothing forks while the tree is collected
            for dummy in range(10):  # bounded: stop until no new descendant appears
                found = set(_descendants(self.proc.pid)) - tree
                if not found:
                    break
                for pid in found:
                    _signal(pid, signal.SIGSTOP)
                tree |= found
        finally:
            for pid in tree:
                _signal(pid, signal.SIGKILL)
            _signal(-self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.out_file.close()
        return sorted(tree)

    def wait(self, timeout=900):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            if not self.out_file.closed:
                self.out_file.close()
        with open(self.log_path) as f:
            self.output = f.read()
        return rollout_result(self.output)

    def tail(self, chars=3000):
        """The end of the playbook's output so far (for a failed assertion's message)."""
        with open(self.log_path) as f:
            return f.read()[-chars:]

    @property
    def returncode(self):
        return self.proc.returncode


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid):
    """PIDs of every process under pid (from /proc; Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rollout_result(output):
    """The canary_rollout task's result from the ansible.posix.json callback's output."""
    start = output.find("{")
    doc = json.loads(output[start:]) if start >= 0 else {}
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            if task.get("task", {}).get("name", "").endswith(ROLLOUT_TASK):
                for host_result in task.get("hosts", {}).values():
                    return host_result
    raise ValueError("no canary_rollout result in the playbook output:\n" + output[-3000:])


def wait_until(predicate, timeout, interval=0.2):
    """Poll predicate() until true or timeout (bounded); returns the elapsed seconds or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def _fmt(value):
    if isinstance(value, float):
        return "%.4g" % value
    return "-" if value is None else str(value)


def render_timeline(result, title=None):
    """A table a person reads at a glance: one line per step, every check with its value."""
    lines = []
    if title:
        lines.append(title)
    lines.append("result: %s%s" % (result.get("result"), "  -  " + result["reason"] if result.get("reason") else ""))
    lines.append("weights: %s -> %s" % (json.dumps(result.get("weights_before")), json.dumps(result.get("weights_after"))))
    lines.append("%-4s %-7s %-12s %-8s %-8s %s" % ("step", "canary", "action", "verdict", "seconds", "checks (value, verdict)"))
    for e in result.get("timeline", []):
        checks = "  ".join("%s=%s %s" % (c.get("name"), _fmt(c.get("value")), c.get("verdict")) for c in e.get("checks", []))
        row = (e.get("step"), "%d%%" % e.get("weight", 0), e.get("action", "-"), e.get("verdict", "-"), _fmt(e.get("seconds")), checks or e.get("reason", ""))
        lines.append("%-4s %-7s %-12s %-8s %-8s %s" % row)
    return "\n".join(lines)


def primary_weights(lab):
    """Subset -> weight of the lab VirtualService's route ``primary``, as the API server has it now."""
    for route in lab.virtual_service()["spec"]["http"]:
        if route.get("name") == "primary":
            return dict((d["destination"]["subset"], d.get("weight", 0)) for d in route["route"])
    raise AssertionError("the lab VirtualService has no route named primary")


def reset_release(lab):
    """Back to the start of a release: no fault, no rollout recorded (state and lease), v1 = 100 served by Envoy."""
    lab.fault("v2", clear=True)
    annotations = lab.virtual_service()["metadata"].get("annotations") or {}
    keys = [k for k in annotations if k.startswith("mesh.onprem.io/")]
    if keys:
        lab.custom.patch_namespaced_custom_object("networking.istio.io", "v1", lab.namespace, "virtualservices", lab.service,
                                                  {"metadata": {"annotations": dict((k, None) for k in keys)}})
    lab.set_canary_weight(0)
    lab.wait_programmed()
