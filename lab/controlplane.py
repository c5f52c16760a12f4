"""A real Kubernetes control plane on 127.0.0.1, built from its Go modules (tools/controlplane).

    from controlplane import ControlPlane
    with ControlPlane(run_dir) as cp:
        cp.kubeconfig                    # admin (client certificate, group system:masters)
        cp.url, cp.ca_file, cp.admin_token
        cp.token_kubeconfig(path, token, namespace="default")
        mark = cp.audit.mark(); ...; cp.audit.events(since=mark, user="system:serviceaccount:shop:bot")

Processes, all on 127.0.0.1, each started from the lab's launcher thread (lab/procs.py) and stopped in
reverse order on exit, errors and Ctrl-C:
  etcd                      data in <run dir>/etcd (no fsync: a throw-away store)
  kube-apiserver            TLS, client-certificate and static-token authentication, RBAC (Node,RBAC),
                            admission on (webhooks work), an audit log of every request (JSON lines)
  kube-controller-manager   Deployments -> ReplicaSets -> Pods, EndpointSlices, namespaces, tokens ...
  kube-scheduler            binds Pods to the KWOK nodes
  kwok                      makes the lab's Nodes Ready and their Pods Running without containers; pod
                            IPs come from a /24 of POD_NETWORK that the lab makes local (an `ip route
                            add local` on lo) while it runs, so a process of the lab can listen on a
                            pod's IP: traffic to pods never leaves this machine.

Nothing here imitates the API: every answer, 409, 422 and 403 comes from kube-apiserver itself.
"""
import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools", "controlplane"))
import components  # noqa: E402  pylint: disable=wrong-import-position

import procs  # noqa: E402  pylint: disable=wrong-import-position

POD_NETWORK = "10.213.0.0/17"     # each running lab takes one free /24 of it for its pods (KWOK's IPs)
SERVICE_CIDR = "10.213.128.0/24"  # ClusterIPs: never routed, nothing listens on them
LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
NODE_NAMES = ("lab-node-1", "lab-node-2")
ADMIN_USER = "lab-admin"


class ControlPlaneError(RuntimeError):
    pass


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# PKI: one throw-away CA per lab, made with the `cryptography` package (a dependency of ansible-core).
class PKI:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca_cert, self.ca_key = self._ca()

    def path(self, name):
        return os.path.join(self.dir, name)

    @staticmethod
    def _key():
        from cryptography.hazmat.primitives.asymmetric import ec

        return ec.generate_private_key(ec.SECP256R1())

    def _write(self, name, cert=None, key=None):
        from cryptography.hazmat.primitives import serialization

        if cert is not None:
            with open(self.path(name + ".crt"), "wb") as fh:
                fh.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            with open(self.path(name + ".key"), "wb") as fh:
                fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            os.chmod(self.path(name + ".key"), 0o600)

    def _ca(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        key = self._key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "onprem-mesh-lab-ca")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        self._write("ca", cert, key)
        return cert, key

    def issue(self, name, common_name, organizations=(), dns=(), ips=(), server=False):
        """A leaf certificate signed by the lab CA; writes <name>.crt and <name>.key."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = self._key()
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(self.ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False))
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        self._write(name, builder.sign(self.ca_key, hashes.SHA256()), key)
        return self.path(name + ".crt"), self.path(name + ".key")

    def service_account_keys(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with open(self.path("sa.key"), "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
        with open(self.path("sa.pub"), "wb") as fh:
            fh.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
        return self.path("sa.key"), self.path("sa.pub")


def write_kubeconfig(path, server, ca_file, user="lab", cert=None, key=None, token=None, namespace="default",
                     cluster="onprem-mesh-lab"):
    """A kubeconfig with the CA inline (it stays valid if the run dir moves) and one context."""
    with open(ca_file, "rb") as fh:
        ca_data = base64.b64encode(fh.read()).decode()
    creds = {}
    if cert:
        creds["client-certificate"], creds["client-key"] = cert, key
    if token:
        creds["token"] = token
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": cluster,
           "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": ca_data}}],
           "users": [{"name": user, "user": creds}],
           "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user, "namespace": namespace}}]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------------------------------
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        # the components of the lab itself are not what anyone measures
        {"level": "None", "users": ["system:kube-controller-manager", "system:kube-scheduler", "system:apiserver",
                                    "kwok", "system:kube-proxy"]},
        {"level": "None", "userGroups": ["system:nodes"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version", "/metrics"]},
        {"level": "None", "resources": [{"group": "coordination.k8s.io", "resources": ["leases"]},
                                        {"group": "", "resources": ["events"]}]},
        {"level": "Metadata"},
    ],
}


class AuditLog:
    """The API server's audit log (JSON lines, stage ResponseComplete): who called what, with which answer."""

    def __init__(self, path):
        self.path = path

    def mark(self):
        """An offset to count from (events written after this call)."""
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def events(self, since=0, user=None, namespace=None, resource=None, wait=0.3):
        """Events after `since`, filtered. Waits `wait` s first: the log backend writes as requests complete."""
        if wait:
            time.sleep(wait)
        out = []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(since)
                data = fh.read()
        except OSError:
            return out
        for line in data.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            ref = ev.get("objectRef") or {}
            if user and ev.get("user", {}).get("username") != user:
                continue
            if namespace and ref.get("namespace") != namespace:
                continue
            if resource and ref.get("resource") != resource:
                continue
            out.append(ev)
        return out

    @staticmethod
    def counts(events):
        """{"get virtualservices": 2, "patch virtualservices": 3, "patch": 3, "total": 5, ...}"""
        counts = {"total": 0}
        for ev in events:
            ref = ev.get("objectRef") or {}
            verb = ev.get("verb")
            key = f"{verb} {ref.get('resource')}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[key] = counts.get(key, 0) + 1
            counts[verb] = counts.get(verb, 0) + 1
            counts["total"] += 1
        return counts


class ControlPlane:
    """etcd + kube-apiserver + controller-manager + scheduler + KWOK nodes. start()/stop() or `with`."""

    def __init__(self, run_dir, launcher=None, nodes=NODE_NAMES, start_timeout=180.0, log=None):
        self.run_dir = os.path.abspath(run_dir)
        self.pod_cidr = None
        self._pod_net_lock = None
        self.node_names = tuple(nodes)
        self.start_timeout = start_timeout
        self._own_launcher = launcher is None
        self.launcher = launcher
        self.log = log or (lambda msg: None)
        self.children = {}
        self.url = self.kubeconfig = self.ca_file = self.admin_token = None
        self.audit = AuditLog(os.path.join(self.run_dir, "audit", "audit.log"))
        self.timings = {}
        self._route_added = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self):
        for comp in ("etcd", "kubernetes", "kwok"):
            if not components.is_built(comp):
                raise ControlPlaneError(
                    f"the {comp} binaries are not built ({components.component_dir(comp)}): run `make setup` "
                    "(tools/controlplane/build.py builds them once from their Go modules)")
        os.makedirs(self.run_dir, exist_ok=True)
        if self.launcher is None:
            procs.kill_stale(self.run_dir)
            self.launcher = procs.Launcher(self.run_dir)
        try:
            began = time.monotonic()
            self._pki()
            self._local_pod_route()
            self._etcd()
            self._apiserver()
            self._controllers()
            self._kwok()
            self._nodes()
            self.timings["control plane"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        if self._own_launcher and self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        self._remove_pod_route()

    def _spawn(self, name, argv, env=None):
        child = self.launcher.spawn(name, argv, env=env)
        self.children[name] = child
        return child

    def _wait(self, predicate, what, child=None, timeout=None):
        return procs.wait_for(predicate, timeout or self.start_timeout, interval=0.2, what=what, child=child)

    # -- pieces --------------------------------------------------------------------------------------
    def _pki(self):
        pki = self.pki = PKI(os.path.join(self.run_dir, "pki"))
        self.ca_file = pki.path("ca.crt")
        self.apiserver_port = free_port()
        self.url = f"https://127.0.0.1:{self.apiserver_port}"
        pki.issue("apiserver", "kube-apiserver", server=True, ips=["127.0.0.1", str(ipaddress.ip_network(SERVICE_CIDR)[1])],
                  dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"])
        self.sa_key, self.sa_pub = pki.service_account_keys()
        kubeconfigs = os.path.join(self.run_dir, "kubeconfigs")
        self._kc = {}
        for name, cn, orgs in (("admin", ADMIN_USER, ["system:masters"]),
                               ("controller-manager", "system:kube-controller-manager", []),
                               ("scheduler", "system:kube-scheduler", []),
                               ("kwok", "kwok", ["system:masters"])):
            cert, key = pki.issue(name, cn, organizations=orgs)
            self._kc[name] = write_kubeconfig(os.path.join(kubeconfigs, f"{name}.kubeconfig"), self.url, self.ca_file,
                                              user=cn, cert=cert, key=key)
        self.kubeconfig = self._kc["admin"]
        # a static bearer token too, for clients that take host + api_key (the modules' own options)
        self.admin_token = secrets.token_hex(16)
        self.token_file = pki.path("tokens.csv")
        with open(self.token_file, "w", encoding="utf-8") as fh:
            fh.write(f'{self.admin_token},lab-token-admin,lab-token-admin,"system:masters"\n')
        os.chmod(self.token_file, 0o600)

    def _claim_pod_network(self):
        """A /24 of POD_NETWORK no other running lab holds (a lock file held for the lab's lifetime)."""
        import fcntl

        for net in ipaddress.ip_network(POD_NETWORK).subnets(new_prefix=24):
            fh = open(os.path.join(LOCK_DIR, f"onprem-mesh-podnet-{net.network_address}.lock"), "w")  # noqa: SIM115
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._pod_net_lock = fh
            return str(net)
        raise ControlPlaneError(f"every /24 of {POD_NETWORK} is held by another running lab")

    def _local_pod_route(self):
        """Make the lab's pod /24 local (AnyIP on lo): lab processes listen on the IPs KWOK gives the pods."""
        if os.geteuid() != 0:
            raise ControlPlaneError("the lab makes its pod network local with `ip route add local "
                                    f"{POD_NETWORK} dev lo`, which needs root (CAP_NET_ADMIN): run it as root")
        self.pod_cidr = self._claim_pod_network()
        cmd = ["ip", "route", "replace", "local", self.pod_cidr, "dev", "lo", "table", "local"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ControlPlaneError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        self._route_added = True

    def _remove_pod_route(self):
        if self._route_added:
            subprocess.run(["ip", "route", "del", "local", self.pod_cidr, "dev", "lo", "table", "local"],
                           capture_output=True, check=False)
            self._route_added = False
        if self._pod_net_lock is not None:
            self._pod_net_lock.close()
            self._pod_net_lock = None

    def _etcd(self):
        client, peer = free_port(), free_port()
        data = os.path.join(self.run_dir, "etcd")
        shutil.rmtree(data, ignore_errors=True)
        self.etcd_url = f"http://127.0.0.1:{client}"
        child = self._spawn("etcd", [
            components.binary("etcd"), "--name", "lab", "--data-dir", data,
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"lab=http://127.0.0.1:{peer}", "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
            "--unsafe-no-fsync", "--auto-compaction-retention", "1", "--quota-backend-bytes", str(2 * 1024 ** 3),
            "--log-level", "warn"])
        self._wait(lambda: _http_ok(f"{self.etcd_url}/health"), "etcd /health", child)

    def _apiserver(self):
        audit_dir = os.path.dirname(self.audit.path)
        os.makedirs(audit_dir, exist_ok=True)
        policy = os.path.join(audit_dir, "policy.yaml")
        with open(policy, "w", encoding="utf-8") as fh:
            yaml.safe_dump(AUDIT_POLICY, fh)
        pki = self.pki
        argv = [
            components.binary("kube-apiserver"),
            "--etcd-servers", self.etcd_url, "--etcd-prefix", "/registry",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(self.apiserver_port),
            "--tls-cert-file", pki.path("apiserver.crt"), "--tls-private-key-file", pki.path("apiserver.key"),
            "--client-ca-file", self.ca_file, "--token-auth-file", self.token_file,
            "--service-account-key-file", self.sa_pub, "--service-account-signing-key-file", self.sa_key,
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", SERVICE_CIDR, "--authorization-mode", "Node,RBAC",
            "--allow-privileged=true", "--endpoint-reconciler-type", "none", "--profiling=false",
            "--audit-policy-file", policy, "--audit-log-path", self.audit.path, "--audit-log-format", "json",
            "--audit-log-maxsize", "200", "--audit-log-maxbackup", "1",
            "--enable-priority-and-fairness=false", "-v", "1",
            # webhooks and the service proxy go to the Endpoints (pod IPs, local here), not to ClusterIPs that
            # only kube-proxy could route
            "--enable-aggregator-routing=true",
        ]
        child = self._spawn("kube-apiserver", argv)
        ctx = ssl.create_default_context(cafile=self.ca_file)
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        self._wait(lambda: _http_ok(f"{self.url}/readyz", ctx, headers), "kube-apiserver /readyz", child)

    def _controllers(self):
        cm_port, sched_port = free_port(), free_port()
        kc = self._kc["controller-manager"]
        self._spawn("kube-controller-manager", [
            components.binary("kube-controller-manager"), "--kubeconfig", kc,
            "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
            "--bind-address", "127.0.0.1", "--secure-port", str(cm_port), "--leader-elect=false",
            "--root-ca-file", self.ca_file, "--service-account-private-key-file", self.sa_key,
            "--use-service-account-credentials=true", "--service-cluster-ip-range", SERVICE_CIDR,
            "--controllers", "*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route,-persistentvolume-binder,"
                             "-attachdetach,-persistentvolume-expander,-ephemeral-volume,-pvc-protection,-pv-protection",
            "--concurrent-deployment-syncs", "5", "-v", "1"])
        ks = self._kc["scheduler"]
        self._spawn("kube-scheduler", [
            components.binary("kube-scheduler"), "--kubeconfig", ks, "--authentication-kubeconfig", ks,
            "--authorization-kubeconfig", ks, "--bind-address", "127.0.0.1", "--secure-port", str(sched_port),
            "--leader-elect=false", "-v", "1"])

    def _kwok(self):
        stages = components.data_path("kwok", "stages")
        docs = [{"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
                 "options": {"cidr": self.pod_cidr, "nodeIP": str(ipaddress.ip_network(self.pod_cidr)[254]),
                             "manageAllNodes": True,
                             "nodeLeaseDurationSeconds": 40,
                             # kwok applies its defaults only when no options are given at all
                             "nodeLeaseParallelism": 4, "podPlayStageParallelism": 4, "nodePlayStageParallelism": 2,
                             "podsOnNodeSyncParallelism": 1, "enablePodsOnNodeSyncListPager": True,
                             "enablePodsOnNodeSyncStreamWatch": False}}]
        for rel in ("node/fast/node-initialize.yaml", "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml"):
            docs += list(yaml.safe_load_all(open(os.path.join(stages, rel), encoding="utf-8")))
        pod_fast = os.path.join(stages, "pod", "fast")
        for name in sorted(os.listdir(pod_fast)):
            if name.endswith(".yaml") and name != "kustomization.yaml":
                docs += list(yaml.safe_load_all(open(os.path.join(pod_fast, name), encoding="utf-8")))
        config = os.path.join(self.run_dir, "kwok.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            yaml.safe_dump_all([d for d in docs if d], fh, sort_keys=False)
        self._spawn("kwok", [components.binary("kwok"), "--kubeconfig", self._kc["kwok"], "--config", config,
                             "--manage-all-nodes=true", "--cidr", self.pod_cidr])

    def _nodes(self):
        from kubernetes import client

        api = self.core()
        for name in self.node_names:
            api.create_node(client.V1Node(metadata=client.V1ObjectMeta(
                name=name, labels={"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                   "kubernetes.io/arch": "amd64", "type": "kwok"},
                annotations={"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"})))

        def ready():
            nodes = api.list_node().items
            return len(nodes) == len(self.node_names) and all(
                any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])) for n in nodes)

        self._wait(ready, "the KWOK nodes to be Ready", self.children.get("kwok"))

    # -- clients -------------------------------------------------------------------------------------
    def api_client(self, kubeconfig=None):
        from kubernetes import config

        return config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)

    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def token_kubeconfig(self, path, token, namespace="default", user="token-user"):
        return write_kubeconfig(path, self.url, self.ca_file, user=user, token=token, namespace=namespace)

    def service_account_token(self, namespace, name, seconds=3600):
        """A bound token of ServiceAccount namespace/name (TokenRequest API); creates the account if needed."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = self.core()
        try:
            api.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        req = api.create_namespaced_service_account_token(
            name, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=seconds)))
        return req.status.token

    def kubectl(self, *args, kubeconfig=None, check=True, timeout=60, input_text=None):
        proc = subprocess.run([str(components.binary("kubectl")), "--kubeconfig", kubeconfig or self.kubeconfig,
                               *args], capture_output=True, text=True, timeout=timeout, check=False, input=input_text)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc


def _http_ok(url, context=None, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=3, context=context) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status == 200
    except OSError:
        return False


if __name__ == "__main__":  # a quick manual check: python lab/controlplane.py [seconds]
    run = os.path.join(ROOT, ".cache", "controlplane-manual")
    with ControlPlane(run, log=print) as cp:
        print(json.dumps({"url": cp.url, "kubeconfig": cp.kubeconfig, "timings": cp.timings}, indent=1), flush=True)
        threading.Event().wait(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
