"""Cancel, kill and operator commands of a running canary_rollout, on the lab's real control plane.

A rollout runs as a user runs it - ``ansible-playbook`` in a process group of its own, as a terminal starts it, or
``ansible_runner.run`` as AWX does - with a module ServiceAccount bound to exactly README's Role, and a long step
(120 s) so that what ends it is the cancel, the kill or the command. Then, as it happens in the field:

* Ctrl-C (SIGINT to the whole foreground process group), SIGTERM to ``ansible-playbook``, ``kill -9`` of
  ``ansible-playbook`` alone (its worker and the module live on), ``kill -9`` of the module process, and
  ansible-runner's cancel (SIGKILL to the job's process group: what AWX's cancel button leads to);
* ``canary_command`` from a second playbook: pause, resume, abort, promote, and check mode.

Each test reads the VirtualService from the real kube-apiserver (weights, the rollout's state and lease), counts the
module's writes in the API server's audit log, and checks that no process of the run is left. The seconds from the
cancel to all traffic on stable are printed (benchmarks/cancel.py collects them).
"""
import http.server
import json
import os
import signal
import subprocess
import threading
import time

import pytest
from kubernetes import client

from canary_cluster import readme_role_rules  # pylint: disable=import-error
from cluster_fixtures import samples  # pylint: disable=import-error
from playbook_runner import ROOT, VENV_BIN, ansible_env, run_playbook  # pylint: disable=import-error

TARGET = os.path.join(ROOT, "tests", "integration", "targets", "canary_modules")
GROUP, VERSION = "networking.istio.io", "v1"
STATE, LEASE, COMMAND = "mesh.onprem.io/canary-rollout", "mesh.onprem.io/canary-lease", "mesh.onprem.io/canary-command"
ACCOUNT = "canary"
MODULE = "AnsiballZ_canary_rollout"


class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802  pylint: disable=invalid-name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass


@pytest.fixture(scope="module")
def health_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/healthz" % server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(cluster):
    return client.CustomObjectsApi(cluster.api_client())


@pytest.fixture
def kubeconfig(cluster, ns, tmp_path):
    return cluster.service_account_kubeconfig(ns, ACCOUNT, readme_role_rules(), str(tmp_path / "canary.kubeconfig"))


@pytest.fixture
def reviews(api, ns):
    core = client.CoreV1Api(api.api_client)
    core.create_namespaced_service(ns, {"metadata": {"name": "reviews", "labels": {"app": "reviews"}}, "spec": {
        "selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
    service = samples("virtual-service-reviews-90-10.yaml")
    service[0]["spec"]["http"][0]["route"][0]["weight"], service[0]["spec"]["http"][0]["route"][1]["weight"] = 100, 0
    for obj in service + samples("destination-rule-all.yaml"):
        api.create_namespaced_custom_object(GROUP, VERSION, ns, obj["kind"].lower() + "s", obj)
    return ns


def vs(api, ns):
    return api.get_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews")


def weights(obj):
    return dict((d["destination"]["subset"], d.get("weight")) for d in obj["spec"]["http"][0]["route"])


def annotation(obj, key):
    raw = (obj["metadata"].get("annotations") or {}).get(key)
    return json.loads(raw) if raw else None


def rollout_args(kubeconfig, ns, health, **args):
    base = dict(name="reviews", namespace=ns, stable="v1", canary="v2", steps=[10, 50], interval="120s", kubeconfig=kubeconfig,
                checks=[{"name": "smoke", "type": "http", "url": health}], retry_inconclusive_for=0, probe_interval=0, command_interval=1,
                lease_holder="job-%s" % ns)
    base.update(args)
    return base


class Run:
    """ansible-playbook in the background, in a process group of its own (as a terminal runs a foreground job)."""

    def __init__(self, tmp_path, module_args, playbook="canary_rollout.yml"):
        self.result_file = str(tmp_path / "rollout-result.json")
        vars_file = tmp_path / "rollout-vars.json"
        vars_file.write_text(json.dumps({"module_args": module_args, "result_file": self.result_file}))
        self.log = open(str(tmp_path / "rollout.log"), "w")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen([os.path.join(VENV_BIN, "ansible-playbook"), os.path.join(TARGET, playbook), "-e", "@%s" % vars_file],
                                     cwd=ROOT, env=ansible_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = self.log.name

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def result(self):
        if not os.path.exists(self.result_file):
            return None
        with open(self.result_file) as f:
            return json.load(f)

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


def module_processes():
    """pid -> start time of every process running the canary_rollout module (the module and its guardian)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read()
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        argv = cmdline.split(b"\0")
        # the Python process running the module (not the shell that started it): the module, and its guardian
        if len(argv) > 1 and os.path.basename(argv[0]).startswith(b"python") and MODULE.encode() in argv[1] and fields[0] not in (b"Z", b"X"):
            found[int(entry)] = int(fields[19])
    return found


def wait_until(what, timeout, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    return what()


def started(api, ns, run, weight=10, timeout=90):
    """Wait for the rollout's first step on the VirtualService; return the module's processes (module + guardian)."""
    ok = wait_until(lambda: weights(vs(api, ns)).get("v2") == weight and annotation(vs(api, ns), LEASE), timeout, every=0.3)
    assert ok, "the rollout did not reach weight %d: %s" % (weight, run.output()[-3000:] if run else "")
    procs = wait_until(lambda: len(module_processes()) >= 2 and module_processes(), 10)
    assert len(procs) == 2, [(pid, open("/proc/%d/cmdline" % pid).read()) for pid in procs]   # the module and its guardian
    return procs


def settled(api, ns, timeout=20):
    """Seconds until the lease is gone (the rollout's last write), and the VirtualService then."""
    t0 = time.monotonic()
    ok = wait_until(lambda: LEASE not in (vs(api, ns)["metadata"].get("annotations") or {}), timeout)
    assert ok, vs(api, ns)["metadata"].get("annotations")
    return time.monotonic() - t0, vs(api, ns)


def gone(procs, timeout=15):
    """Every process of the run has ended (the same pid with the same start time would still be it)."""
    return wait_until(lambda: not any(module_processes().get(pid) == st for pid, st in procs.items()), timeout)


def writes(cluster, ns, mark):
    events = cluster.audit.events(since=mark, user="system:serviceaccount:%s:%s" % (ns, ACCOUNT), namespace=ns, resource="virtualservices")
    return [e for e in events if e["verb"] == "patch"]


def report(name, seconds, count):
    print("\nBENCH cancel %s: rollout ended (lease released) %.2f s after, %d API write(s)" % (name, seconds, count))


# -- cancel and kill -----------------------------------------------------------------------------------------------

def ended_by(cluster, api, ns, run, act, wait=30):
    """Wait for the first step, ``act(run, procs)``; then the seconds until the rollout's last write, the VirtualService
    and the module's writes since ``act`` - once every process of the run is gone."""
    try:
        procs = started(api, ns, run)
        mark = cluster.audit.mark()
        act(run, procs)
        seconds, obj = settled(api, ns)
        if wait:
            run.wait(wait)
    finally:
        run.stop()
    assert gone(procs), module_processes()
    return seconds, obj, len(writes(cluster, ns, mark))


def test_ctrl_c_rolls_back_releases_the_lease_and_leaves_no_process(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url))
    seconds, obj, count = ended_by(cluster, api, reviews, run, lambda r, _p: os.killpg(r.proc.pid, signal.SIGINT))  # a terminal's Ctrl-C
    assert weights(obj) == {"v1": 100, "v2": 0}
    state = annotation(obj, STATE)
    assert state["phase"] == "rolled_back" and state["reason"] == "cancelled (SIGINT) at step 1 (weight 10)", state
    assert count == 1
    report("SIGINT (Ctrl-C)", seconds, count)


def test_sigterm_with_on_cancel_hold_keeps_the_weights_and_a_rerun_resumes(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url, on_cancel="hold"))
    # to ansible-playbook only, as a supervisor stops it
    seconds, obj, count = ended_by(cluster, api, reviews, run, lambda r, _p: os.kill(r.proc.pid, signal.SIGTERM))
    assert weights(obj) == {"v1": 90, "v2": 10}
    state = annotation(obj, STATE)
    assert state["phase"] == "held" and state["reason"].startswith("cancelled ("), state
    assert count == 1
    report("SIGTERM to ansible-playbook (hold)", seconds, count)
    # the next run is not refused: it resumes the held step
    rc, result, out = run_playbook(os.path.join(TARGET, "canary_rollout.yml"), tmp_path, {"module_args": rollout_args(
        kubeconfig, reviews, health_url, steps=[10, 50], interval="1s", lease_holder="rerun")}, check=True)
    assert rc == 0 and result["note"] == "resuming held at step 1 (weight 10), as recorded", out


def test_kill_9_of_ansible_playbook_is_noticed_by_the_module_and_rolls_back(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url))
    # ansible-playbook alone: its worker and the module live on
    seconds, obj, count = ended_by(cluster, api, reviews, run, lambda r, _p: os.kill(r.proc.pid, signal.SIGKILL), wait=0)
    assert weights(obj) == {"v1": 100, "v2": 0}
    state = annotation(obj, STATE)
    assert state["phase"] == "rolled_back" and "the process that ran this job ended" in state["reason"] and "ansible-playbook" in state["reason"]
    assert seconds < 10 and count == 1
    report("kill -9 of ansible-playbook", seconds, count)


def test_kill_9_of_the_module_is_undone_by_its_guardian(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url))
    # the module forked its guardian: the guardian's pid comes after
    seconds, obj, count = ended_by(cluster, api, reviews, run, lambda _r, procs: os.kill(min(procs), signal.SIGKILL), wait=60)
    assert weights(obj) == {"v1": 100, "v2": 0}
    state = annotation(obj, STATE)
    assert state["phase"] == "rolled_back" and state["reason"] == (
        "cancelled (the module process was killed outright (SIGKILL)) at step 1 (weight 10)")
    assert count == 1
    report("kill -9 of the module", seconds, count)


def test_ansible_runner_cancel_as_awx_does_rolls_back(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    import ansible_runner  # pylint: disable=import-outside-toplevel
    args = rollout_args(kubeconfig, reviews, health_url)
    seen = {}

    def cancel_callback():
        """AWX's cancel button, pressed once the first step is on the VirtualService (ansible-runner polls this)."""
        if "procs" not in seen and weights(vs(api, reviews)).get("v2") == 10 and len(module_processes()) == 2:
            seen.update(procs=module_processes(), mark=cluster.audit.mark(), at=time.monotonic())
        return "procs" in seen

    (tmp_path / "job").mkdir()
    run = ansible_runner.run(private_data_dir=str(tmp_path / "job"), project_dir=ROOT, playbook=os.path.join(TARGET, "canary_rollout.yml"),
                             inventory="localhost,", extravars={"module_args": args, "result_file": str(tmp_path / "r.json")},
                             envvars=ansible_env(), quiet=True, timeout=300, cancel_callback=cancel_callback,
                             settings={"suppress_ansible_output": True})
    assert run.status == "canceled", (run.status, open(run.stdout.name).read()[-3000:])
    # ansible-runner killed ansible-playbook's process group (SIGKILL). Ansible runs the module outside that group, so the
    # module lives on and notices that its job ended (were it killed too, its guardian would do the same)
    _seconds, obj = settled(api, reviews)
    seconds = time.monotonic() - seen["at"]
    assert weights(obj) == {"v1": 100, "v2": 0}
    reason = annotation(obj, STATE)["reason"]
    assert annotation(obj, STATE)["phase"] == "rolled_back" and reason.startswith("cancelled (the process that ran this job ended: ") and (
        "ansible-playbook" in reason), reason
    assert gone(seen["procs"]), module_processes()
    report("ansible-runner cancel (AWX)", seconds, len(writes(cluster, reviews, seen["mark"])))


# -- operator commands ------------------------------------------------------------------------------------------------

def command(kubeconfig, tmp_path, ns, what, check=False, **args):
    module_args = dict(name="reviews", namespace=ns, command=what, kubeconfig=kubeconfig, by="ops", wait_timeout=30, **args)
    rc, result, out = run_playbook(os.path.join(TARGET, "canary_command.yml"), tmp_path, {"module_args": module_args}, check=check, diff=check)
    assert rc == 0 and result is not None, out
    return result


def test_pause_resume_and_abort_from_a_second_playbook(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url))
    try:
        started(api, reviews, run)
        planned = command(kubeconfig, tmp_path, reviews, "pause", check=True)
        assert planned["changed"] and not planned["acknowledged"] and COMMAND not in vs(api, reviews)["metadata"]["annotations"]
        paused = command(kubeconfig, tmp_path, reviews, "pause", reason="db migration")
        assert paused["acknowledged"] and paused["phase"] == "paused" and paused["weights_after"] == {"v1": 90, "v2": 10}, paused
        lease = annotation(vs(api, reviews), LEASE)
        assert lease["expires"] - time.time() > 3000   # the pause's lease: pause_timeout (3600 s) and more
        resumed = command(kubeconfig, tmp_path, reviews, "resume")
        assert resumed["acknowledged"] and resumed["phase"] == "progressing", resumed
        mark = cluster.audit.mark()
        aborted = command(kubeconfig, tmp_path, reviews, "abort", reason="support desk")
        assert aborted["acknowledged"] and aborted["phase"] == "aborted" and aborted["weights_after"] == {"v1": 100, "v2": 0}, aborted
        assert run.wait(60) == 0
    finally:
        run.stop()
    result = run.result()
    assert result["failed"] and result["result"] == "aborted" and result["reason"] == "aborted (abort by ops: support desk)", result
    assert [e["action"] for e in result["timeline"]] == ["pause", "resume", "abort", "aborted"]
    obj = vs(api, reviews)
    assert weights(obj) == {"v1": 100, "v2": 0} and LEASE not in obj["metadata"]["annotations"] and COMMAND not in obj["metadata"]["annotations"]
    assert len(writes(cluster, reviews, mark)) == 2   # the command's post, the rollout's abort


def test_promote_from_a_second_playbook_and_a_direct_abort_after_the_job(cluster, api, reviews, kubeconfig, health_url, tmp_path):
    run = Run(tmp_path, rollout_args(kubeconfig, reviews, health_url))
    try:
        started(api, reviews, run)
        # the collection's own playbook, as a user (or AWX's job template "onprem.mesh canary promote") runs it
        done = subprocess.run([os.path.join(VENV_BIN, "ansible-playbook"), os.path.join(ROOT, "playbooks", "canary_command.yml"),
                               "-e", json.dumps({"canary_command_action": "promote", "canary_command_service": "reviews",
                                                 "canary_command_namespace": reviews, "canary_command_kubeconfig": kubeconfig,
                                                 "canary_command_reason": "verified", "awx_user_name": "ops"})],
                              cwd=ROOT, env=ansible_env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "the rollout job-%s acted on promote: phase promoted, traffic now v1=0," % reviews in done.stdout, done.stdout
        assert run.wait(60) == 0
    finally:
        run.stop()
    result = run.result()
    assert not result.get("failed") and result["result"] == "promoted" and result["promoted_by"]["by"] == "ops", result
    # no rollout runs now: abort acts directly on the canary and stable the state records
    aborted = command(kubeconfig, tmp_path, reviews, "abort")
    assert aborted["direct"] and aborted["weights_after"] == {"v1": 100, "v2": 0} and weights(vs(api, reviews)) == {"v1": 100, "v2": 0}
    refused = command(kubeconfig, tmp_path, reviews, "pause")
    assert refused["failed"] and "no rollout is running on VirtualService %s/reviews" % reviews in refused["msg"]
