"""The canary modules on the faults kube-apiserver does not give on demand: HTTP 503, 429, 500 and slow answers.

They come from a fault proxy of real Envoy (tests/support/fault_proxy.py: the HTTP fault filter, switched through
Envoy's runtime) between the module and the lab's unchanged kube-apiserver. The modules run through ansible-playbook
as the ServiceAccount bound to exactly README's Role, with a kubeconfig whose server is the proxy; the test's own
reads go straight to the API server. What reached the server is read from its audit log; what the proxy did to the
requests from Envoy's counters and access log (one line per request, with its start time and Envoy's flags: FI a
fault-injected answer, DI a delayed request).

The modules' connection options under test: ``request_timeout`` (each API request gives up after it) and
``api_retries`` (a request answered 429, 500, 502, 503, 504 or not answered is sent again up to that many more times;
Retry-After is waited, else 0.5 s doubling).
"""
# pytest's fixtures are parameters of the same names
# pylint: disable=redefined-outer-name
import datetime
import http.server
import json
import os
import threading
import time

import pytest
from kubernetes import client

from canary_cluster import readme_role_rules  # pylint: disable=import-error
from cluster_fixtures import samples  # pylint: disable=import-error
from fault_proxy import EnvoyFaultProxy, get  # pylint: disable=import-error
from playbook_runner import ROOT, run_playbook  # pylint: disable=import-error

TARGET = os.path.join(ROOT, "tests", "integration", "targets", "canary_modules")
GROUP, VERSION = "networking.istio.io", "v1"
ACCOUNT = "canary"


# -- helpers (the same objects as tests/integration/test_canary_modules.py) -----------------------------------------

@pytest.fixture
def api(cluster):
    """Istio objects as the lab's admin, straight to kube-apiserver (not through the proxy)."""
    return client.CustomObjectsApi(cluster.api_client())


@pytest.fixture
def module_kubeconfig(cluster, ns, tmp_path):
    """A kubeconfig of ServiceAccount `canary` in ns, bound to exactly the README's Role."""
    return cluster.service_account_kubeconfig(ns, ACCOUNT, readme_role_rules(), str(tmp_path / "canary.kubeconfig"))


@pytest.fixture
def proxy(cluster, tmp_path):
    with EnvoyFaultProxy(cluster.url, cluster.ca_file, tmp_path / "fault-proxy") as running:
        print("fault proxy up in %.2f s" % running.started_in)
        yield running


@pytest.fixture
def proxied(proxy, module_kubeconfig, tmp_path):
    """The module's kubeconfig with the proxy as its server."""
    return proxy.kubeconfig(module_kubeconfig, tmp_path / "proxied.kubeconfig")


def module_user(ns):
    return "system:serviceaccount:%s:%s" % (ns, ACCOUNT)


def bookinfo(api_, namespace):
    core = client.CoreV1Api(api_.api_client)
    core.create_namespaced_service(namespace, {"metadata": {"name": "reviews", "labels": {"app": "reviews"}}, "spec": {
        "selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}})
    for obj in samples("virtual-service-reviews-90-10.yaml") + samples("destination-rule-all.yaml"):
        api_.create_namespaced_custom_object(GROUP, VERSION, namespace, obj["kind"].lower() + "s", obj)
    return get_vs(api_, namespace)


def get_vs(api_, namespace):
    return api_.get_namespaced_custom_object(GROUP, VERSION, namespace, "virtualservices", "reviews")


def weights(vs):
    return dict((d["destination"]["subset"], d.get("weight")) for d in vs["spec"]["http"][0]["route"])


def unchanged(now, before):
    return (now["spec"], now["metadata"]["generation"], now["metadata"].get("annotations")) == (
        before["spec"], before["metadata"]["generation"], before["metadata"].get("annotations"))


def split(kubeconfig, tmp_path, namespace, **args):
    args = dict(dict(name="reviews", weights={"v1": 70, "v2": 30}), kubeconfig=kubeconfig, namespace=namespace, **args)
    began = time.monotonic()
    rc, result, out = run_playbook(os.path.join(TARGET, "traffic_split.yml"), tmp_path, {"module_args": args}, timeout=300)
    return rc, result, out, time.monotonic() - began


def module_events(cluster, ns, mark):
    """(verb, resource, code) of every request of the module's ServiceAccount that reached kube-apiserver."""
    return [(e["verb"], (e.get("objectRef") or {}).get("resource"), e["responseStatus"]["code"])
            for e in cluster.audit.events(since=mark, user=module_user(ns), namespace=ns)]


def requests_seen(proxy):
    """[(start as seconds, method, path, status, flags)] from the proxy's access log."""
    out = []
    for line in proxy.access_lines():
        start, method, path, status, flags, _duration = line.split(" ")
        when = datetime.datetime.strptime(start, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()
        out.append((when, method, path.split("?", 1)[0], int(status), flags))
    return out


def gaps(seen):
    return [round(b[0] - a[0], 3) for a, b in zip(seen, seen[1:])]


# -- the proxy itself ------------------------------------------------------------------------------------------------

def test_the_proxy_passes_and_injects(cluster, ns, tmp_path):
    """Through the proxy a GET with a bearer token reaches kube-apiserver as that token's user; an abort answers
    from Envoy (503 and 429 with Retry-After: 1, 500 without) and the request never reaches the server; a delay holds
    the request that long; clear() ends every fault."""
    began = time.monotonic()
    path = "/api/v1/namespaces/%s" % ns
    mark = cluster.audit.mark()
    with EnvoyFaultProxy(cluster.url, cluster.ca_file, tmp_path / "fault-proxy") as proxy:
        started = time.monotonic() - began
        status, _headers, body = get(proxy.url, path, token=cluster.admin_token)
        assert status == 200 and json.loads(body)["metadata"]["name"] == ns, (status, body)
        anonymous = get(proxy.url, path)[0]
        assert anonymous in (401, 403), anonymous  # no token: the server's own answer comes through

        answers = {}
        for code in (503, 429, 500):
            proxy.abort(code)
            answers[code] = get(proxy.url, path, token=cluster.admin_token)
        proxy.clear()
        proxy.abort(503, methods=["PATCH"])  # a PATCH-only abort leaves GETs alone
        assert get(proxy.url, path, token=cluster.admin_token)[0] == 200
        proxy.clear()
        assert proxy.stat("fault.aborts_injected") == 3

        proxy.delay(1500)
        mark_delay = time.monotonic()
        status, _headers, _body = get(proxy.url, path, token=cluster.admin_token)
        delayed = time.monotonic() - mark_delay
        proxy.clear()
        assert status == 200 and proxy.stat("fault.delays_injected") == 1
        mark_fast = time.monotonic()
        assert get(proxy.url, path, token=cluster.admin_token)[0] == 200
        fast = time.monotonic() - mark_fast

        handle = proxy.abort_for(2, 503)
        statuses = [get(proxy.url, path, token=cluster.admin_token)[0] for dummy in range(2)]
        assert handle["done"].wait(5) and not handle["error"], handle
        statuses.append(get(proxy.url, path, token=cluster.admin_token)[0])
        seen = requests_seen(proxy)
    stopped = time.monotonic() - began
    print("proxy started in %.2f s (Envoy ready %.2f s), the test took %.2f s" % (started, proxy.started_in, stopped))

    for code in (503, 429):
        status, headers, body = answers[code]
        assert status == code and {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1", answers[code]
        assert body == b"fault filter abort", body
    assert answers[500][0] == 500 and "retry-after" not in {k.lower() for k in answers[500][1]}, answers[500]
    assert delayed >= 1.45 and fast < delayed, (delayed, fast)
    assert statuses == [503, 503, 200], statuses
    assert [(s[3], s[4]) for s in seen] == [(200, "-"), (anonymous, "-"), (503, "FI"), (429, "FI"), (500, "FI"), (200, "-"),
                                            (200, "DI"), (200, "-"), (503, "FI"), (503, "FI"), (200, "-")], seen
    assert proxy.child.popen.returncode is not None and proxy.launcher is None  # Envoy stopped and reaped

    # the passed requests reached kube-apiserver under the token's user; the aborted ones never did
    events = [e for e in cluster.audit.events(since=mark, user="lab-token-admin", resource="namespaces")
              if e["objectRef"].get("name") == ns]
    assert [(e["verb"], e["requestURI"], e["responseStatus"]["code"]) for e in events] == [("get", path, 200)] * 5, events


# -- traffic_split ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, least_gaps", [(503, [0.95, 0.95]), (500, [0.45, 0.95])], ids=["503", "500"])
def test_traffic_split_writes_once_after_two_failed_patches(cluster, ns, api, proxy, proxied, tmp_path, status, least_gaps):
    """The next two PATCHes are answered `status` by the proxy (they never reach kube-apiserver); the module sends its
    guarded patch again, after Retry-After (503: 1 s) or its own backoff (500: 0.5 s, then 1 s), and the third one
    sets the weights: kube-apiserver saw exactly one PATCH, answered 200."""
    before = bookinfo(api, ns)
    mark = cluster.audit.mark()
    handle = proxy.abort_for(2, status, methods=["PATCH"])
    rc, result, out, took = split(proxied, tmp_path, ns)
    print("traffic_split through two %d answers: %.1f s" % (status, took))
    assert handle["done"].wait(5) and not handle["error"], handle
    assert rc == 0 and not result.get("failed") and result["changed"], out
    assert result["weights_after"] == {"v1": 70, "v2": 30} and weights(get_vs(api, ns)) == {"v1": 70, "v2": 30}
    assert get_vs(api, ns)["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert proxy.stat("fault.aborts_injected") == 2
    patches = [s for s in requests_seen(proxy) if s[1] == "PATCH"]
    assert [(s[3], s[4]) for s in patches] == [(status, "FI"), (status, "FI"), (200, "-")], patches
    assert all(g >= least for g, least in zip(gaps(patches), least_gaps)), (gaps(patches), least_gaps)
    events = module_events(cluster, ns, mark)
    assert [e for e in events if e[0] == "patch"] == [("patch", "virtualservices", 200)], events


def test_traffic_split_waits_retry_after_on_429(cluster, ns, api, proxy, proxied, tmp_path):
    """The API server's first two answers are 429 with Retry-After: 1 (the module's first requests, its reads): the
    module waits the second each time before it asks again, then sets the weights with one patch."""
    bookinfo(api, ns)
    mark = cluster.audit.mark()
    handle = proxy.abort_for(2, 429)
    rc, result, out, took = split(proxied, tmp_path, ns)
    print("traffic_split through two 429 answers: %.1f s" % took)
    assert handle["done"].wait(5) and not handle["error"], handle
    assert rc == 0 and not result.get("failed") and result["changed"], out
    assert weights(get_vs(api, ns)) == {"v1": 70, "v2": 30}
    assert proxy.stat("fault.aborts_injected") == 2
    seen = requests_seen(proxy)
    assert [(s[3], s[4]) for s in seen[:3]] == [(429, "FI"), (429, "FI"), (200, "-")], seen
    assert seen[0][1:3] == seen[1][1:3] == seen[2][1:3], seen  # the same request, sent again
    assert min(gaps(seen[:3])) >= 0.95 and seen[2][0] - seen[0][0] >= 1.9, gaps(seen)  # Retry-After honoured
    assert [e for e in module_events(cluster, ns, mark) if e[0] == "patch"] == [("patch", "virtualservices", 200)]


def test_traffic_split_gives_up_on_a_permanent_503_and_says_how(cluster, ns, api, proxy, proxied, tmp_path):
    """Every request is answered 503: with api_retries 2 the module asks three times, then fails naming the status,
    the attempts and the option; nothing reached the server, the VirtualService is as it was."""
    before = bookinfo(api, ns)
    mark = cluster.audit.mark()
    proxy.abort(503)
    rc, result, out, took = split(proxied, tmp_path, ns, api_retries=2)
    print("traffic_split against a permanent 503: %.1f s; msg: %s" % (took, (result or {}).get("msg")))
    assert rc == 0 and result["failed"], out
    msg = result["msg"]
    assert "HTTP 503" in msg and "3 attempts" in msg and "api_retries" in msg, msg
    assert proxy.stat("fault.aborts_injected") == 3
    seen = requests_seen(proxy)
    assert [(s[3], s[4]) for s in seen] == [(503, "FI")] * 3 and min(gaps(seen)) >= 0.95, seen
    assert unchanged(get_vs(api, ns), before)
    assert module_events(cluster, ns, mark) == []


def test_traffic_split_gives_up_on_a_slow_api_and_says_how(cluster, ns, api, proxy, proxied, tmp_path):
    """Every request is held 3 s: with request_timeout 1 and api_retries 1 the module gives up each request after a
    second, sends it once more, then fails naming the timeout and request_timeout. The held requests never reach the
    server (the client went away first), so nothing changed."""
    before = bookinfo(api, ns)
    mark = cluster.audit.mark()
    proxy.delay(3000)
    rc, result, out, took = split(proxied, tmp_path, ns, request_timeout=1, api_retries=1)
    proxy.clear()
    print("traffic_split against a 3 s API with request_timeout 1: %.1f s; msg: %s" % (took, (result or {}).get("msg")))
    assert rc == 0 and result["failed"], out
    msg = result["msg"]
    assert "timed out" in msg.lower() and "request_timeout" in msg and "2 attempts" in msg, msg
    # one request and one retry, no more (a client library's own retries would show here)
    seen = requests_seen(proxy)
    assert proxy.stat("fault.delays_injected") == 2, seen
    assert [s[4] for s in seen] == ["DI,DC"] * 2, seen
    assert unchanged(get_vs(api, ns), before)
    assert module_events(cluster, ns, mark) == []


def test_traffic_split_passes_once_a_slow_api_is_fast_again(cluster, ns, api, proxy, proxied, tmp_path):
    """The first request is held 3 s, the delay then switched off: the module gives it up after request_timeout (1 s),
    sends it again and sets the weights."""
    bookinfo(api, ns)
    mark = cluster.audit.mark()
    handle = proxy.delay_for(1, 3000)
    rc, result, out, took = split(proxied, tmp_path, ns, request_timeout=1)
    print("traffic_split after one 3 s request with request_timeout 1: %.1f s" % took)
    assert handle["done"].wait(5) and not handle["error"], handle
    assert rc == 0 and not result.get("failed") and result["changed"], out
    assert weights(get_vs(api, ns)) == {"v1": 70, "v2": 30}
    assert proxy.stat("fault.delays_injected") == 1
    seen = requests_seen(proxy)
    assert seen[0][4] == "DI,DC" and seen[1][1:3] == seen[0][1:3] and seen[1][3:] == (200, "-"), seen
    assert [e for e in module_events(cluster, ns, mark) if e[0] == "patch"] == [("patch", "virtualservices", 200)]


# -- canary_rollout --------------------------------------------------------------------------------------------------

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"healthy": true}')

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def health():
    """A health endpoint on 127.0.0.1 that always passes (the rollout's `http` check; no Prometheus needed)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/healthz" % server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class AfterFirstStep:
    """Watches the VirtualService (as the admin, straight to the API server) and, as soon as it shows the rollout's
    first step, runs `fault()` (which switches a fault of the proxy on and returns its handle). Bounded in time."""

    def __init__(self, api_, namespace, fault, first, timeout=120.0):
        self.api, self.namespace, self.fault, self.first = api_, namespace, fault, first
        self.timeout = timeout
        self.handle = None
        self.errors = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="after-first-step", daemon=True)

    def _run(self):
        deadline = time.monotonic() + self.timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if weights(get_vs(self.api, self.namespace)) == self.first:
                    self.handle = self.fault()
                    return
            except Exception as exc:  # pylint: disable=broad-except  # the test asserts there are none
                self.errors.append(repr(exc))
                return
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        return False


ROLLOUT_FAULTS = {
    # two 503s (Retry-After: 1) for whatever the rollout asks next: the looks of the running step (every second)
    "reads": (lambda proxy: proxy.abort_for(2, 503), "fault.aborts_injected", 2, 1, "4s"),
    # the same with a look every 3 s, longer than the two retries take
    "reads-looks-every-3s": (lambda proxy: proxy.abort_for(2, 503), "fault.aborts_injected", 2, 3, "8s"),
    # two 503s for the next write: the promotion's
    "write": (lambda proxy: proxy.abort_for(2, 503, methods=["PATCH"]), "fault.aborts_injected", 2, 1, "4s"),
    # one read held 1.5 s (within request_timeout, so not retried): a look that takes longer than command_interval
    "slow-read": (lambda proxy: proxy.delay_for(1, 1500, methods=["GET"]), "fault.delays_injected", 1, 1, "4s"),
}


@pytest.mark.parametrize("case", list(ROLLOUT_FAULTS))
def test_rollout_promotes_through_api_faults_after_its_first_step(cluster, ns, api, proxy, proxied, health, tmp_path, case):
    """A rollout 50 % -> 100 %: once the VirtualService shows step 1, a fault of the proxy meets the rollout's next
    requests (ROLLOUT_FAULTS). The rollout neither stops nor rolls back: it promotes, with one write per step, each
    accepted by the server at its first arrival there."""
    fault, counter, count, command_interval, interval = ROLLOUT_FAULTS[case]
    bookinfo(api, ns)
    args = dict(name="reviews", namespace=ns, stable="v1", canary="v2", steps=[50, 100], interval=interval,
                command_interval=command_interval, kubeconfig=proxied, checks=[{"name": "smoke", "type": "http", "url": health}],
                retry_inconclusive_for=0)
    mark = cluster.audit.mark()
    began = time.monotonic()
    with AfterFirstStep(api, ns, lambda: fault(proxy), {"v1": 50, "v2": 50}) as watcher:
        rc, result, out = run_playbook(os.path.join(TARGET, "canary_rollout.yml"), tmp_path, {"module_args": args}, timeout=300)
    print("canary_rollout, %s after step 1: %.1f s; %s" % (case, time.monotonic() - began, (result or {}).get("msg", "")))
    assert not watcher.errors and watcher.handle is not None, (watcher.errors, out)
    assert watcher.handle["done"].wait(5) and not watcher.handle["error"], watcher.handle
    assert proxy.stat(counter) == count
    assert rc == 0 and not result.get("failed") and result["result"] == "promoted", out
    assert [e["weight"] for e in result["timeline"]] == [50, 100], result["timeline"]
    assert weights(get_vs(api, ns)) == {"v1": 0, "v2": 100}
    if counter == "fault.aborts_injected":
        aborted = [s for s in requests_seen(proxy) if s[4] == "FI"]
        assert len(aborted) == 2 and (case != "write" or all(s[1] == "PATCH" for s in aborted)), aborted
    events = module_events(cluster, ns, mark)
    assert [e for e in events if e[0] == "patch"] == [("patch", "virtualservices", 200)] * 2, events
    assert all(e[2] < 400 for e in events), events
    annotations = get_vs(api, ns)["metadata"]["annotations"]
    assert json.loads(annotations["mesh.onprem.io/canary-rollout"])["phase"] == "promoted"
