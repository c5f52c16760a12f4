"""TEST DOUBLE (onprem.mesh k8s_double): pytest fixtures.

Use from a test module or conftest (tests/support must be on sys.path; tests/integration/conftest.py does that)::

    pytest_plugins = ["k8s_double.pytest_plugin"]

Fixtures:

- ``istio_crds``: path of Istio's crd-all.gen.yaml (skips the test, saying why, when ../shared/istio is absent).
- ``k8s_double``: a fresh server per test (plain HTTP, Istio CRDs loaded) -> k8s_double.Handle.
  The python ``kubernetes`` client sends the bearer token over plain HTTP.
- ``k8s_double_tls``: the same over HTTPS (throw-away CA in ``handle.ca_file``). Use it with the real kubectl:
  kubectl (client-go) does not send bearer tokens over plain HTTP.
- ``k8s_double_kubeconfig``: a factory ``make(handle, token=None, namespace="default", name=None) -> path`` writing a
  kubeconfig into tmp_path (for restricted tokens).
- ``k8s_double_client``: a factory ``make(handle, token=None) -> kubernetes.client.ApiClient``.
"""
import os

import pytest

from . import istio_crds_path, start


@pytest.fixture(scope="session")
def istio_crds():
    path = istio_crds_path()
    if not path:
        pytest.skip("Istio reference data not found: set ONPREM_MESH_ISTIO_DATA or provide ../shared/istio/crd-all.gen.yaml")
    return path


@pytest.fixture
def k8s_double(istio_crds, tmp_path):  # pylint: disable=redefined-outer-name
    handle = start(port=0, crds=istio_crds, workdir=str(tmp_path / "k8s-double"))
    yield handle
    handle.stop()


@pytest.fixture
def k8s_double_tls(istio_crds, tmp_path):  # pylint: disable=redefined-outer-name
    handle = start(port=0, crds=istio_crds, tls=True, workdir=str(tmp_path / "k8s-double-tls"))
    yield handle
    handle.stop()


@pytest.fixture
def k8s_double_kubeconfig(tmp_path):
    counter = {"n": 0}

    def make(handle, token=None, namespace="default", name=None):
        counter["n"] += 1
        path = os.path.join(str(tmp_path), name or f"kubeconfig-{counter['n']}")
        return handle.write_kubeconfig(path, token=token, namespace=namespace)
    return make


@pytest.fixture
def k8s_double_client():
    made = []

    def make(handle, token=None):
        from kubernetes import client  # pylint: disable=import-outside-toplevel
        config = client.Configuration()
        config.host = handle.url
        config.api_key = {"authorization": token or handle.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        if handle.ca_file:
            config.ssl_ca_cert = handle.ca_file
        api_client = client.ApiClient(config)
        made.append(api_client)
        return api_client
    yield make
    for api_client in made:
        api_client.close()
