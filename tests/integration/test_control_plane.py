"""The lab's control plane itself: the real kube-apiserver with Istio installed by the istio role.

What the other suites rely on, checked once: Istio's CRDs and istiod's validating webhook reject what Istio rejects,
kubectl talks to the server, the audit log counts requests per user, and a ServiceAccount bound to a Role gets
exactly that Role's rights.
"""
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from cluster_fixtures import samples  # pylint: disable=import-error

GROUP, VERSION = "networking.istio.io", "v1"


def test_istio_crds_and_webhook_validate(cluster, ns):
    api = client.CustomObjectsApi(cluster.api_client())
    for doc in samples("virtual-service-reviews-90-10.yaml"):
        api.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", doc)
    vs = api.get_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "reviews")
    assert [d["weight"] for d in vs["spec"]["http"][0]["route"]] == [90, 10]
    # the CRD's schema: a weight must be an integer
    bad = dict(samples("virtual-service-reviews-90-10.yaml")[0], metadata={"name": "bad-type"})
    bad["spec"]["http"][0]["route"][0]["weight"] = "ninety"
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", bad)
    assert err.value.status == 422 and "spec.http[0].route[0].weight" in err.value.body
    # istiod's validating webhook (the CRD schema has no bound here): a mirror share over 100 %
    bad = dict(samples("virtual-service-reviews-90-10.yaml")[0], metadata={"name": "bad-mirror"})
    bad["spec"]["http"][0].update(mirror={"host": "reviews", "subset": "v2"}, mirrorPercentage={"value": 150})
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", bad)
    assert err.value.status == 400 and "validation.istio.io" in err.value.body
    assert "mirror_percentage must have a max value of 100" in err.value.body
    # weights need not add up to 100 for Istio 1.30 (they are relative): the canary modules' own rule, not Istio's
    relative = dict(samples("virtual-service-reviews-90-10.yaml")[0], metadata={"name": "relative"})
    relative["spec"]["http"][0]["route"][0]["weight"] = 50
    api.create_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", relative)


def test_kubectl_and_audit_log(cluster, ns):
    mark = cluster.audit.mark()
    out = cluster.kubectl("get", "vs,dr", "-n", ns, "-o", "name")
    assert out.returncode == 0
    events = cluster.audit.events(since=mark, user="lab-admin", namespace=ns)
    assert any(e["verb"] == "list" and e["objectRef"]["resource"] == "virtualservices" for e in events), events


def test_service_account_gets_exactly_its_role(cluster, ns, tmp_path):
    rules = [{"apiGroups": [GROUP], "resources": ["virtualservices"], "verbs": ["get"]}]
    kubeconfig = cluster.service_account_kubeconfig(ns, "reader", rules, str(tmp_path / "kc"))
    from kubernetes import config  # pylint: disable=import-outside-toplevel

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
    with pytest.raises(ApiException) as err:
        api.list_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices")
    assert err.value.status == 403
    assert f"system:serviceaccount:{ns}:reader" in err.value.body and "cannot list resource" in err.value.body
    with pytest.raises(ApiException) as err:
        api.get_namespaced_custom_object(GROUP, VERSION, ns, "virtualservices", "none")
    assert err.value.status == 404
