"""LabCluster: the real control plane (controlplane.py) with Istio installed by the istio role (istiolab.py).

    with LabCluster(run_dir) as cluster:
        cluster.kubeconfig, cluster.url, cluster.ca_file, cluster.admin_token, cluster.audit
        cluster.namespace("shop", labels={...})        # created now, deleted by cleanup_namespaces()
        cluster.service_account_kubeconfig("shop", "bot", rules=[...], path=...)   # RBAC bound to exactly rules

One per test session (tests/support/cluster_fixtures.py) or per lab (meshlab.py); everything stops with it.
"""
import os
import secrets
import time

import procs
from controlplane import ControlPlane
from istiolab import IstioLab


class LabCluster:
    def __init__(self, run_dir, istio=True, launcher=None, start_timeout=300.0):
        self.run_dir = os.path.abspath(run_dir)
        self._own_launcher = launcher is None
        self.launcher = launcher
        self.with_istio = istio
        self.start_timeout = start_timeout
        self.cp = None
        self.istio = None
        self.timings = {}
        self._namespaces = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        os.makedirs(self.run_dir, exist_ok=True)
        if self.launcher is None:
            procs.kill_stale(self.run_dir)
            self.launcher = procs.Launcher(self.run_dir)
        try:
            self.cp = ControlPlane(self.run_dir, launcher=self.launcher, start_timeout=self.start_timeout).start()
            self.timings.update(self.cp.timings)
            if self.with_istio:
                self.istio = IstioLab(self.cp, self.run_dir, self.launcher, timeout=self.start_timeout).start()
                self.timings.update(self.istio.timings)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self.cp is not None:
            self.cp.stop()
        if self._own_launcher and self.launcher is not None:
            self.launcher.close()
            self.launcher = None

    # -- the control plane's handles -----------------------------------------------------------------
    def __getattr__(self, name):
        if name in ("kubeconfig", "url", "ca_file", "admin_token", "audit", "api_client", "core", "kubectl",
                    "token_kubeconfig", "service_account_token"):
            return getattr(self.cp, name)
        raise AttributeError(name)

    def namespace(self, prefix, labels=None):
        """A new namespace <prefix>-<random>; deleted by cleanup_namespaces()."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.core().create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        self._namespaces.append(name)
        return name

    def cleanup_namespaces(self):
        from kubernetes.client.rest import ApiException

        api = self.core()
        for name in self._namespaces:
            try:
                api.delete_namespace(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        self._namespaces = []

    def service_account_kubeconfig(self, namespace, name, rules, path):
        """A ServiceAccount bound (RoleBinding) to a Role with exactly `rules`; a kubeconfig with its token."""
        from kubernetes import client

        rbac = client.RbacAuthorizationV1Api(self.api_client())
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]})
        token = self.service_account_token(namespace, name)
        return self.token_kubeconfig(path, token, namespace=namespace, user=f"system:serviceaccount:{namespace}:{name}")

    def wait_for(self, predicate, what, timeout=60.0, interval=0.2):
        return procs.wait_for(predicate, timeout, interval=interval, what=what)

    def wait_gone(self, namespace, timeout=60.0):
        """Bounded wait until a deleted namespace has finished terminating."""
        from kubernetes.client.rest import ApiException

        def gone():
            try:
                self.core().read_namespace(namespace)
            except ApiException as exc:
                return exc.status == 404
            return False

        start = time.monotonic()
        procs.wait_for(gone, timeout, interval=0.3, what=f"namespace {namespace} to be deleted")
        return time.monotonic() - start
