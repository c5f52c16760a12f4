"""Match and mirror steps of canary_rollout on the local mesh lab: the real kube-apiserver with istiod's validating
webhook, a real Envoy programmed by istiod over xDS, the two upstream versions and a real Prometheus.

What is proven here, by what Envoy does and what the upstreams count:
- a match step's route reaches Envoy and sends the matching requests (a header, a cookie) to the canary while every
  other request stays on stable; promotion and rollback remove it from the VirtualService and from Envoy;
- a mirror step makes Envoy copy the configured share of the route's requests to the canary (counted at the upstreams),
  users get stable's answers only, and the gate judges the canary on the copies: a faulty canary is rolled back
  before any user request reached it; promotion and rollback take the mirror away, and a mirror of the route's own
  is put back as it was.
The VirtualService's other routes are byte-identical after every run (kube-apiserver returns a custom resource's keys
in order, so the target route's restored fields read as before too).

In the lab one Envoy plays both sidecars, and Prometheus' recording rules make Istio's metric names out of its
per-cluster stats, which count mirrored requests on the canary's cluster: the built-in queries (reporter="destination")
see the copies as they would on a real canary's inbound sidecar. That a real source sidecar does not report mirrored
requests (reporter="source") cannot be shown here; canary_rollout refuses such checks for a plan with a mirror step.
"""
import copy
import json
import os
import sys
import threading
import time
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab"))

import canary_driver  # noqa: E402 pylint: disable=wrong-import-position,import-error
import lab_objects as lo  # noqa: E402 pylint: disable=wrong-import-position,import-error
from canary_driver import BackgroundLoad, CanaryRun, primary_weights as weights, render_timeline, reset_release, wait_until  # noqa: E402 pylint: disable=wrong-import-position,import-error
from meshlab import MeshLab, _http_json  # noqa: E402 pylint: disable=wrong-import-position,import-error
from prometheus_harness import prometheus_available  # noqa: E402 pylint: disable=wrong-import-position,import-error

import envoy  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
assert prometheus_available(), "no Prometheus binary (Debian package prometheus): run make setup"

PLAYBOOK = os.path.join(ROOT, "tests", "integration", "targets", "canary_steps", "rollout.yml")
STATE = "mesh.onprem.io/canary-rollout"
OWN_ROUTE = "onprem-mesh-canary-match-primary"
INTERVAL = "8s"
X_CANARY = {"headers": {"x-canary": {"exact": "true"}}}
CANARY_COOKIE = "session=abc; canary=always; theme=dark"


class StepsRun(CanaryRun):
    """CanaryRun (lab/canary_driver.py) with the steps playbook: canary_rollout with steps of any form."""

    def start(self):
        with mock.patch.object(canary_driver, "PLAYBOOK", PLAYBOOK):
            return super().start()


class HeaderLoad(BackgroundLoad):
    """Like BackgroundLoad (bounded slices from a thread), every request with the given headers."""

    def __init__(self, lab, headers, **kwargs):
        super().__init__(lab, **kwargs)
        self.headers = headers

    def _loop(self):
        deadline = time.monotonic() + self.max_seconds
        while not self.stopped.is_set() and time.monotonic() < deadline:
            seconds = min(self.slice_seconds, max(0.1, deadline - time.monotonic()))
            self.results.append(self.lab.load(requests=int(self.rps * seconds) + 1, seconds=seconds, rps=self.rps,
                                              concurrency=self.concurrency, headers=self.headers))


@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):  # pylint: disable=redefined-outer-name
    run_dir = tmp_path_factory.mktemp("meshlab-steps")
    with MeshLab(run_dir=str(run_dir), cluster=cluster) as mesh:
        mesh.warm_up()  # both versions' series exist before the first window (docs/mesh-lab.md)
        with BackgroundLoad(mesh, rps=50, max_seconds=900) as load:
            mesh.load_thread = load
            yield mesh
    assert not os.listdir(run_dir / "pids")  # every child of the lab stopped


def pristine_routes():
    return lo.virtual_service()["spec"]["http"]


@pytest.fixture
def fresh(lab):  # pylint: disable=redefined-outer-name
    """The lab's own routes (no match route, no mirror), v1 = 100 served by Envoy, no rollout recorded, no fault."""
    lab.custom.patch_namespaced_custom_object("networking.istio.io", "v1", lab.namespace, "virtualservices", lab.service,
                                              {"spec": {"http": pristine_routes()}})
    reset_release(lab)
    assert wait_until(lambda: envoy_route(lab, OWN_ROUTE) is None and not mirror_policies(lab), timeout=30) is not None
    # the background traffic's slice under way began before the reset (a promoted v2 may have answered it): the tests
    # count the users' answers from the next slice on
    under_way = len(lab.load_thread.results)
    assert wait_until(lambda: len(lab.load_thread.results) > under_way, timeout=30) is not None
    # the analysis window reaches back INTERVAL seconds: wait until it holds none of an earlier test's canary errors
    assert wait_until(lambda: not canary_errors(lab), timeout=30) is not None, "the canary's errors stay in Prometheus' window"
    return lab


def canary_errors(lab_):
    """5xx answers of the canary in the last analysis window, as Prometheus has them."""
    query = ('sum(increase(istio_requests_total{reporter="destination", destination_workload="payment-v2", response_code=~"5.."}[%s]))'
             % INTERVAL)
    return sum(float(r["value"][1]) for r in lab_.query(query))


def envoy_route(lab_, name):
    """The route `name` of Envoy's route configuration for the lab's port (from /config_dump), or None."""
    dump = _http_json(f"{lab_.envoy_admin_url}/config_dump?resource=dynamic_route_configs", timeout=10)
    for section in dump.get("configs", []):
        for vhost in (section.get("route_config") or {}).get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                if route.get("name") == name:
                    return route
    return None


def mirror_policies(lab_):
    """[(subset, percent)] Envoy mirrors the primary route's requests to."""
    route = envoy_route(lab_, "primary") or {}
    out = []
    for policy in (route.get("route") or {}).get("request_mirror_policies", []):
        fraction = policy.get("runtime_fraction", {}).get("default_value", {})
        scale = {"HUNDRED": 100, "TEN_THOUSAND": 10000, "MILLION": 1000000}[fraction.get("denominator", "HUNDRED")]
        out.append((policy["cluster"].split("|")[2], 100.0 * fraction.get("numerator", 0) / scale))
    return out


def served(lab_):
    """Requests each upstream answered so far (its own counters, at its admin port)."""
    return dict((v, _http_json(f"http://127.0.0.1:{lab_.upstreams[v]['admin_port']}/admin/stats")) for v in lo.VERSIONS)


def vs_http(lab_):
    return lab_.virtual_service()["spec"]["http"]


def state(lab_):
    raw = (lab_.virtual_service()["metadata"].get("annotations") or {}).get(STATE)
    return json.loads(raw) if raw else None


def with_weights(routes, stable, canary):
    """The routes with primary's weights set, as a promotion or rollback leaves them."""
    routes = copy.deepcopy(routes)
    for route in routes:
        if route.get("name") == "primary":
            for dest in route["route"]:
                dest["weight"] = canary if dest["destination"]["subset"] == "v2" else stable
    return routes


def dumped(routes):
    return [json.dumps(r) for r in routes]


def users_saw(results):
    """What the background traffic's answers were, added up: {version: n} and {status: n}."""
    by_version, by_status = {}, {}
    for res in results:
        for key, n in res.by_version.items():
            by_version[key] = by_version.get(key, 0) + n
        for key, n in res.by_status.items():
            by_status[key] = by_status.get(key, 0) + n
    return by_version, by_status


def analysed(result):
    return [e for e in result["timeline"] if "verdict" in e]


def checks_of(entry):
    return dict((c["name"], c) for c in entry["checks"])


def test_a_header_match_step_sends_its_requests_to_the_canary_and_promotion_removes_it(fresh):  # pylint: disable=redefined-outer-name
    before = vs_http(fresh)
    mark = fresh.cluster.audit.mark()
    with HeaderLoad(fresh, {"x-canary": "true"}, rps=10, max_seconds=120):  # the testers: the canary's traffic in the match step
        run = StepsRun(fresh, steps=[{"match": {"headers": {"x-canary": {"exact": "true"}}}}, 50, 100], interval=INTERVAL).start()
        assert wait_until(lambda: envoy_route(fresh, OWN_ROUTE) is not None, timeout=60) is not None, "Envoy never got the match route"
        # in the match step: the header's requests to the canary, all others to stable
        tester = fresh.load(requests=200, seconds=20, concurrency=4, headers={"x-canary": "true"})
        user = fresh.load(requests=200, seconds=20, concurrency=4)
        other_value = fresh.load(requests=50, seconds=20, concurrency=4, headers={"x-canary": "false"})
        still_match_step = fresh.envoy_weights() == {"v1": 100} and state(fresh)["step"] == 0
        result = run.wait()
    print(render_timeline(result))
    assert still_match_step, "the loads did not fall in the match step; the check below would prove nothing"
    assert dict(tester.by_version) == {"v2": 200} and dict(user.by_version) == {"v1": 200} and dict(other_value.by_version) == {"v1": 50}
    assert result["result"] == "promoted" and run.returncode == 0, run.output[-3000:]
    first = analysed(result)[0]
    assert first["match"] == X_CANARY and first["weight"] == 0 and first["verdict"] == "pass"
    assert checks_of(first)["success-rate"]["value"] >= 99  # judged on the testers' requests: the canary had no others
    # the VirtualService as it was, but primary's weights; Envoy without the match route
    assert dumped(vs_http(fresh)) == dumped(with_weights(before, 0, 100))
    assert wait_until(lambda: envoy_route(fresh, OWN_ROUTE) is None, timeout=30) is not None
    assert fresh.envoy_weights() == {"v2": 100}
    writes = [e for e in fresh.cluster.audit.events(since=mark, namespace=fresh.namespace, resource="virtualservices")
              if e["verb"] in ("create", "update", "patch", "delete")]
    assert [(e["verb"], e["responseStatus"]["code"]) for e in writes] == [("patch", 200)] * 3  # match step, 50, promotion


def test_a_faulty_canary_in_a_cookie_match_step_is_rolled_back_and_the_route_removed(fresh):  # pylint: disable=redefined-outer-name
    before = vs_http(fresh)
    fresh.fault("v2", error_rate=0.5)
    users_from = len(fresh.load_thread.results)
    with HeaderLoad(fresh, {"cookie": CANARY_COOKIE}, rps=10, max_seconds=120):
        run = StepsRun(fresh, steps=[{"match": {"cookie": "canary=always"}}, 50, 100], interval=INTERVAL).start()
        assert wait_until(lambda: envoy_route(fresh, OWN_ROUTE) is not None, timeout=60) is not None, "Envoy never got the match route"
        with_cookie = fresh.load(requests=100, seconds=20, concurrency=4, headers={"cookie": CANARY_COOKIE})
        other_cookie = fresh.load(requests=100, seconds=20, concurrency=4, headers={"cookie": "session=abc; canary=always2"})
        still_match_step = envoy_route(fresh, OWN_ROUTE) is not None
        result = run.wait()
    users, statuses = users_saw(fresh.load_thread.results[users_from:])
    print(render_timeline(result))
    assert still_match_step, "the loads did not fall in the match step; the check below would prove nothing"
    assert dict(with_cookie.by_version) == {"v2": 100} and dict(other_cookie.by_version) == {"v1": 100}
    assert result["result"] == "rolled_back" and run.returncode != 0, run.output[-3000:]
    assert result["reason"].startswith("step 1 (match headers cookie regex ") and "success-rate" in result["reason"]
    assert len(analysed(result)) == 1 and weights(fresh) == {"v1": 100, "v2": 0}
    # the users (no cookie) never reached the canary
    assert set(users) == {"v1"} and all(code < 500 for code in statuses), (users, statuses)
    # rolled back: the VirtualService exactly as before, and Envoy sends the cookie's requests to stable again
    assert dumped(vs_http(fresh)) == dumped(before)
    assert wait_until(lambda: envoy_route(fresh, OWN_ROUTE) is None, timeout=30) is not None
    assert dict(fresh.load(requests=50, seconds=20, concurrency=4, headers={"cookie": CANARY_COOKIE}).by_version) == {"v1": 50}


def test_a_mirror_step_copies_its_share_to_the_canary_users_see_only_stable_and_promotion_removes_it(fresh):  # pylint: disable=redefined-outer-name
    before = vs_http(fresh)
    users_from = len(fresh.load_thread.results)
    run = StepsRun(fresh, steps=[{"mirror": 50, "interval": "12s"}, 100], interval=INTERVAL).start()
    assert wait_until(lambda: mirror_policies(fresh) == [("v2", 50.0)], timeout=60) is not None, "Envoy never got the mirror"
    start = served(fresh)
    user = fresh.load(requests=400, seconds=20, concurrency=4)
    end = served(fresh)
    still_mirror_step = mirror_policies(fresh) == [("v2", 50.0)] and fresh.envoy_weights() == {"v1": 100}
    result = run.wait()
    users, statuses = users_saw(fresh.load_thread.results[users_from:])
    print(render_timeline(result))
    primary, copies = end["v1"]["requests"] - start["v1"]["requests"], end["v2"]["requests"] - start["v2"]["requests"]
    print("mirror step: stable answered %d requests, the canary got %d copies (%.1f %%)" % (primary, copies, 100.0 * copies / primary))
    assert still_mirror_step, "the load did not fall in the mirror step"
    # users get stable's answers only; the canary gets half of the requests as copies (binomial, 4.5 sigma at n >= 400)
    assert dict(user.by_version) == {"v1": 400} and primary >= 400
    assert 0.39 * primary <= copies <= 0.61 * primary, (primary, copies)
    assert result["result"] == "promoted" and run.returncode == 0, run.output[-3000:]
    first = analysed(result)[0]
    assert first["mirror"] == 50 and first["weight"] == 0 and first["verdict"] == "pass"
    assert checks_of(first)["success-rate"]["value"] >= 99  # the canary was judged on the copies
    assert statuses and all(code < 500 for code in statuses) and users.get("v1"), (users, statuses)
    assert dumped(vs_http(fresh)) == dumped(with_weights(before, 0, 100))
    assert wait_until(lambda: mirror_policies(fresh) == [], timeout=30) is not None
    assert fresh.envoy_weights() == {"v2": 100}


def test_a_faulty_canary_under_mirror_is_rolled_back_before_any_user_reached_it(fresh):  # pylint: disable=redefined-outer-name
    before = vs_http(fresh)
    fresh.fault("v2", error_rate=0.5)
    users_from = len(fresh.load_thread.results)
    start = served(fresh)
    run = StepsRun(fresh, steps=[{"mirror": 100}, 50, 100], interval=INTERVAL).start()
    result = run.wait()
    end = served(fresh)
    users, statuses = users_saw(fresh.load_thread.results[users_from:])
    print(render_timeline(result))
    assert result["result"] == "rolled_back" and run.returncode != 0, run.output[-3000:]
    assert result["reason"].startswith("step 1 (mirror 100 %): ") and "success-rate" in result["reason"]
    assert len(analysed(result)) == 1 and checks_of(analysed(result)[0])["success-rate"]["value"] < 99
    # the canary failed on copies: it answered (errors among them), the users got none of it
    assert end["v2"]["requests"] - start["v2"]["requests"] > 20 and end["v2"]["errors"] - start["v2"]["errors"] > 0
    assert set(users) == {"v1"} and all(code < 500 for code in statuses), (users, statuses)
    assert dumped(vs_http(fresh)) == dumped(before)
    assert wait_until(lambda: mirror_policies(fresh) == [], timeout=30) is not None


def test_the_routes_own_mirror_goes_on_beside_the_canarys_and_is_put_back(fresh):  # pylint: disable=redefined-outer-name
    # the user's own mirror on primary: 1 % of its requests to v1 (the lab has no third service to mirror to)
    own_mirror = {"mirror": {"host": "payment", "subset": "v1"}, "mirrorPercentage": {"value": 1}}
    routes = vs_http(fresh)
    routes[1].update(own_mirror)
    fresh.custom.patch_namespaced_custom_object("networking.istio.io", "v1", fresh.namespace, "virtualservices", fresh.service,
                                                {"spec": {"http": routes}})
    assert wait_until(lambda: mirror_policies(fresh) == [("v1", 1.0)], timeout=30) is not None
    before = vs_http(fresh)
    seen = []
    stop = threading.Event()

    def watch():  # bounded: the run below takes about 20 s
        deadline = time.monotonic() + 120
        while not stop.wait(0.1) and time.monotonic() < deadline:
            policies = mirror_policies(fresh)
            if not seen or seen[-1] != policies:
                seen.append(policies)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = StepsRun(fresh, steps=[{"mirror": 30}, 100], interval=INTERVAL).start()
        result = run.wait()
    finally:
        stop.set()
        watcher.join(10)
    print(render_timeline(result))
    print("Envoy's mirrors of primary, in order: %s" % seen)
    assert result["result"] == "promoted", run.output[-3000:]
    # during the step Istio's mirrors: the route's own first, the canary's after it (istiod's webhook took it)
    assert [("v1", 1.0), ("v2", 30.0)] in seen and seen[-1] == [("v1", 1.0)], seen
    assert dumped(vs_http(fresh)) == dumped(with_weights(before, 0, 100))
    assert state(fresh)["mirror_saved"] == own_mirror
