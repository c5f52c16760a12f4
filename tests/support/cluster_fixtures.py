"""pytest fixtures for the real control plane of the lab (lab/cluster.py): one per test session.

    def test_x(cluster, ns):                      # ns: a fresh namespace, deleted after the test
        api = client.CustomObjectsApi(cluster.api_client())
        create(api, samples("virtual-service-reviews-90-10.yaml"), ns)

`cluster` is kube-apiserver 1.35 (with etcd, controller-manager, scheduler, KWOK nodes) and Istio 1.30 installed by
the collection's istio role with the real istioctl, istiod running against it: CRD validation, the validating and
injecting webhooks, RBAC, 409s and 422s are the real server's. When a component is not built the fixture fails
(it does not skip) and says how to build it.
"""
import os
import shutil
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _p in (os.path.join(ROOT, "lab"), os.path.join(ROOT, "tools", "controlplane")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import components  # noqa: E402  pylint: disable=wrong-import-position,import-error
from cluster import LabCluster  # noqa: E402  pylint: disable=wrong-import-position,import-error

RUN_DIR = os.path.join(ROOT, ".cache", "test-cluster")


def samples(name):
    """Documents of one of Istio's Bookinfo traffic-management samples (samples/bookinfo/networking/<name>)."""
    with open(os.path.join(components.data_path("istio", "samples"), name), encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


@pytest.fixture(scope="session")
def cluster(request):
    run_dir = os.path.join(RUN_DIR, str(os.getpid()))
    with LabCluster(run_dir) as running:
        print(f"\nlab cluster up: {running.url} ({', '.join(f'{k} {v:.1f} s' for k, v in running.timings.items())})")
        yield running
        running.cleanup_namespaces()
    # its logs (etcd, kube-apiserver, istiod, the audit log ...) stay for a failed session, go after a clean one
    if not request.session.testsfailed:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def ns(cluster):  # pylint: disable=redefined-outer-name
    """A fresh namespace (not in the mesh) for one test."""
    name = cluster.namespace("t")
    yield name
    from kubernetes.client.rest import ApiException  # pylint: disable=import-outside-toplevel

    try:
        cluster.core().delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
