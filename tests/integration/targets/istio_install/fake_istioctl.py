"""A stand-in for istioctl (install, tag set) used by test_istio_role.py: records its arguments and writes what the
real istioctl would leave in the cluster (the istiod-<revision> Deployment, the revision-tag webhook) through the
test Kubernetes API. Not a test of Istio; a test of the role's decisions around istioctl."""
import json
import os
import sys

import yaml
from kubernetes import client, config


def main(argv):
    with open(os.environ["FAKE_ISTIOCTL_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(argv) + "\n")
    kubeconfig = argv[argv.index("--kubeconfig") + 1]
    api = config.new_client_from_config(config_file=kubeconfig)
    if argv[0] == "install":
        with open(argv[argv.index("-f") + 1], encoding="utf-8") as handle:
            iop = yaml.safe_load(handle)
        rev, ns = iop["spec"]["revision"], iop["metadata"]["namespace"]
        core = client.CoreV1Api(api)
        if ns not in [n.metadata.name for n in core.list_namespace().items]:
            core.create_namespace({"metadata": {"name": ns}})
        body = {
            "metadata": {"name": f"istiod-{rev}", "labels": {"app": "istiod", "istio.io/rev": rev}},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "istiod", "istio.io/rev": rev}},
                     "template": {"metadata": {"labels": {"app": "istiod", "istio.io/rev": rev}},
                                  "spec": {"containers": [{"name": "discovery", "image": "pilot:" + rev}]}}}}
        apps = client.AppsV1Api(api)
        try:
            apps.create_namespaced_deployment(ns, body)
        except client.exceptions.ApiException as err:
            if err.status != 409:
                raise
            apps.patch_namespaced_deployment(f"istiod-{rev}", ns, {"spec": body["spec"]})
    elif argv[:2] == ["tag", "set"]:
        tag, rev = argv[2], argv[argv.index("--revision") + 1]
        custom = client.CustomObjectsApi(api)
        name = f"istio-revision-tag-{tag}"
        body = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": name, "labels": {"istio.io/tag": tag, "istio.io/rev": rev}}}
        try:
            custom.delete_cluster_custom_object("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", name)
        except client.exceptions.ApiException as err:
            if err.status != 404:
                raise
        custom.create_cluster_custom_object("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", body)
    else:
        sys.exit(f"fake istioctl: unsupported command {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
