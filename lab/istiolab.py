"""Istio on the lab's control plane, installed by the collection itself and run for real.

    istio = IstioLab(control_plane, run_dir, launcher).start()
    istio.revision, istio.xds_address, istio.monitoring_url

1. A local artifact mirror (http://127.0.0.1:<port>/istio/<version>/istioctl-<version>-linux-amd64.tar.gz and its
   .sha256), laid out like the upstream release downloads, holding the istioctl built from Istio's Go module
   (tools/controlplane). This is the istio role's air-gapped path.
2. `ansible-playbook playbooks/istio.yml` with the lab's variables (vars_for()): the role checks the checksum,
   installs istioctl, renders the IstioOperator and runs the real `istioctl install` against the lab's
   kube-apiserver: CRDs, webhooks, RBAC, ConfigMaps and the istiod Deployment are what istioctl creates. KWOK runs
   the Deployment's pod (it has no containers), so:
3. istiod itself runs here as a local process started from that Deployment's own container arguments and
   environment (the chart's, with the role's values), authenticated with a token of its ServiceAccount. It
   listens on the IP KWOK gave its pod (the lab's pod network is local, see controlplane.py), so the stock,
   Service-based webhooks reach it: kube-apiserver runs with --enable-aggregator-routing and sends webhook
   calls to the Service's endpoints. istiod patches the webhooks' caBundle itself, as in a cluster.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "controlplane"))
import components  # noqa: E402  pylint: disable=wrong-import-position

import procs  # noqa: E402  pylint: disable=wrong-import-position
import artifact_mirror  # noqa: E402  pylint: disable=wrong-import-position
from controlplane import write_kubeconfig  # noqa: E402  pylint: disable=wrong-import-position

VENV_BIN = os.path.dirname(sys.executable)
ISTIO_NAMESPACE = "istio-system"
REVISION_TAG = "prod-stable"
# Istio's own extensions are not in upstream Envoy: the switches that keep istiod from sending them.
PILOT_ENV = {
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",   # istio.metadata_exchange filters
    "PILOT_ENABLE_ALPN_FILTER": "false",         # istio.alpn filter
}
ISTIOD_PORTS = {"grpc": 15010, "secure_grpc": 15012, "https": 15017, "http": 8080, "monitoring": 15014}


class IstioLabError(RuntimeError):
    pass


class IstioLab:
    def __init__(self, control_plane, run_dir, launcher, version=components.ISTIO_RELEASE, timeout=300.0):
        self.cp = control_plane
        self.run_dir = os.path.join(os.path.abspath(run_dir), "istio")
        self.launcher = launcher
        self.version = version
        self.revision = version.replace(".", "-")
        self.timeout = timeout
        self.ports = dict(ISTIOD_PORTS)
        self.pod_ip = None
        self.mirror = None
        self.child = None
        self.timings = {}
        self.install_output = ""

    @property
    def xds_address(self):
        return (self.pod_ip, self.ports["grpc"])

    @property
    def monitoring_url(self):
        return f"http://{self.pod_ip}:{self.ports['monitoring']}"

    @property
    def debug_url(self):
        return f"http://{self.pod_ip}:{self.ports['http']}"

    @property
    def istioctl(self):
        return os.path.join(self.run_dir, "lib", self.version, "istioctl")

    def vars_for(self, sha256, mirror_url):
        """The istio role's variables for the lab (a site's inventory sets the same ones)."""
        return {
            "istio_version": self.version,
            "istio_istioctl_sha256": {"amd64": sha256},
            "istio_mirror_url": mirror_url,
            "istio_download_dir": os.path.join(self.run_dir, "downloads"),
            "istio_install_dir": os.path.join(self.run_dir, "lib"),
            "istio_bin_dir": os.path.join(self.run_dir, "bin"),
            "istio_config_dir": os.path.join(self.run_dir, "etc"),
            "istio_kubeconfig": self.cp.kubeconfig,
            "istio_profile": "minimal",
            "istio_revision_tags": [REVISION_TAG],
            "istio_tracing_sampling": 0.0,
            "istio_access_log": False,
            "istio_wait_timeout": int(self.timeout),
            "istio_mesh_config": {"enableAutoMtls": False, "defaultProviders": {"metrics": []}},
            "istio_values": {
                "pilot": {"env": dict(PILOT_ENV)},
                "telemetry": {"enabled": False},
            },
        }

    def start(self):
        began = time.monotonic()
        os.makedirs(self.run_dir, exist_ok=True)
        mirror_dir = os.path.join(self.run_dir, "mirror")
        shutil.rmtree(mirror_dir, ignore_errors=True)
        sha = artifact_mirror.istioctl(mirror_dir, self.version)
        self.mirror = artifact_mirror.Mirror(mirror_dir)
        try:
            self._install(self.vars_for(sha, self.mirror.url))
        finally:
            self.mirror.stop()
        self.timings["istio install (role + istiod)"] = time.monotonic() - began
        return self

    def _install(self, variables):
        vars_file = os.path.join(self.run_dir, "istio-vars.json")
        with open(vars_file, "w", encoding="utf-8") as fh:
            json.dump(variables, fh, indent=1)
        env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), NO_PROXY="127.0.0.1,localhost",
                   ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
        log_path = os.path.join(self.run_dir, "istio-role.log")
        with open(log_path, "w", encoding="utf-8") as log:
            role = subprocess.Popen(  # noqa: S603 - our own playbook
                [os.path.join(VENV_BIN, "ansible-playbook"), os.path.join(ROOT, "playbooks", "istio.yml"),
                 "-e", f"@{vars_file}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                # istioctl creates the istiod Deployment and then waits for it: start istiod from it meanwhile,
                # so that the webhooks istioctl installed have their server when the role's next tasks need it.
                deadline = time.monotonic() + self.timeout
                while self.child is None and role.poll() is None and time.monotonic() < deadline:
                    found = self._istiod_pod()
                    if found is not None:
                        self._start_istiod(*found)
                        break
                    time.sleep(0.5)
                role.wait(max(1.0, deadline - time.monotonic()))
            except BaseException:
                role.kill()
                role.wait()
                raise
        with open(log_path, encoding="utf-8") as fh:
            self.install_output = fh.read()
        if role.returncode != 0:
            raise IstioLabError(f"the istio role failed (rc {role.returncode}); log {log_path}:\n"
                                f"{self.install_output[-4000:]}")
        if self.child is None:
            found = self._istiod_pod()
            if found is None:
                raise IstioLabError(f"the istio role ran but no pod of istiod-{self.revision} is running")
            self._start_istiod(*found)
        self.wait_ready()

    def _istiod_pod(self):
        """(Deployment, its running Pod) once KWOK runs the pod with an IP, else None."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = self.cp.api_client()
        try:
            dep = client.AppsV1Api(api).read_namespaced_deployment(f"istiod-{self.revision}", ISTIO_NAMESPACE)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
        for pod in client.CoreV1Api(api).list_namespaced_pod(ISTIO_NAMESPACE, label_selector=selector).items:
            if pod.status.phase == "Running" and pod.status.pod_ip and not pod.metadata.deletion_timestamp:
                return dep.to_dict(), pod.to_dict()
        return None

    def _start_istiod(self, deployment, pod_obj):
        """Run pilot-discovery with the Deployment's own args and env, on the IP of the pod KWOK runs."""
        pod = deployment["spec"]["template"]["spec"]
        self.pod_ip = pod_obj["status"]["pod_ip"]
        container = next(c for c in pod["containers"] if c["name"] == "discovery")
        service_account = pod.get("service_account_name") or pod.get("serviceAccountName")
        workdir = os.path.join(self.run_dir, "istiod")
        os.makedirs(workdir, exist_ok=True)
        token = self.cp.service_account_token(ISTIO_NAMESPACE, service_account, seconds=48 * 3600)
        kubeconfig = write_kubeconfig(os.path.join(workdir, "kubeconfig"), self.cp.url, self.cp.ca_file,
                                      user=f"system:serviceaccount:{ISTIO_NAMESPACE}:{service_account}", token=token,
                                      namespace=ISTIO_NAMESPACE)
        field = {"metadata.name": pod_obj["metadata"]["name"], "metadata.namespace": ISTIO_NAMESPACE,
                 "spec.serviceAccountName": service_account}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir}
        for item in container.get("env") or []:
            source = item.get("value_from")
            if source is None:
                env[item["name"]] = item.get("value") or ""
            elif source.get("field_ref"):
                env[item["name"]] = field[source["field_ref"]["field_path"]]
            elif source.get("resource_field_ref"):
                env[item["name"]] = "2"  # limits.cpu -> GOMAXPROCS
        env.update(KUBECONFIG=kubeconfig)
        args = [a for a in container.get("args") or [] if not a.startswith("--monitoringAddr")]
        p, ip = self.ports, self.pod_ip
        args += [f"--monitoringAddr={ip}:{p['monitoring']}", f"--httpAddr={ip}:{p['http']}",
                 f"--grpcAddr={ip}:{p['grpc']}", f"--secureGRPCAddr={ip}:{p['secure_grpc']}",
                 f"--httpsAddr={ip}:{p['https']}", f"--kubeconfig={kubeconfig}"]
        with open(os.path.join(workdir, "command.json"), "w", encoding="utf-8") as fh:
            json.dump({"args": args, "env": {k: v for k, v in env.items() if k != "PATH"}}, fh, indent=1)
        self.child = self.launcher.spawn("istiod", [str(components.binary("pilot-discovery"))] + args, env=env,
                                         cwd=workdir)

    def wait_ready(self):
        def ready():
            with urllib.request.urlopen(f"{self.debug_url}/ready", timeout=3) as resp:  # noqa: S310
                return resp.status == 200

        procs.wait_for(ready, self.timeout, interval=0.3, what="istiod /ready", child=self.child)

    def kube_objects(self):
        """What istioctl installed, for the record (kinds and names)."""
        out = self.cp.kubectl("get", "deploy,svc,cm,mutatingwebhookconfigurations,validatingwebhookconfigurations",
                              "-n", ISTIO_NAMESPACE, "-o", "name", check=False)
        return out.stdout.split()


if __name__ == "__main__":  # manual check: python lab/istiolab.py [seconds]
    from controlplane import ControlPlane

    run = os.path.join(ROOT, ".cache", "istiolab-manual")
    launcher = procs.Launcher(run)
    try:
        with ControlPlane(run, launcher=launcher) as cp:
            lab = IstioLab(cp, run, launcher).start()
            print(json.dumps({"kubeconfig": cp.kubeconfig, "ports": lab.ports, "timings": {**cp.timings, **lab.timings},
                              "objects": lab.kube_objects()}, indent=1), flush=True)
            threading.Event().wait(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    finally:
        launcher.close()
