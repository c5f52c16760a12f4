"""THIS IS A TEST DOUBLE, NOT A KUBERNETES API SERVER.

onprem.mesh k8s_double: an in-process fake of kube-apiserver (v1.32 behaviour) for the onprem.mesh tests. It serves
discovery, a subset of core/v1 and apps/v1, and every CustomResourceDefinition it is given (Istio's crd-all.gen.yaml),
with the real server's status codes, Status bodies and messages where the project's clients can tell the difference.
It lives in tests/support (a sys.path root); plugins/ and roles/ must never import it. Every HTTP response carries the
header `X-Test-Double: onprem.mesh k8s_double`. See README.md beside this file for what is simplified.

Python API::

    from k8s_double import start, istio_crds_path
    handle = start(port=0, crds=istio_crds_path(), tokens=None, state=None, tls=False)
    handle.url, handle.kubeconfig, handle.token, handle.ca_file
    handle.requests(), handle.counters(), handle.reset(), handle.inject({...}), handle.snapshot(), handle.load(snap)
    handle.write_kubeconfig(path, token=..., namespace=...)
    handle.stop()
"""
import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading

import yaml

from .api import Api
from .auth import ADMIN_TOKEN, Authenticator
from .registry import load_crds
from .server import BANNER, DoubleHTTPServer

__all__ = ["start", "Handle", "istio_data_dir", "istio_crds_path", "write_kubeconfig", "BANNER", "ADMIN_TOKEN"]

CONTEXT = "k8s-double"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def istio_data_dir():
    """The Istio reference data directory (ONPREM_MESH_ISTIO_DATA, else ../shared/istio from the repo root) or None."""
    candidates = [os.environ.get("ONPREM_MESH_ISTIO_DATA"), os.path.join(os.path.dirname(_REPO_ROOT), "shared", "istio")]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "crd-all.gen.yaml")):
            return candidate
    return None


def istio_crds_path():
    data = istio_data_dir()
    return os.path.join(data, "crd-all.gen.yaml") if data else None


# pylint: disable-next=too-many-arguments,too-many-positional-arguments
def write_kubeconfig(path, url, token=ADMIN_TOKEN, ca_file=None, namespace="default", name=CONTEXT):
    """A kubeconfig (cluster, user and context all named `k8s-double` by default) for kubectl and the python client."""
    cluster = {"server": url}
    if ca_file:
        cluster["certificate-authority"] = os.path.abspath(ca_file)
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# TEST DOUBLE: onprem.mesh k8s_double (not a real Kubernetes cluster)\n")
        yaml.safe_dump(config, handle, default_flow_style=False, sort_keys=False)
    return path


_CERTS = {}
_CERTS_LOCK = threading.Lock()


def _certs():
    """One throw-away CA + server certificate per process (openssl is slow-ish; the files are read-only reused)."""
    with _CERTS_LOCK:
        if not _CERTS or not all(os.path.exists(p) for p in _CERTS["files"]):
            directory = tempfile.mkdtemp(prefix="k8s-double-certs-")
            atexit.register(shutil.rmtree, directory, True)
            _CERTS["files"] = _make_certs(directory)
        return _CERTS["files"]


def _make_certs(directory):
    """A throw-away CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise RuntimeError("tls=True needs the openssl CLI")
    ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    key, csr, crt = (os.path.join(directory, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w", encoding="utf-8") as handle:
        handle.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                     "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def run(*args):
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2",
        "-subj", "/CN=k8s-double test CA (TEST DOUBLE)", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=k8s-double (TEST DOUBLE)")
    run("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


class Handle:  # pylint: disable=too-many-instance-attributes
    """A running test double: `.url`, `.kubeconfig`, `.token`, `.ca_file`, `.api` (the in-process store), `.stop()`."""

    # pylint: disable-next=too-many-arguments,too-many-positional-arguments
    def __init__(self, server, thread, workdir, kubeconfig, url, token, ca_file, own_workdir):
        self.server = server
        self.api = server.api
        self._thread = thread
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.url = url
        self.token = token
        self.ca_file = ca_file
        self._own_workdir = own_workdir

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.server is None:
            return
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
        if self.server.state_file:
            self.server.save_state()
        self.server = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # conveniences over the /_double controls, in process
    def requests(self):
        return self.server.log.snapshot()["requests"]

    def counters(self):
        return self.server.log.snapshot()["counters"]

    def reset(self, state=False):
        self.server.log.reset()
        self.server.faults.clear()
        if state:
            self.api.load(Api(controllers=self.api.controllers).snapshot())

    def inject(self, fault):
        """Add a fault (see faults.py): {"kind": "conflict"|"error"|"bump"|"forbid"|"delay", ...matchers, "count": N}."""
        return self.server.faults.add(fault)

    def snapshot(self):
        return self.api.snapshot()

    def load(self, snap):
        self.api.load(snap)

    def add_token(self, token, user, rules=None, admin=False):
        self.server.authn.add(token, user, rules, admin)

    def write_kubeconfig(self, path, token=None, namespace="default"):
        return write_kubeconfig(path, self.url, token or self.token, self.ca_file, namespace)


# pylint: disable-next=too-many-arguments,too-many-locals,too-many-positional-arguments
def start(port=0, crds=None, tokens=None, state=None, tls=False, host="127.0.0.1", kubeconfig=None, workdir=None,
          controllers=True, admin_token=ADMIN_TOKEN):
    """Start the test double in a background thread and return its Handle.

    crds: a path (multi-document YAML) or a list of CRD dicts, or None. tokens: see auth.py. state: a JSON snapshot file,
    loaded if it exists and rewritten after every write. tls: serve HTTPS with a throw-away CA (handle.ca_file).
    kubeconfig: where to write the kubeconfig (default: <workdir>/kubeconfig). controllers: the tiny Deployment
    "controller" that marks rollouts complete.
    """
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="k8s-double-")
    os.makedirs(workdir, exist_ok=True)
    api = Api(controllers=controllers)
    crd_docs = load_crds(crds) if isinstance(crds, str) else list(crds or [])
    for crd in crd_docs:
        api.load_crd(crd)
    if state and os.path.exists(state) and os.path.getsize(state):
        with open(state, encoding="utf-8") as handle:
            api.load(json.load(handle))
    server = DoubleHTTPServer((host, port), api, Authenticator(tokens, admin_token), state_file=state)
    ca_file = None
    scheme = "http"
    if tls:
        import ssl  # pylint: disable=import-outside-toplevel
        ca_file, crt, key = _certs()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(crt, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    url = f"{scheme}://{host}:{server.server_address[1]}"
    server.public_url = url
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="k8s-double", daemon=True)
    thread.start()
    path = write_kubeconfig(kubeconfig or os.path.join(workdir, "kubeconfig"), url, admin_token, ca_file)
    return Handle(server, thread, workdir, path, url, admin_token, ca_file, own)
