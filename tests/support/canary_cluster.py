"""Helpers for the canary suites on the lab's real control plane (tests/support/cluster_fixtures.py).

readme_role_rules()   the rules of the Role that README.md documents ("RBAC the canary modules need"), read from the
                      README itself, so a suite that runs the modules with exactly these rules proves the README.
deployment(), wait_for_deployment(), pods_of()
                      a Deployment that the controller-manager rolls out and KWOK runs (no containers), and a
                      bounded wait for a state of it.
ApiRelay              a relay on 127.0.0.1 between a module and kube-apiserver that runs another writer's change at
                      an exact point of the module's request sequence (e.g. between its read and its patch).
"""
import http.client
import http.server
import os
import re
import ssl
import threading
import time
import urllib.parse

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLE_HEADING = "### RBAC the canary modules need"


def readme_role_rules():
    """The `rules` of the Role in README.md's section "RBAC the canary modules need" (fails if it is gone)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert ROLE_HEADING in text, f"README.md has no section {ROLE_HEADING!r}"
    block = re.search(r"```yaml\n(.*?)```", text.split(ROLE_HEADING, 1)[1], re.S)
    assert block, f"README.md's section {ROLE_HEADING!r} has no yaml block"
    role = yaml.safe_load(block.group(1))
    assert role["kind"] == "Role" and role["rules"], role
    return role["rules"]


def without_verb(rules, resource, verb):
    """`rules` with `verb` taken away from the rule for `resource` (the rule dropped when no verb is left)."""
    out = []
    found = False
    for rule in rules:
        if resource in rule["resources"] and verb in rule["verbs"]:
            found = True
            verbs = [v for v in rule["verbs"] if v != verb]
            if verbs:
                out.append(dict(rule, verbs=verbs))
        else:
            out.append(rule)
    assert found, f"no rule grants {verb} on {resource}: {rules}"
    return out


# -- Deployments that the real controllers roll out and KWOK runs ----------------------------------------------------
def deployment(name, replicas=2, labels=None, pod_spec=None):
    """A Deployment of `replicas` pods labelled app=reviews, workload=<name> (+ labels); pod_spec adds to the pod's spec."""
    selector = {"app": "reviews", "workload": name}
    spec = {"containers": [{"name": "app", "image": "reviews:2"}]}
    spec.update(pod_spec or {})
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": dict(selector, **(labels or {}))}, "spec": spec}}}


def wait_for(predicate, what, timeout=60.0, interval=0.2):
    """Poll `predicate` until it returns something true; bounded in count and time. Returns the last value."""
    deadline = time.monotonic() + timeout
    value = None
    for dummy in range(int(timeout / interval) + 1):
        value = predicate()
        if value or time.monotonic() > deadline:
            break
        time.sleep(interval)
    assert value, f"timed out after {timeout:.0f} s waiting for {what}"
    return value


def wait_for_deployment(apps, namespace, name, available, updated=None, timeout=60.0):
    """Wait until the controller has observed the Deployment's generation and reports `available` (and `updated`)
    replicas; returns the Deployment as a dict."""
    def state():
        dep = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment(name, namespace))
        status = dep.get("status") or {}
        if (status.get("observedGeneration") == dep["metadata"]["generation"]
                and (status.get("availableReplicas") or 0) == available
                and (updated is None or (status.get("updatedReplicas") or 0) == updated)):
            return dep
        return None

    return wait_for(state, f"Deployment {namespace}/{name} with {available} available replicas", timeout)


def pods_of(core, namespace, name):
    """The pods of Deployment `name` (made by deployment()), as dicts, sorted by name."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"app=reviews,workload={name}").items
    return sorted((core.api_client.sanitize_for_serialization(p) for p in pods), key=lambda p: p["metadata"]["name"])


def record_restarts(core, namespace, pod, restarts, finished_at=None):
    """Record `restarts` container restarts of a running pod in its status, as a kubelet reports them (the lab's
    KWOK nodes run no containers, so nothing restarts by itself; KWOK leaves a Running pod's status alone)."""
    statuses = []
    for cs in pod["status"]["containerStatuses"]:
        cs = dict(cs, restartCount=restarts)
        if finished_at is not None:
            cs["lastState"] = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": finished_at}}
        statuses.append(cs)
    core.patch_namespaced_pod_status(pod["metadata"]["name"], namespace, {"status": {"containerStatuses": statuses}})


# -- a relay that puts another writer's change between a module's read and its write ---------------------------------
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
                "content-length"}


def kubeconfig_with_server(source, path, server):
    """A copy of kubeconfig `source` (its user and namespace) at `path` whose clusters all point at `server` (plain
    HTTP on 127.0.0.1: a relay or proxy in front of kube-apiserver)."""
    with open(source, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    for item in doc["clusters"]:
        item["cluster"] = {"server": server}
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    os.chmod(path, 0o600)
    return str(path)


class ApiRelay:
    """Plain HTTP on 127.0.0.1 in front of the lab's kube-apiserver (TLS, verified against the lab CA).

    Every request is forwarded unchanged (the client's own credentials included, so the audit log names the client's
    user) and every answer comes back unchanged: all status codes and messages are kube-apiserver's. The only thing
    the relay adds is order: ``before("PATCH", "/virtualservices/reviews", action, times=1)`` runs ``action()`` (e.g.
    another client's patch, sent straight to the API server) and waits for it to finish before it forwards the
    matching request. That puts a real concurrent write exactly between a module's read and its write, where a
    free-running writer lands only by chance.

        with ApiRelay(cluster.url, cluster.ca_file) as relay:
            relay.before("PATCH", "/namespaces/%s/virtualservices/reviews" % ns, bump)
            ... module with kubeconfig relay.kubeconfig(sa_kubeconfig, path) ...
            relay.fired  # how many times an action ran
    """

    def __init__(self, upstream, ca_file, timeout=60.0):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 443
        self.context = ssl.create_default_context(cafile=ca_file)
        self.timeout = timeout
        self.rules = []
        self.fired = 0
        self.errors = []
        self.lock = threading.Lock()
        self.server = None
        self.thread = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server.server_address[1]

    def before(self, method, path_suffix, action, times=1, skip=0):
        """Run action() before forwarding `times` requests `method` whose path (without query) ends with path_suffix,
        after letting the first `skip` of them through as they are."""
        self.rules.append({"method": method, "suffix": path_suffix, "action": action, "left": times, "skip": skip})

    def kubeconfig(self, source, path):
        """A copy of kubeconfig `source` (its user and namespace) whose server is this relay."""
        return kubeconfig_with_server(source, path, self.url)

    def _due(self, method, path):
        path = path.split("?", 1)[0]
        with self.lock:
            for rule in self.rules:
                if rule["left"] and rule["method"] == method and path.endswith(rule["suffix"]):
                    if rule["skip"]:
                        rule["skip"] -= 1
                        return None
                    rule["left"] -= 1
                    self.fired += 1
                    return rule["action"]
        return None

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPSConnection(self.upstream_host, self.upstream_port, context=self.context, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def start(self):
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                action = relay._due(self.command, self.path)
                if action is not None:
                    try:
                        action()
                    except Exception as exc:  # pylint: disable=broad-except
                        relay.errors.append(repr(exc))  # the test asserts there are none
                try:
                    status, reason, resp_headers, data = relay._forward(self.command, self.path, headers, body)
                except Exception as exc:  # pylint: disable=broad-except
                    relay.errors.append(repr(exc))  # and the client gets a 502
                    status, reason, resp_headers, data = 502, "Bad Gateway", [], repr(exc).encode()
                self.send_response(status, reason)
                for key, value in resp_headers:
                    if key.lower() not in _HOP_HEADERS:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay  # noqa: N815

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="api-relay", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
