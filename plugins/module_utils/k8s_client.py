# -*- coding: utf-8 -*-
# Copyright (c) onprem.mesh contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection to the Kubernetes API through the official ``kubernetes`` client.

The options mirror kubernetes.core's (``kubeconfig``, ``context``, ``host``, ``api_key``,
``validate_certs``, ``ca_cert``, ``client_cert``, ``client_key``, ``proxy``) and read the same
``K8S_AUTH_*`` environment variables, so inventories written for kubernetes.core work unchanged.

``IstioObjects`` is the small surface the canary modules need: read a VirtualService or
DestinationRule, list DestinationRules, and send a JSON patch. Every call is counted
(``calls``) so that benchmarks and the module results can say what a step cost.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import traceback

from ansible.module_utils.basic import env_fallback

K8S_IMP_ERR = None
try:
    from kubernetes import client as k8s_client_lib
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    HAS_K8S = True
except ImportError:  # pragma: no cover - reported by the module through missing_required_lib
    k8s_client_lib = None
    k8s_config = None
    ApiException = Exception
    HAS_K8S = False
    K8S_IMP_ERR = traceback.format_exc()

ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSION = "v1"
JSON_PATCH = "application/json-patch+json"

K8S_AUTH_ARGSPEC = dict(
    kubeconfig=dict(type="raw", fallback=(env_fallback, ["K8S_AUTH_KUBECONFIG"])),
    context=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_CONTEXT"])),
    host=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_HOST"])),
    api_key=dict(type="str", no_log=True, fallback=(env_fallback, ["K8S_AUTH_API_KEY"])),
    validate_certs=dict(type="bool", aliases=["verify_ssl"], fallback=(env_fallback, ["K8S_AUTH_VERIFY_SSL"])),
    ca_cert=dict(type="path", aliases=["ssl_ca_cert"], fallback=(env_fallback, ["K8S_AUTH_SSL_CA_CERT"])),
    client_cert=dict(type="path", aliases=["cert_file"], fallback=(env_fallback, ["K8S_AUTH_CERT_FILE"])),
    client_key=dict(type="path", aliases=["key_file"], no_log=False, fallback=(env_fallback, ["K8S_AUTH_KEY_FILE"])),
    proxy=dict(type="str", fallback=(env_fallback, ["K8S_AUTH_PROXY"])),
)


class K8sError(Exception):
    """An answer from the API server (or no answer), with the status code and the server's message.

    ``verb``, ``resource`` (with its API ``group``) and ``namespace`` say what was asked (for messages about RBAC); ``guarded`` is true
    when the request was a JSON patch that carried ``test`` operations.
    """

    def __init__(self, message, status=None, reason=None, body=None, verb=None, resource=None, namespace=None, guarded=False, group=None):
        super(K8sError, self).__init__(message)
        self.group = group
        self.status = status
        self.reason = reason
        self.body = body or {}
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        self.guarded = guarded

    @property
    def is_conflict(self):
        """The object changed between our read and our write: read again and rebuild the write.

        409 (a stale resourceVersion), or 422 without ``details.causes`` on a JSON patch that carried ``test``
        operations. kube-apiserver answers every JSON patch that cannot be applied to the object as it is now (a
        failed ``test``, a path that is gone) with HTTP 422, reason Invalid, the generic message "the server
        rejected our request due to an error in our request" and no causes (measured on kube-apiserver 1.35,
        tests/integration/test_canary_modules.py). A 422 from a schema or validation error lists its causes
        (the fields), so it is never taken for a conflict.
        """
        if self.status == 409:
            return True
        if self.status == 422 and self.guarded:
            details = self.body.get("details") if isinstance(self.body, dict) else None
            return not (details or {}).get("causes")
        return False


def _server_message(exc):
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {"message": str(exc.body)}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    return body, body.get("message") or exc.reason or str(exc)


def resource_name(resource, group=None):
    """``virtualservices.networking.istio.io``, ``pods`` (the core group has no suffix)."""
    return "%s.%s" % (resource, group) if group else resource


def api_error(exc, what, verb=None, resource=None, namespace=None, guarded=False, group=None):
    """Turn an ApiException into a K8sError whose message says what failed and what to do."""
    body, message = _server_message(exc)
    status = getattr(exc, "status", None)
    hint = ""
    if status == 401:
        hint = " Check the credentials: api_key, client_cert/client_key or the kubeconfig user."
    elif status == 403:
        if verb and resource:
            hint = (" The identity used lacks RBAC permission to %s %s%s; grant that verb (the collection's README lists the"
                    " verbs, section RBAC) and check that the namespace exists (a Role grants nothing in a namespace that does"
                    " not exist)." % (verb, resource_name(resource, group), " in namespace %s" % namespace if namespace else ""))
        else:
            hint = (" The identity used lacks RBAC permission for this; grant the verbs listed in the"
                    " collection's README (section RBAC) on this resource.")
    elif status == 404:
        hint = " Check the name and namespace (and that the Istio CRDs are installed)."
    return K8sError("%s: HTTP %s %s.%s" % (what, status, message, hint), status=status, reason=getattr(exc, "reason", None), body=body,
                    verb=verb, resource=resource, namespace=namespace, guarded=guarded, group=group)


def build_api_client(params):
    """An ``kubernetes.client.ApiClient`` from module parameters (kubernetes.core's semantics).

    With ``host``, the connection is built from the options alone and TLS is verified unless
    ``validate_certs`` is false. Otherwise the kubeconfig (``kubeconfig``, ``K8S_AUTH_KUBECONFIG``,
    ``KUBECONFIG`` or ``~/.kube/config``) is loaded; options given explicitly override it.
    """
    if not HAS_K8S:
        raise K8sError("the kubernetes Python library is required (pip install kubernetes)")
    configuration = k8s_client_lib.Configuration()
    if params.get("host"):
        configuration.host = params["host"]
        configuration.verify_ssl = True
    else:
        kubeconfig = params.get("kubeconfig")
        try:
            if isinstance(kubeconfig, dict):
                k8s_config.load_kube_config_from_dict(kubeconfig, context=params.get("context"), client_configuration=configuration)
            else:
                k8s_config.load_kube_config(config_file=kubeconfig, context=params.get("context"), client_configuration=configuration)
        except Exception as exc:  # the library raises ConfigException, IOError or ValueError
            raise K8sError("could not load the kubeconfig %s: %s. Set kubeconfig (or K8S_AUTH_KUBECONFIG), or host and api_key."
                           % (kubeconfig or "(default)", exc))
    if params.get("api_key"):
        configuration.api_key = {"authorization": "Bearer %s" % params["api_key"]}
    if params.get("validate_certs") is not None:
        configuration.verify_ssl = params["validate_certs"]
    if params.get("ca_cert"):
        configuration.ssl_ca_cert = params["ca_cert"]
    if params.get("client_cert"):
        configuration.cert_file = params["client_cert"]
    if params.get("client_key"):
        configuration.key_file = params["client_key"]
    if params.get("proxy"):
        configuration.proxy = params["proxy"]
    return k8s_client_lib.ApiClient(configuration)


def json_pointer(*parts):
    """A JSON pointer (RFC 6901) from path parts; escapes ``~`` and ``/`` in keys such as annotations."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class IstioObjects:
    """Reads and patches Istio networking objects; counts every call it makes."""

    def __init__(self, api_client, group=ISTIO_GROUP, version=ISTIO_VERSION):
        self.api_client = api_client
        self.custom = k8s_client_lib.CustomObjectsApi(api_client)
        self.group = group
        self.version = version
        self.calls = {"read": 0, "write": 0}

    def _call(self, kind, what, func, *args, **kwargs):
        request = kwargs.pop("request", {})
        self.calls[kind] += 1
        try:
            return func(*args, **kwargs)
        except K8sError:
            raise
        except Exception as exc:  # ApiException; or connection refused, TLS failure, timeout
            if isinstance(exc, ApiException) and getattr(exc, "status", None):
                raise api_error(exc, what, **request)
            raise K8sError("%s: the API server could not be reached: %s. Check host/kubeconfig and validate_certs/ca_cert." % (what, exc),
                           **request)

    def get(self, plural, namespace, name):
        kind = "VirtualService" if plural == "virtualservices" else "DestinationRule" if plural == "destinationrules" else plural
        return self._call("read", "reading %s %s/%s" % (kind, namespace, name), self.custom.get_namespaced_custom_object,
                          self.group, self.version, namespace, plural, name,
                          request=dict(verb="get", resource=plural, namespace=namespace, group=self.group))

    def list(self, plural, namespace):
        return self._call("read", "listing %s in namespace %s" % (plural, namespace), self.custom.list_namespaced_custom_object,
                          self.group, self.version, namespace, plural,
                          request=dict(verb="list", resource=plural, namespace=namespace, group=self.group)).get("items", [])

    def json_patch(self, plural, namespace, name, operations):
        guarded = any(op.get("op") == "test" for op in operations)
        return self._call("write", "patching %s %s/%s" % (plural, namespace, name), self.custom.patch_namespaced_custom_object,
                          self.group, self.version, namespace, plural, name, operations, _content_type=JSON_PATCH,
                          request=dict(verb="patch", resource=plural, namespace=namespace, group=self.group, guarded=guarded))

    def namespace_exists(self, namespace):
        """True or False when the API server says; None when these credentials may not read namespaces (or no answer)."""
        core = k8s_client_lib.CoreV1Api(self.api_client)
        try:
            self._call("read", "reading namespace %s" % namespace, core.read_namespace, namespace,
                       request=dict(verb="get", resource="namespaces"))
        except K8sError as exc:
            return False if exc.status == 404 else None
        return True
